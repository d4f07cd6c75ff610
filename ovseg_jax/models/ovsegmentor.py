"""OVSegmentor, the top module (DEVELOPERS.md "Interfaces"; paper Sec. 3.1; docs/paper_vs_authors.md Q1-Q10).

Variables {'params', 'batch_stats'}; rng streams 'dropout' (BERT dropout, drop-path) and 'gumbel'.
Param tree top level:
  img_encoder       VisualEncoder (models/visual.py)
  text_encoder      BertModel (models/bert.py, HF names)
  img_projector, text_projector, bridge_projector   ProjectionHead (models/heads.py; batch_stats */bn/{mean,var})
  patch_projector   ProjectionHead on the stage-1 patch tokens, only with config.patch_head (not in the paper)
  decoder           EntityDecoder (models/decoder.py)
  logit_scale       scalar, init log(1 / temperature_init); used as min(exp(.), max_logit_scale) (Eq. 7)
"""

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovseg_jax.models import bert as bert_lib
from ovseg_jax.models import decoder as decoder_lib
from ovseg_jax.models import heads
from ovseg_jax.models import visual as visual_lib


class OVSegmentor(nn.Module):
  """`config` is `config.model` (a FrozenConfigDict)."""
  config: ml_collections.FrozenConfigDict

  def setup(self):
    c = self.config
    dtype = visual_lib.compute_dtype(c)
    self.img_encoder = visual_lib.VisualEncoder(c)
    self.text_encoder = bert_lib.BertModel(c.text, dtype=dtype, remat=c.remat)
    proj = (c.proj.hidden, c.proj.out, c.proj.bn_momentum, c.proj.bn_eps, dtype)
    self.img_projector = heads.ProjectionHead(*proj)
    self.text_projector = heads.ProjectionHead(*proj)
    self.bridge_projector = heads.ProjectionHead(*proj)
    if c.patch_head:
      self.patch_projector = heads.ProjectionHead(*proj)
    self.decoder = decoder_lib.EntityDecoder(c.decoder.num_heads, c.decoder.mlp_ratio, c.vision.ln_eps,
                                             c.decoder.attend_padding, dtype)
    init = float(np.log(1.0 / c.temperature_init))
    self.logit_scale = self.param('logit_scale', lambda _: jnp.asarray(init, jnp.float32))

  def encode_image(self, images: jnp.ndarray, train: bool = False, deterministic: bool = False) -> dict:
    """images [B, H, W, 3] -> image_x [B, P], image_feat [B, K, P], image_x_before_proj [B, C],
    image_feat_before_proj [B, K, C], soft / hard [B, K, L], q [B, K, C], k [B, L, C], patches [B, L, C],
    grid (h, w), and with config.patch_head patch_x [B, L, P] (the projected patch tokens).

    The projector runs on the pooled vector first, then per group token (the official order, which
    matters for the BN running statistics in train mode).
    """
    out = dict(self.img_encoder(images, train, deterministic))
    groups = out.pop('x')
    pooled = jnp.mean(groups, axis=1)  # z^I: mean over the K groups
    out['image_x_before_proj'] = pooled
    out['image_feat_before_proj'] = groups
    out['image_x'] = self.img_projector(pooled, train)
    out['image_feat'] = self.img_projector(groups, train)
    if self.config.patch_head:
      out['patch_x'] = self.patch_projector(out['patches'], train)
    return out

  def encode_text(self, ids: jnp.ndarray, mask: jnp.ndarray, train: bool = False,
                  project_tokens: bool = False, deterministic: bool = False,
                  real_token_stats: bool = False) -> dict:
    """ids, mask int [B, T] -> text_x [B, P] (projected [CLS]), text_x_before_proj [B, C],
    text_feat_before_proj [B, T, C], and text_feat_after_proj [B, T, P] when `project_tokens`
    (`real_token_stats`: its BN statistics over the positions where mask is 1, not all B*T; text_buckets.py).

    `train`: BERT dropout on (the authors keep BERT in train mode) and BN on batch statistics;
    `deterministic` turns the dropout off but keeps the BN train behaviour.
    """
    tokens, _ = self.text_encoder(ids, mask, None, train and not deterministic)
    cls = tokens[:, 0]
    out = dict(text_x_before_proj=cls, text_feat_before_proj=tokens, text_x=self.text_projector(cls, train))
    if project_tokens:
      out['text_feat_after_proj'] = self.text_projector(tokens, train, mask > 0 if real_token_stats else None)
    return out

  def decode_entity(self, visual: jnp.ndarray, question_feat: jnp.ndarray, question_mask: jnp.ndarray,
                    train: bool = False) -> dict:
    """visual [B, K, C] (image_feat_before_proj), question_feat [B, T, C], question_mask [B, T] ->
    tokens [B, T, C], answer_vec [B, C] (position 0), question_out [B, P] (bridge projector)."""
    tokens = self.decoder(visual, question_feat, question_mask, train)
    answer_vec = tokens[:, 0]
    return dict(tokens=tokens, answer_vec=answer_vec, question_out=self.bridge_projector(answer_vec, train))

  def logit_scale_exp(self) -> jnp.ndarray:
    """min(exp(logit_scale), max_logit_scale): the shared InfoNCE temperature (official clamp at 100)."""
    return jnp.minimum(jnp.exp(self.logit_scale), self.config.max_logit_scale)

  def __call__(self, images: jnp.ndarray, ids: jnp.ndarray, mask: jnp.ndarray, train: bool = False) -> dict:
    """Touches every submodule (used by `init`)."""
    img = self.encode_image(images, train)
    txt = self.encode_text(ids, mask, train, project_tokens=True)
    dec = self.decode_entity(img['image_feat_before_proj'], txt['text_feat_before_proj'], mask, train)
    return dict(image=img, text=txt, decoder=dec, logit_scale=self.logit_scale_exp())
