"""The binding module: GroupViT's GroupingBlock, generalised (paper Eq. 3-6; docs/paper_vs_authors.md Q1).

  g  = LN_tokens(group tokens)                       [B, K_in, C]
  x  = LN_x(patch tokens)                            [B, L, C]
  g  = LN_post_tokens(TokenMlp(g^T)^T)               [B, K_out, C]  (token mixing K_in -> K_out; skipped if equal)
  y  = CrossAttnBlock(g, x)                          post-norm: y = g + Attn(g, x); y += Mlp(LN2 y); y = LN_post y
  A  = softmax_K(q_proj(y) k_proj(x)^T / sqrt(C))    [B, K_out, L]  Eq. 4, softmax over the GROUP axis
  A~ = hard(A) (train: Gumbel + straight-through; eval: argmax one-hot) or A ('soft' assignment)
  z  = proj((A~ / (sum_L A~ + 1)) v_proj(x)) + y     Eq. 5-6, with the official "+1" in the normaliser
  out = z + Mlp_channels(LN_new_x z)

Param names follow the authors' `GroupingBlock` (norm_tokens, mlp_inter, norm_post_tokens, norm_x,
pre_assign_attn, assign, norm_new_x, mlp_channels).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ovseg_jax.models import vit

Dtype = Any


def straight_through_hard(y_soft: jnp.ndarray, axis: int) -> jnp.ndarray:
  """One-hot of argmax(y_soft) along `axis` in the forward pass, gradient of y_soft in the backward pass.

  y_hard - stop_gradient(y_soft) + y_soft (PyTorch `hard_softmax` / `gumbel_softmax(hard=True)`).
  """
  index = jnp.argmax(y_soft, axis=axis)
  y_hard = jax.nn.one_hot(index, y_soft.shape[axis], axis=axis, dtype=y_soft.dtype)
  return y_hard - jax.lax.stop_gradient(y_soft) + y_soft


class AssignAttention(nn.Module):
  """Single-head assignment of the L patches to the K groups (paper Eq. 4-5).

  Returns (out [B, K, C], soft [B, K, L], hard [B, K, L], q [B, K, C], k [B, L, C]); `hard` is the map used
  for the features (straight-through one-hot, or the soft map itself in 'soft' mode).
  """
  assignment: str = 'gumbel_hard'
  tau: float = 1.0
  qkv_bias: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, query: jnp.ndarray, key: jnp.ndarray, train: bool = False,
               deterministic: bool = False):
    c = query.shape[-1]
    dense = lambda name: vit.Dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
    q = dense('q_proj')(query)
    k = dense('k_proj')(key)
    v = dense('v_proj')(key)
    raw = jnp.einsum('bkc,blc->bkl', q, k).astype(jnp.float32) * (c ** -0.5)  # [B, K, L]
    soft = jax.nn.softmax(raw, axis=1)  # Eq. 4: softmax over the groups
    if self.assignment == 'soft':
      attn = soft
    elif self.assignment == 'gumbel_hard':
      if train and not deterministic:
        gumbel = jax.random.gumbel(self.make_rng('gumbel'), raw.shape, jnp.float32)
        attn = straight_through_hard(jax.nn.softmax((raw + gumbel) / self.tau, axis=1), axis=1)
      elif train:
        attn = straight_through_hard(jax.nn.softmax(raw / self.tau, axis=1), axis=1)
      else:
        attn = straight_through_hard(soft, axis=1)
    else:
      raise ValueError(f"binding.assignment={self.assignment!r}: expected 'gumbel_hard' or 'soft'")
    weights = attn / (jnp.sum(attn, axis=-1, keepdims=True) + 1.0)  # Eq. 5, official +1
    out = jnp.einsum('bkl,blc->bkc', weights.astype(v.dtype), v)
    out = vit.Dense(c, dtype=self.dtype, name='proj')(out)
    return out, soft, attn, q, k


class GroupingBlock(nn.Module):
  """Binding module: K_in group tokens + L patch tokens -> K_out group tokens (paper Eq. 3-6).

  Attributes:
    num_output_groups: K_out.
    num_heads: heads of the pre-assignment cross-attention block.
    assignment: 'gumbel_hard' (official) | 'soft' (paper).
    token_mlp_ratio: hidden width of the token-mixing MLP as a fraction of the channel width C.
  """
  num_output_groups: int
  num_heads: int
  assignment: str = 'gumbel_hard'
  tau: float = 1.0
  token_mlp_ratio: float = 0.5
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, group_tokens: jnp.ndarray, train: bool = False,
               deterministic: bool = False) -> dict:
    """x [B, L, C] patch tokens, group_tokens [B, K_in, C].

    Returns dict: `x` new group tokens [B, K_out, C], `soft` / `hard` [B, K_out, L], `q` [B, K_out, C]
    (q_proj of the assignment queries), `k` [B, L, C] (k_proj of LN_x patches), `assign_query` [B, K_out, C],
    `assign_key` [B, L, C] (the assignment inputs).
    `train` turns on Gumbel noise unless `deterministic` (then argmax straight-through, noise-free).
    """
    c = x.shape[-1]
    k_in = group_tokens.shape[1]
    ln = lambda name: vit.layer_norm(self.ln_eps, self.dtype, name)  # noqa: E731
    g = ln('norm_tokens')(group_tokens)
    x = ln('norm_x')(x)
    if k_in != self.num_output_groups:
      # token-mixing MLP over the token axis: [B, C, K_in] -> [B, C, K_out]
      g = vit.Mlp(int(self.token_mlp_ratio * c), self.num_output_groups, self.dtype, name='mlp_inter')(
          jnp.swapaxes(g, 1, 2))
      g = jnp.swapaxes(g, 1, 2)
      g = ln('norm_post_tokens')(g)
    y = vit.CrossAttnBlock(self.num_heads, self.mlp_ratio, self.qkv_bias, self.ln_eps, self.dtype,
                           name='pre_assign_attn')(g, x)
    out, soft, hard, q, k = AssignAttention(self.assignment, self.tau, self.qkv_bias, self.dtype,
                                            name='assign')(y, x, train, deterministic)
    out = out + y  # Eq. 6 residual
    out = out + vit.Mlp(int(self.mlp_ratio * c), c, self.dtype, name='mlp_channels')(ln('norm_new_x')(out))
    return dict(x=out, soft=soft, hard=hard, q=q, k=k, assign_query=y, assign_key=x)
