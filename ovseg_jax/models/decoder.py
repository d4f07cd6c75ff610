"""EntityDecoder: the masked-entity-completion block (paper Eq. 8; docs/paper_vs_authors.md Q9: the authors'
`MultimodalGroupingBlock` with one block; their unused AssignAttention is not built).

  t = LN_tokens(question tokens)          [B, T, C]
  v = LN_x(visual groups)                 [B, K, C]
  p = CrossAttnBlock(t, v)                post-norm: queries = word tokens, keys/values = groups
  n = Block(p)                            pre-norm self-attention over the T word positions
  n = LN_new_x(n + p)                     extra residual, final LN
  answer_vec = n[:, 0]                    position 0 ([CLS] of the masked caption)

Param tree: norm_tokens, norm_x, cross_attn (= their pre_assign_attn: attn/{q,k,v}_proj, attn/proj, norm2,
mlp, norm_post), self_attn (= their post_attn: norm1, attn/{qkv, proj}, norm2, mlp), norm_new_x.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovseg_jax.models import vit


class EntityDecoder(nn.Module):
  """`attend_padding=True` reproduces the official quirk (the question padding mask is ignored)."""
  num_heads: int
  mlp_ratio: float = 4.0
  ln_eps: float = 1e-5
  attend_padding: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, visual: jnp.ndarray, question_feat: jnp.ndarray, question_mask: jnp.ndarray | None,
               train: bool = False) -> jnp.ndarray:
    """visual [B, K, C], question_feat [B, T, C], question_mask [B, T] (1 = token) -> tokens [B, T, C]."""
    ln = lambda name: vit.layer_norm(self.ln_eps, self.dtype, name)  # noqa: E731
    t = vit.constrain_batch(ln('norm_tokens')(question_feat.astype(self.dtype)))
    v = vit.constrain_batch(ln('norm_x')(visual.astype(self.dtype)))
    p = vit.CrossAttnBlock(self.num_heads, self.mlp_ratio, True, self.ln_eps, self.dtype, name='cross_attn')(t, v)
    mask = None if (self.attend_padding or question_mask is None) else question_mask.astype(bool)
    n = vit.Block(self.num_heads, self.mlp_ratio, True, self.ln_eps, 0.0, self.dtype, name='self_attn')(
        p, train, mask)
    return vit.constrain_batch(ln('norm_new_x')(n + p))
