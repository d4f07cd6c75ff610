"""ViT building blocks of the visual encoder and the entity decoder (docs/paper_vs_authors.md Q2, Q9).

Param names follow the authors' PyTorch modules (`norm1`, `attn.qkv`, `attn.proj`, `norm2`, `mlp.fc1`,
`mlp.fc2`), so the converters are a table of renames plus transposes. Parameters are float32; `dtype` is the
compute dtype (float32 or bfloat16). Softmax and LayerNorm statistics always run in float32.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax import resize as resize_lib

Dtype = Any
# GroupViT `_init_weights`: Linear weights trunc_normal(std=.02), zero biases; LayerNorm (1, 0).
INIT = nn.initializers.truncated_normal(0.02)
Dense = functools.partial(nn.Dense, kernel_init=INIT, param_dtype=jnp.float32)


def layer_norm(eps: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
  """PyTorch-style LayerNorm: two-pass variance (torch arithmetic), eps from the config (official 1e-5)."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


def constrain_batch(x: jnp.ndarray) -> jnp.ndarray:
  """x [B, ...] with its leading axis constrained to the logical 'batch' axis.

  The sharded train step (train_step.jit_train_step) traces the model under a mesh and
  `nn.logical_axis_rules((('batch', batch mesh axes),))`, which pins every block's output to batch
  sharding; without those contexts this is the identity.

  Why: with FSDP the weights are split along a feature axis; without a constraint XLA's sharding
  propagation can carry that feature sharding into the activations and replicate the batch axis
  ("involuntary full rematerialization"), which multiplies activation memory by the number of devices.
  """
  return nn.with_logical_constraint(x, ('batch',) + (None,) * (x.ndim - 1))


REMAT_POLICIES = ('none', 'full', 'dots')


def remat(module_cls, policy: str, static_argnums: tuple[int, ...]):
  """`module_cls`, or its rematerialised form (`config.model.remat`), with the same param names.

  'none': keep every activation for the backward pass (fastest; the default).
  'full': keep only the block input, recompute the block in the backward pass (~1/3 more FLOPs).
  'dots': keep the outputs of the weight matmuls (`dots_with_no_batch_dims_saveable`), recompute the
    attention products, softmax, LayerNorm and GELU (few FLOPs, drops the [B, H, N, N] attention maps).
  `static_argnums` counts `self` as 0 (python bools such as `train` must be static).
  """
  if policy == 'none':
    return module_cls
  if policy == 'full':
    return nn.remat(module_cls, static_argnums=static_argnums)
  if policy == 'dots':
    return nn.remat(module_cls, static_argnums=static_argnums,
                    policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f'model.remat={policy!r}: expected one of {REMAT_POLICIES}')


def gelu_exact(x: jnp.ndarray) -> jnp.ndarray:
  """`nn.GELU()` of PyTorch: the erf form (Flax's default is the tanh approximation)."""
  return nn.gelu(x, approximate=False)


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          mask: jnp.ndarray | None = None) -> jnp.ndarray:
  """softmax(q k^T / sqrt(D)) v per head.

  Args:
    q: [B, N, H, D]; k, v: [B, S, H, D].
    mask: optional bool [B, S]; False keys get no attention.
  Returns:
    [B, N, H, D].
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bnhd,bshd->bhns', q, k).astype(jnp.float32) * scale
  if mask is not None:
    logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum('bhns,bshd->bnhd', probs, v)


class Mlp(nn.Module):
  """fc1 -> exact GELU -> fc2. `hidden` and `out` widths; PyTorch timm `Mlp`."""
  hidden: int
  out: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    x = Dense(self.hidden, dtype=self.dtype, name='fc1')(x)
    return Dense(self.out, dtype=self.dtype, name='fc2')(gelu_exact(x))


class Attention(nn.Module):
  """Multi-head self-attention with a fused `qkv` Dense [C, 3C].

  The 3C output columns are ordered [q; k; v], each (heads, head_dim) — the PyTorch
  `reshape(B, N, 3, H, C // H)` — so a checkpoint's qkv can be run with any head count dividing C
  (the official model runs DINO's 12-head ViT-B qkv as 8 heads of 96).
  """
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [B, N, C], mask bool [B, N] or None -> [B, N, C]."""
    b, n, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by num_heads={self.num_heads}')
    qkv = Dense(3 * c, use_bias=self.qkv_bias, dtype=self.dtype, name='qkv')(x)
    qkv = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads)
    out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask)
    return Dense(c, dtype=self.dtype, name='proj')(out.reshape(b, n, c))


class CrossAttention(nn.Module):
  """Multi-head attention with separate `q_proj`, `k_proj`, `v_proj` (queries attend to another set)."""
  num_heads: int
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, key: jnp.ndarray, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """query [B, N, C], key (= value) [B, S, C], mask bool [B, S] or None -> [B, N, C]."""
    b, n, c = query.shape
    s = key.shape[1]
    if c % self.num_heads:
      raise ValueError(f'width {c} is not divisible by num_heads={self.num_heads}')
    hd = c // self.num_heads
    dense = functools.partial(Dense, c, use_bias=self.qkv_bias, dtype=self.dtype)
    q = dense(name='q_proj')(query).reshape(b, n, self.num_heads, hd)
    k = dense(name='k_proj')(key).reshape(b, s, self.num_heads, hd)
    v = dense(name='v_proj')(key).reshape(b, s, self.num_heads, hd)
    out = dot_product_attention(q, k, v, mask)
    return Dense(c, dtype=self.dtype, name='proj')(out.reshape(b, n, c))


class DropPath(nn.Module):
  """Stochastic depth (timm): drop the whole residual branch per sample, scale survivors by 1/keep."""
  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Block(nn.Module):
  """Pre-norm transformer block: x + DP(Attn(LN1 x)); x + DP(Mlp(LN2 x)) (timm / GroupViT `AttnBlock`)."""
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-5
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False, mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """x [B, N, C], mask bool [B, N] or None -> [B, N, C]. `train` enables DropPath."""
    c = x.shape[-1]
    dp = DropPath(self.drop_path)
    y = Attention(self.num_heads, self.qkv_bias, self.dtype, name='attn')(
        layer_norm(self.ln_eps, self.dtype, 'norm1')(x), mask)
    x = x + dp(y, train)
    y = Mlp(int(c * self.mlp_ratio), c, self.dtype, name='mlp')(layer_norm(self.ln_eps, self.dtype, 'norm2')(x))
    return x + dp(y, train)


class CrossAttnBlock(nn.Module):
  """Post-norm cross-attention block (GroupViT `CrossAttnBlock(post_norm=True)`).

  y = q + Attn(q, kv); y = y + Mlp(LN2 y); y = LN_post y. No norm on the attention inputs (the callers
  normalise them). Used before the assignment in the binding module and as the decoder's cross-attention.
  """
  num_heads: int
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, key: jnp.ndarray) -> jnp.ndarray:
    """query [B, N, C], key [B, S, C] -> [B, N, C]."""
    c = query.shape[-1]
    x = query + CrossAttention(self.num_heads, self.qkv_bias, self.dtype, name='attn')(query, key)
    x = x + Mlp(int(c * self.mlp_ratio), c, self.dtype, name='mlp')(layer_norm(self.ln_eps, self.dtype, 'norm2')(x))
    return layer_norm(self.ln_eps, self.dtype, 'norm_post')(x)


class PatchEmbed(nn.Module):
  """Conv p x p, stride p (PyTorch `Conv2d(3, C, p, p)`): [B, H, W, 3] -> ([B, h*w, C], (h, w)).

  stem_channels: () is the authors' layout. (c1, ..., cn) puts n conv 3x3 / stride 2 + ReLU layers in front
  (an "early convolutions" stem, Xiao et al. 2021), and `proj` becomes a (p / 2^n) x (p / 2^n) conv: same
  grid, same token width. Not in the paper; configs/tiny.py uses it because a from-scratch ViT learns the
  synthetic textures faster with it (bench/RESULTS.md "End to end").
  """
  patch_size: int
  width: int
  dtype: Dtype = jnp.float32
  stem_channels: tuple = ()

  @nn.compact
  def __call__(self, images: jnp.ndarray):
    p = self.patch_size
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be [B, H, W, 3] (NHWC), got shape {images.shape}')
    if images.shape[1] < p or images.shape[2] < p:
      raise ValueError(f'image {images.shape[1]}x{images.shape[2]} is smaller than one {p}x{p} patch')
    q, r = divmod(p, 2 ** len(self.stem_channels))   # each stem layer halves the resolution
    if q < 1 or r:
      raise ValueError(f'patch_size {p} is not divisible by 2^{len(self.stem_channels)} '
                       f'(vision.stem_channels={tuple(self.stem_channels)})')
    x = images
    for i, ch in enumerate(self.stem_channels):
      x = nn.relu(nn.Conv(int(ch), (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), dtype=self.dtype,
                          name=f'stem_{i}')(x))
    x = nn.Conv(self.width, (q, q), strides=(q, q), padding='VALID', dtype=self.dtype, name='proj')(x)
    b, h, w, c = x.shape
    return x.reshape(b, h * w, c), (h, w)


def resize_pos_embed(pos_embed: jnp.ndarray, grid: tuple[int, int]) -> jnp.ndarray:
  """Learnable [L, C] position embedding on a square native grid -> [h*w, C] for the patch grid `grid`.

  Bicubic (a = -0.75, align_corners=False), exactly torch `F.interpolate` as in the official
  `interpolate_pos_encoding`; the identity when the grid is the native one.
  """
  n, c = pos_embed.shape
  side = int(round(np.sqrt(n)))
  if side * side != n:
    raise ValueError(f'pos_embed has {n} positions, not a square grid')
  if tuple(grid) == (side, side):
    return pos_embed
  out = resize_lib.resize(pos_embed.reshape(side, side, c), tuple(grid), 'bicubic', False,
                          spatial_axes=(0, 1))
  return out.reshape(grid[0] * grid[1], c)
