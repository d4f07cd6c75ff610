"""Projection heads (docs/paper_vs_authors.md Q6): Dense(hidden) -> BatchNorm -> ReLU -> Dense(out).

The authors' `ProjectMLP` is Conv1d(k=1) -> BatchNorm1d -> ReLU -> Conv1d(k=1); for a [B, L, C] input the BN
statistics run over all B*L positions. Param tree: linear_hidden/{kernel [C, hidden], bias},
bn/{scale, bias} (+ batch_stats bn/{mean, var}), linear_out/{kernel [hidden, out], bias}.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def _torch_conv_init(fan_in_axis: int = 0):
  """PyTorch Conv1d default init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight (kaiming a=sqrt(5))."""
  return nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform', in_axis=fan_in_axis)


def _torch_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class BatchNorm(nn.Module):
  """PyTorch `BatchNorm1d` arithmetic: normalise with the biased batch variance, but update `var` with the
  unbiased one (n / (n - 1)), running = momentum * running + (1 - momentum) * batch (PyTorch momentum 0.1 ==
  `momentum` 0.9 here). Input [N, C]; statistics over N, or over the rows where `where` [N] is true.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool, where: jnp.ndarray | None = None) -> jnp.ndarray:
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
    xf = x.astype(jnp.float32)
    if train:
      if where is None:
        n = xf.shape[0]
        mean = jnp.mean(xf, axis=0)
        var = jnp.mean(jnp.square(xf - mean), axis=0)
        unbias = n / max(n - 1, 1)
      else:  # statistics of the selected rows only (bucketed text: real tokens, text_buckets.py)
        w = where.astype(jnp.float32)[:, None]
        n = jnp.maximum(jnp.sum(w), 1.0)
        mean = jnp.sum(xf * w, axis=0) / n
        var = jnp.sum(jnp.square(xf - mean) * w, axis=0) / n
        unbias = n / jnp.maximum(n - 1.0, 1.0)
      if not self.is_initializing():
        m = self.momentum
        ra_mean.value = m * ra_mean.value + (1.0 - m) * mean
        ra_var.value = m * ra_var.value + (1.0 - m) * var * unbias
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (xf - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale + bias
    return y.astype(self.dtype)


class ProjectionHead(nn.Module):
  """x [B, C] or [B, L, C] -> [B, out] or [B, L, out] (not L2-normalised).

  train=True uses batch statistics over all B*L positions (or those where `where` [B] / [B, L] is true) and
  updates `batch_stats` (must be mutable).
  """
  hidden: int
  out: int
  bn_momentum: float = 0.9
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, where: jnp.ndarray | None = None) -> jnp.ndarray:
    lead = x.shape[:-1]
    c = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_torch_conv_init(), bias_init=_torch_bias_init(c),
                 name='linear_hidden')(x.reshape(-1, c))
    h = BatchNorm(self.bn_momentum, self.bn_eps, self.dtype, name='bn')(
        h, train, None if where is None else where.reshape(-1))
    y = nn.Dense(self.out, dtype=self.dtype, kernel_init=_torch_conv_init(),
                 bias_init=_torch_bias_init(self.hidden), name='linear_out')(nn.relu(h))
    return y.reshape(lead + (self.out,))
