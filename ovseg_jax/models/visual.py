"""VisualEncoder: patch embed + pos embed, [patches; K_in group tokens] through stage-1 blocks, the binding
module (K_in -> K_out groups), stage-2 blocks on the K_out groups, final LayerNorm (paper Eq. 2;
docs/paper_vs_authors.md Q2).

Param tree (names are the converters' contract):
  patch_embed/proj/{kernel [p,p,3,C], bias}     pos_embed [L0, C] (L0 = (img_size/p)^2, no cls position)
  group_token [K_in, C]                         stage1_block{i}/..., binding/..., stage2_block{j}/..., norm
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovseg_jax.models import binding as binding_lib
from ovseg_jax.models import vit


def compute_dtype(model_config) -> jnp.dtype:
  name = model_config.dtype
  if name not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype={name!r}: expected 'float32' or 'bfloat16'")
  return jnp.dtype(name)


class VisualEncoder(nn.Module):
  """The image encoder. `config` is the whole `config.model` (uses `.vision`, `.binding`, `.dtype`)."""
  config: ml_collections.FrozenConfigDict

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False, deterministic: bool = False) -> dict:
    """images [B, H, W, 3] normalised NHWC.

    Returns dict: `x` [B, K_out, C] groups after the final LN, `soft` / `hard` [B, K_out, L] (L = h*w,
    row-major), `q` [B, K_out, C], `k` [B, L, C], `assign_query`, `assign_key`, `slots_init` [B, K, C] (the
    group tokens after stage 1, or the drawn slots s_0 in 'slot' mode), `patches` [B, L, C] (the stage-1
    patch tokens, the binding's input), `grid` = (h, w) python ints.
    `train` enables drop-path and Gumbel noise; `deterministic` turns both off while keeping train mode.
    """
    vc, bc = self.config.vision, self.config.binding
    dtype = compute_dtype(self.config)
    width, d1, d2 = vc.width, vc.depths[0], vc.depths[1]
    side = vc.img_size // vc.patch_size
    stochastic = train and not deterministic
    rates = np.linspace(0.0, vc.drop_path_rate, d1 + d2)
    block_cls = vit.remat(vit.Block, self.config.remat, static_argnums=(2,))  # (self, x, train)
    block = lambda i, name: block_cls(vc.num_heads, vc.mlp_ratio, vc.qkv_bias, vc.ln_eps, float(rates[i]),  # noqa: E731
                                      dtype, name=name)

    x, grid = vit.PatchEmbed(vc.patch_size, width, dtype, tuple(vc.stem_channels),
                             name='patch_embed')(images.astype(dtype))
    pos = self.param('pos_embed', vit.INIT, (side * side, width), jnp.float32)
    x = x + vit.resize_pos_embed(pos, grid).astype(dtype)[None]
    b, num_patches = x.shape[0], x.shape[1]

    if bc.mode == 'slot':  # slots are drawn inside the binding: no group tokens in the stage-1 blocks
      if bc.slot_values not in ('local', 'context'):
        raise ValueError(f"model.binding.slot_values={bc.slot_values!r}: expected 'local' or 'context'")
      local = x - vit.resize_pos_embed(pos, grid).astype(dtype)[None]   # the patch embeddings alone
      for i in range(d1):
        x = vit.constrain_batch(block(i, f'stage1_block{i}')(x, stochastic))
      out = binding_lib.SlotBinding(bc.num_output_groups, bc.slot_iters, bc.slot_cosine, bc.assignment,
                                    bc.gumbel_tau, vc.mlp_ratio, vc.qkv_bias, vc.ln_eps, dtype, name='binding')(
                                        x, local if bc.slot_values == 'local' else None, train, deterministic)
      patches = x
    else:
      tokens = self.param('group_token', vit.INIT, (bc.num_group_tokens, width), jnp.float32)
      x = vit.constrain_batch(jnp.concatenate(
          [x, jnp.broadcast_to(tokens.astype(dtype), (b,) + tokens.shape)], axis=1))
      for i in range(d1):
        x = vit.constrain_batch(block(i, f'stage1_block{i}')(x, stochastic))
      x, groups = x[:, :num_patches], x[:, num_patches:]
      patches = x
      out = binding_lib.GroupingBlock(
          bc.num_output_groups, vc.num_heads, bc.assignment, bc.gumbel_tau, bc.token_mlp_ratio, vc.mlp_ratio,
          vc.qkv_bias, vc.ln_eps, dtype, name='binding')(x, groups, train, deterministic)
      out['slots_init'] = groups   # the group tokens after stage 1 (their cosine is a health signal)
    g = out.pop('x')
    for j in range(d2):
      g = vit.constrain_batch(block(d1 + j, f'stage2_block{j}')(g, stochastic))
    g = vit.layer_norm(vc.ln_eps, dtype, 'norm')(g)
    return dict(x=g, grid=grid, patches=patches, **out)
