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

`SlotBinding` is the slot-attention form (Locatello et al. 2020, which the paper cites for its binding; not the
authors' code, docs/paper_vs_authors.md Q32): slots drawn per image from a learned Gaussian, refined by a few
rounds of Eq. 4 (softmax over the slots) + a GRU + an MLP, then Eq. 5 pools each slot's own patches.
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


def gumbel_hard(raw: jnp.ndarray, tau: float, rng: jax.Array, axis: int = 1) -> jnp.ndarray:
  """Straight-through one-hot of softmax((raw + Gumbel noise) / tau) along `axis` (the authors' training map)."""
  gumbel = jax.random.gumbel(rng, raw.shape, jnp.float32)
  return straight_through_hard(jax.nn.softmax((raw + gumbel) / tau, axis=axis), axis=axis)


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
        attn = gumbel_hard(raw, self.tau, self.make_rng('gumbel'))
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


class SlotBinding(nn.Module):
  """Slot-attention binding: L patch tokens -> K slots (model.binding.mode='slot'; not in the authors' code).

    x      = LN_x(patches)                                  [B, L, C]   k = k_proj(x), v = v_proj(x)
    s_0    = mu + sigma * eps,  eps ~ N(0, I) per image      [B, K, C]   (eval / deterministic: s_0 = mu)
    t = 1..T:
      A_t  = softmax_K(<q_proj(LN_s s_{t-1}), k> / sqrt(C))  [B, K, L]   Eq. 4 (or cosine x learned scale)
      u_t  = (A_t / sum_L A_t) v                              [B, K, C]   weighted mean of each slot's patches
      s_t  = GRU(s_{t-1}, u_t);  s_t += Mlp(LN_mlp s_t)
    A     = softmax_K(<q_proj(LN_s s_T), k> ...)             the assignment Eq. 1 and the mask loss read
    z     = proj((A~ / (sum_L A~ + 1)) v) + s_T ;  out = z + Mlp(LN_new_x z)   Eq. 5 on the hard map A~, and
            Eq. 6's residual with y = s_T (the authors' y attended to every patch; s_T is a mean of the
            patches the slot won most, weights normalised over L)
    v is v_proj of the ViT tokens, or of `values` (binding.slot_values='local': the patch embeddings, which see
    only their own patch, so what a slot pools is its patches' own content, not what the ViT blocks spread
    from other patches).

  Attributes:
    num_slots: K.
    iters: T refinement rounds before the final map (each an Eq. 4 step, a GRU and an MLP).
    cosine: cosine attention with a learned inverse temperature (init 10) instead of q.k / sqrt(C).
    assignment: 'gumbel_hard' adds Gumbel noise to the final map in training before the straight-through
      argmax (as the authors' GroupingBlock): a patch then visits other slots, so each gets gradients.
      'soft' adds no noise; Eq. 5 still pools with the straight-through argmax of A (the map Eq. 1 reads).
  """
  num_slots: int
  iters: int = 3
  cosine: bool = False
  assignment: str = 'gumbel_hard'
  tau: float = 1.0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, values: jnp.ndarray | None = None, train: bool = False,
               deterministic: bool = False) -> dict:
    """x [B, L, C] patch tokens (the keys of Eq. 4) -> the dict of `GroupingBlock` (`x` [B, K, C], `soft` /
    `hard` [B, K, L], `q`, `k`, `assign_query`, `assign_key`) plus `slots_init` [B, K, C] (s_0).

    values: [B, L, C] tokens the slots are made of (v = v_proj of their LayerNorm); None = x.
    """
    b, _, c = x.shape
    ln = lambda name: vit.layer_norm(self.ln_eps, self.dtype, name)  # noqa: E731
    dense = lambda name: vit.Dense(c, use_bias=self.qkv_bias, dtype=self.dtype, name=name)  # noqa: E731
    x = ln('norm_x')(x)
    k = dense('k_proj')(x)
    v = dense('v_proj')(x if values is None else ln('norm_values')(values))
    q_proj, norm_slots = dense('q_proj'), ln('norm_slots')
    gru = nn.GRUCell(c, dtype=self.dtype, param_dtype=jnp.float32, name='gru')
    mlp, norm_mlp = vit.Mlp(int(self.mlp_ratio * c), c, self.dtype, name='mlp_slots'), ln('norm_mlp')
    mu = self.param('slots_mu', nn.initializers.normal(1.0), (self.num_slots, c), jnp.float32)
    log_sigma = self.param('slots_log_sigma', nn.initializers.zeros, (self.num_slots, c), jnp.float32)
    slots = jnp.broadcast_to(mu, (b,) + mu.shape)
    if train and not deterministic:  # a fresh draw per image breaks the symmetry between the slots
      eps = jax.random.normal(self.make_rng('gumbel'), slots.shape, jnp.float32)
      slots = slots + jnp.exp(log_sigma) * eps
    slots = slots.astype(self.dtype)
    slots_init = slots
    if self.cosine:
      log_scale = self.param('log_scale', lambda _: jnp.asarray(jnp.log(10.0), jnp.float32))
      k_unit = k / (jnp.linalg.norm(k, axis=-1, keepdims=True) + 1e-6)

    def attend(s):
      q = q_proj(norm_slots(s))
      if self.cosine:
        q_unit = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + 1e-6)
        raw = jnp.einsum('bkc,blc->bkl', q_unit, k_unit).astype(jnp.float32) * jnp.exp(log_scale)
      else:
        raw = jnp.einsum('bkc,blc->bkl', q, k).astype(jnp.float32) * (c ** -0.5)
      return q, raw, jax.nn.softmax(raw, axis=1)   # softmax over the slots: they compete for each patch

    if self.assignment not in ('gumbel_hard', 'soft'):
      raise ValueError(f"binding.assignment={self.assignment!r}: expected 'gumbel_hard' or 'soft'")
    for _ in range(self.iters):
      _, _, attn = attend(slots)
      weights = attn / (jnp.sum(attn, axis=-1, keepdims=True) + 1e-8)
      updates = jnp.einsum('bkl,blc->bkc', weights.astype(v.dtype), v)
      slots, _ = gru(slots, updates)
      slots = slots + mlp(norm_mlp(slots))
    q, raw, soft = attend(slots)
    if self.assignment == 'gumbel_hard' and train and not deterministic:
      hard = gumbel_hard(raw, self.tau, self.make_rng('gumbel'))
    else:
      hard = straight_through_hard(soft, axis=1)
    pooled = jnp.einsum('bkl,blc->bkc', (hard / (jnp.sum(hard, axis=-1, keepdims=True) + 1.0)).astype(v.dtype), v)
    out = dense('proj')(pooled) + slots   # Eq. 6's residual with y = s_T
    out = out + vit.Mlp(int(self.mlp_ratio * c), c, self.dtype, name='mlp_channels')(ln('norm_new_x')(out))
    return dict(x=out, soft=soft, hard=hard, q=q, k=k, assign_query=slots, assign_key=x, slots_init=slots_init)
