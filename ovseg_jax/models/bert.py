"""BERT text encoder in flax.linen, weight-compatible with HF transformers' `BertModel` (docs/paper_vs_authors.md Q5).

The authors run `AutoModel.from_pretrained('bert-base-uncased')` and take `last_hidden_state[:, 0]` ([CLS]) as the
sentence embedding and all of `last_hidden_state` as token features; the pooler exists (its weights are in the
checkpoint and in the 109,482,240 parameter count) but its output is unused.

Parameter tree (submodule names mirror the HF state-dict keys, see `ovseg_jax/convert/bert.py`):
    embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding   [V, C] [P, C] [2, C]
    embeddings/LayerNorm/{scale,bias}
    encoder/layer_N/attention/self/{query,key,value}/{kernel [C, C], bias}
    encoder/layer_N/attention/output/dense/{kernel, bias},  .../attention/output/LayerNorm/{scale, bias}
    encoder/layer_N/intermediate/dense/{kernel [C, I], bias}
    encoder/layer_N/output/dense/{kernel [I, C], bias},     .../output/LayerNorm/{scale, bias}
    pooler/dense/{kernel, bias}
Kernels are `[in, out]` (the transpose of torch's Linear weight). Params are float32; `dtype` is the compute dtype.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ovseg_jax.models import vit

# HF BertPreTrainedModel._init_weights: normal(0, initializer_range=0.02), zero biases, unit LN scales.
_INIT = nn.initializers.normal(stddev=0.02)


def _dense(features: int, name: str, dtype) -> nn.Dense:
  return nn.Dense(features, dtype=dtype, kernel_init=_INIT, bias_init=nn.initializers.zeros, name=name)


class BertSelfAttention(nn.Module):
  """Multi-head scaled dot-product self-attention (HF `BertSelfAttention`, eager path).

  x [B, T, C], mask_bias [B, 1, 1, T] float32 (0 for tokens, finfo.min for padding) -> context [B, T, C].
  softmax(Q K^T / sqrt(D) + mask_bias) V, with D = C / heads; logits and softmax run in float32.
  """
  num_heads: int
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train: bool = False):
    b, t, c = x.shape
    if c % self.num_heads:
      raise ValueError(f'text width {c} is not divisible by num_heads={self.num_heads}')
    d = c // self.num_heads
    q, k, v = (_dense(c, n, self.dtype)(x).reshape(b, t, self.num_heads, d) for n in ('query', 'key', 'value'))
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(jnp.float32(d))
    probs = nn.softmax(logits + mask_bias, axis=-1)
    probs = nn.Dropout(self.dropout, deterministic=not train)(probs).astype(self.dtype)
    return jnp.einsum('bhqk,bkhd->bqhd', probs, v).reshape(b, t, c)


class BertAddNorm(nn.Module):
  """`LayerNorm(residual + Dropout(Dense(x)))` (HF `BertSelfOutput` / `BertOutput`): post-LN sub-layer exit.

  x [B, T, I], residual [B, T, C] -> [B, T, C].
  """
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, residual, train: bool = False):
    y = _dense(residual.shape[-1], 'dense', self.dtype)(x)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm')(y + residual)


class BertAttention(nn.Module):
  """Self-attention + output sub-layer. x [B, T, C], mask_bias [B, 1, 1, T] -> [B, T, C]."""
  num_heads: int
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train: bool = False):
    ctx = BertSelfAttention(self.num_heads, self.dropout, self.dtype, name='self')(x, mask_bias, train)
    return BertAddNorm(self.ln_eps, self.dropout, self.dtype, name='output')(ctx, x, train)


class BertIntermediate(nn.Module):
  """Dense C -> I with exact (erf) GELU, as HF `hidden_act='gelu'`. x [B, T, C] -> [B, T, I]."""
  intermediate: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return nn.gelu(_dense(self.intermediate, 'dense', self.dtype)(x), approximate=False)


class BertLayer(nn.Module):
  """One post-LN transformer layer (HF `BertLayer`). x [B, T, C], mask_bias [B, 1, 1, T] -> [B, T, C]."""
  num_heads: int
  intermediate: int
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_bias, train: bool = False):
    x = BertAttention(self.num_heads, self.ln_eps, self.dropout, self.dtype, name='attention')(x, mask_bias, train)
    h = BertIntermediate(self.intermediate, self.dtype, name='intermediate')(x)
    return BertAddNorm(self.ln_eps, self.dropout, self.dtype, name='output')(h, x, train)


class BertEncoder(nn.Module):
  """`num_layers` BertLayers named layer_0 ... layer_{N-1}. x [B, T, C] -> [B, T, C]."""
  num_layers: int
  num_heads: int
  intermediate: int
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, x, mask_bias, train: bool = False):
    layer_cls = vit.remat(BertLayer, self.remat, static_argnums=(3,))  # (self, x, mask_bias, train)
    for i in range(self.num_layers):
      x = vit.constrain_batch(layer_cls(self.num_heads, self.intermediate, self.ln_eps, self.dropout, self.dtype,
                                        name=f'layer_{i}')(x, mask_bias, train))
    return x


class BertEmbeddings(nn.Module):
  """word + absolute position (0..T-1, padding included, as HF) + token type, then LayerNorm and dropout.

  input_ids, token_type_ids int [B, T] -> [B, T, C]. The sum runs in float32 (as HF); LN casts to `dtype`.
  """
  vocab_size: int
  width: int
  max_position: int
  type_vocab: int
  ln_eps: float
  dropout: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, train: bool = False):
    t = input_ids.shape[1]
    if t > self.max_position:
      raise ValueError(f'text length {t} exceeds max_position={self.max_position} of the position embeddings')
    embed = lambda n, name: nn.Embed(n, self.width, embedding_init=_INIT, name=name)  # noqa: E731
    x = (embed(self.vocab_size, 'word_embeddings')(input_ids)
         + embed(self.max_position, 'position_embeddings')(jnp.arange(t)[None])
         + embed(self.type_vocab, 'token_type_embeddings')(token_type_ids))
    x = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, name='LayerNorm')(x)
    return nn.Dropout(self.dropout, deterministic=not train)(x)


class BertPooler(nn.Module):
  """tanh(Dense(x[:, 0])) on [CLS] (HF `BertPooler`). x [B, T, C] -> [B, C]. Unused by OVSegmentor."""
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(_dense(x.shape[-1], 'dense', self.dtype)(x[:, 0]))


class BertModel(nn.Module):
  """HF-compatible BERT encoder.

  Attributes:
    config: `config.model.text` (vocab_size, width, num_layers, num_heads, intermediate, max_position,
      type_vocab, ln_eps, dropout, max_length); a ConfigDict or FrozenConfigDict.
    dtype: compute dtype (jnp.float32, jnp.bfloat16 or their names, e.g. `config.model.dtype`); params stay
      float32, attention logits / softmax and LayerNorm statistics are float32.
    remat: rematerialisation of each layer in the backward pass ('none' | 'full' | 'dots', see
      `vit.remat`; `config.model.remat`). Param names do not change.
  """
  config: Any
  dtype: Any = jnp.float32
  remat: str = 'none'

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None, train: bool = False):
    """input_ids, attention_mask (1 = token, 0 = padding), token_type_ids (default 0): int [B, T].

    Returns (last_hidden_state [B, T, C], pooled [B, C]) in `dtype`. Dropout (rate `config.dropout`, on the
    embeddings, attention probabilities and both sub-layer outputs) is active only with train=True and then
    draws from the 'dropout' rng stream.
    """
    cfg, dtype = self.config, jnp.dtype(self.dtype)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    # HF get_extended_attention_mask: (1 - mask) * finfo(float32).min, added to the attention logits.
    mask_bias = (1.0 - attention_mask.astype(jnp.float32))[:, None, None, :] * jnp.finfo(jnp.float32).min
    x = BertEmbeddings(cfg.vocab_size, cfg.width, cfg.max_position, cfg.type_vocab, cfg.ln_eps, cfg.dropout,
                       dtype, name='embeddings')(input_ids, token_type_ids, train)
    x = vit.constrain_batch(x)  # the embedding lookup would otherwise inherit the table's FSDP sharding
    x = BertEncoder(cfg.num_layers, cfg.num_heads, cfg.intermediate, cfg.ln_eps, cfg.dropout, dtype,
                    self.remat, name='encoder')(x, mask_bias, train)
    return x, BertPooler(dtype, name='pooler')(x)
