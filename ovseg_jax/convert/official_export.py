"""OVSegmentor variables -> the authors' checkpoint `{'model': state_dict, 'config': ..., 'epoch', 'optimizer',
'lr_scheduler'}`: the inverse of official.py, used by `python -m ovseg_jax.export --format official`.

`official_layout(model_config)` lists every key of the authors' stage-2 model state dict in their order, with
its shape and dtype, as their released checkpoints have them (the quirk table docs/paper_vs_authors.md, row Q31;
the tests compare every key, shape and dtype at ViT-B/BERT-base sizes). Each key is filled by walking
official.py's import mapping backwards, so the mapping itself exists once:
  non-text keys: official.target_shape(key, shape) names our variable (the same `_MODULE_RENAMES` /
                 `_TOP_RENAMES` the importer uses) and official.to_official inverts the leaf transform
                 (the importer's `_WEIGHT_LAYOUTS` table: Linear / Conv1d / Conv2d transposes, group_token
                 [K,C] -> [1,K,C], logit_scale 0-dim);
  text keys:     `text_encoder.transformer.` + bert.hf_key(path) (the rule the BERT importer uses), kernels
                 transposed back to [out, in].
Keys our model has no variable for are written with a fixed fill (FILLS); the authors' `load_state_dict` is
then complete, and none of the fills is read by their forward pass:
  logit_scale_mask                           log(1 / temperature_init), their init value (unused; quirk Q8)
  multimodal_groupingblock.blocks.0.assign.*  zeros (their MEC decoder builds an AssignAttention it never
                                             calls, quirk Q9; ours has none)
  *.num_batches_tracked                      0 (int64; flax BatchNorm keeps no counter and PyTorch BN with
                                             momentum=0.1 never reads it)
`img_encoder_momentum.*` is the EMA teacher when one is given, else a copy of the online `img_encoder` (what
their stage-2 loader, load_checkpoint_stage1, starts from). Every one of our variables must land in exactly one
key, and every shape is checked: an architecture the authors' code cannot express (binding.mode='paper', no
qkv bias) is a ValueError, not a silently partial file.
"""

import collections
import json
import re

import numpy as np

from ovseg_jax.convert import bert as bert_convert
from ovseg_jax.convert import official

TEXT_PREFIX = official.TEXT_PREFIX
FILLS = (  # (regex on the authors' key, fill(shape, model_config)); see the module doc
    (r'logit_scale_mask', lambda shape, m: np.asarray(np.log(1.0 / m.temperature_init), np.float32)),
    (r'multimodal_groupingblock\.blocks\.0\.assign\..*', lambda shape, m: np.zeros(shape, np.float32)),
    (r'.*\.num_batches_tracked', lambda shape, m: np.zeros(shape, np.int64)),
)


def _linear(name, out, inp):
  return [(f'{name}.weight', (out, inp)), (f'{name}.bias', (out,))]


def _norm(name, c):
  return [(f'{name}.weight', (c,)), (f'{name}.bias', (c,))]


def _mlp(name, c, hidden, out=None):
  return _linear(f'{name}.fc1', hidden, c) + _linear(f'{name}.fc2', out or c, hidden)


def _block(name, c, hidden):
  """timm-style pre-norm block (their AttnBlock / decoder post_attn): fused qkv rows [q; k; v]."""
  return (_norm(f'{name}.norm1', c) + _linear(f'{name}.attn.qkv', 3 * c, c) + _linear(f'{name}.attn.proj', c, c)
          + _norm(f'{name}.norm2', c) + _mlp(f'{name}.mlp', c, hidden))


def _cross_block(name, c, hidden):
  """Their CrossAttnBlock(post_norm=True): separate q/k/v projections."""
  attn = [kv for p in ('q_proj', 'k_proj', 'v_proj', 'proj') for kv in _linear(f'{name}.attn.{p}', c, c)]
  return _norm(f'{name}.norm_post', c) + attn + _norm(f'{name}.norm2', c) + _mlp(f'{name}.mlp', c, hidden)


def _assign(name, c):
  return [kv for p in ('q_proj', 'k_proj', 'v_proj', 'proj') for kv in _linear(f'{name}.{p}', c, c)]


def _visual(top, m):
  v, b = m.vision, m.binding
  c, p = v.width, v.patch_size
  hidden = int(c * v.mlp_ratio)
  side = v.img_size // p
  d1, d2 = v.depths
  k_in, k_out = b.num_group_tokens, b.num_output_groups
  ds = f'{top}.layers.0.downsample'
  keys = [(f'{top}.pos_embed', (side * side, c)), (f'{top}.patch_embed.proj.weight', (c, 3, p, p)),
          (f'{top}.patch_embed.proj.bias', (c,)), (f'{top}.layers.0.group_token', (1, k_in, c))]
  for i in range(d1):
    keys += _block(f'{top}.layers.0.blocks.{i}', c, hidden)
  keys += (_norm(f'{ds}.norm_tokens', c) + _mlp(f'{ds}.mlp_inter', k_in, int(b.token_mlp_ratio * c), k_out)
           + _norm(f'{ds}.norm_post_tokens', c) + _norm(f'{ds}.norm_x', c)
           + _cross_block(f'{ds}.pre_assign_attn', c, hidden) + _assign(f'{ds}.assign', c)
           + _norm(f'{ds}.norm_new_x', c) + _mlp(f'{ds}.mlp_channels', c, hidden))
  for j in range(d2):
    keys += _block(f'{top}.layers.1.blocks.{j}', c, hidden)
  return keys + _norm(f'{top}.norm', c)


def _projector(top, c_in, m):
  """Their ProjectMLP: Conv1d(k=1) -> BatchNorm1d -> ReLU -> Conv1d(k=1)."""
  h, out, bn = m.proj.hidden, m.proj.out, f'{top}.linear_hidden.1'
  return ([(f'{top}.linear_hidden.0.weight', (h, c_in, 1)), (f'{top}.linear_hidden.0.bias', (h,))]
          + _norm(bn, h) + [(f'{bn}.running_mean', (h,)), (f'{bn}.running_var', (h,)),
                            (f'{bn}.num_batches_tracked', ())]
          + [(f'{top}.linear_out.weight', (out, h, 1)), (f'{top}.linear_out.bias', (out,))])


def _bert(prefix, t):
  """HF BertModel (with pooler) state-dict keys in HF order."""
  c, e = t.width, f'{prefix}embeddings'
  keys = [(f'{e}.word_embeddings.weight', (t.vocab_size, c)), (f'{e}.position_embeddings.weight',
                                                                  (t.max_position, c)),
          (f'{e}.token_type_embeddings.weight', (t.type_vocab, c))] + _norm(f'{e}.LayerNorm', c)
  for i in range(t.num_layers):
    layer = f'{prefix}encoder.layer.{i}'
    keys += [kv for p in ('query', 'key', 'value') for kv in _linear(f'{layer}.attention.self.{p}', c, c)]
    keys += _linear(f'{layer}.attention.output.dense', c, c) + _norm(f'{layer}.attention.output.LayerNorm', c)
    keys += _linear(f'{layer}.intermediate.dense', t.intermediate, c)
    keys += _linear(f'{layer}.output.dense', c, t.intermediate) + _norm(f'{layer}.output.LayerNorm', c)
  return keys + _linear(f'{prefix}pooler.dense', c, c)


def official_layout(model_config) -> list[tuple[str, tuple, str]]:
  """Every (key, shape, dtype) of the authors' stage-2 model state dict for `model_config`, in their order."""
  m, c = model_config, model_config.vision.width
  if m.binding.mode != 'official' or m.binding.num_group_tokens == m.binding.num_output_groups:
    raise ValueError(f'binding.mode={m.binding.mode!r} with {m.binding.num_group_tokens} -> '
                     f'{m.binding.num_output_groups} groups has no counterpart in the authors\' GroupingBlock '
                     '(it always has a token MLP from num_group_tokens to fewer output groups)')
  if not m.vision.qkv_bias:
    raise ValueError('vision.qkv_bias=False has no counterpart in the authors\' layout (their qkv has a bias)')
  if m.get('patch_head', False):
    raise ValueError('model.patch_head=True: the authors\' layout has no patch projection head (not in the '
                     'paper, docs/paper_vs_authors.md Q34); use the inference export (the default --format)')
  if tuple(m.vision.stem_channels):
    raise ValueError(f'vision.stem_channels={tuple(m.vision.stem_channels)}: the authors\' layout has a plain '
                     'patch embed and no conv stem; use the inference export (the default --format)')
  keys = [('logit_scale', ()), ('logit_scale_mask', ())] + _visual('img_encoder', m)
  keys += _bert(TEXT_PREFIX, m.text)
  keys += _projector('img_projector', c, m) + _projector('text_projector', m.text.width, m)
  g = 'multimodal_groupingblock.blocks.0'
  hidden = int(c * m.decoder.mlp_ratio)
  keys += (_norm(f'{g}.norm_tokens', c) + _norm(f'{g}.norm_x', c) + _cross_block(f'{g}.pre_assign_attn', c, hidden)
           + _block(f'{g}.post_attn', c, hidden) + _assign(f'{g}.assign', c) + _norm(f'{g}.norm_new_x', c))
  keys += _projector('bridge_projector', c, m) + _visual('img_encoder_momentum', m)
  return [(k, tuple(int(d) for d in s), 'int64' if k.endswith('num_batches_tracked') else 'float32')
          for k, s in keys]


def _fill(key: str, shape: tuple, model_config) -> np.ndarray | None:
  for pattern, fill in FILLS:
    if re.fullmatch(pattern, key):
      return fill(shape, model_config)
  return None


def _leaves(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, 'items'):
      yield from _leaves(v, prefix + (k,))
    else:
      yield prefix + (k,), v


def state_dict(model_config, variables, teacher=None) -> collections.OrderedDict:
  """-> OrderedDict {authors' key: np.ndarray} (float32; num_batches_tracked int64), in their order.

  variables: {'params', 'batch_stats'} of OVSegmentor(model_config); teacher: EMA img_encoder params or None
  (then img_encoder_momentum.* = the online img_encoder). Raises ValueError on a missing / left-over variable or
  a shape mismatch, naming it.
  """
  params = variables['params']
  sources = {'params': dict(params), 'batch_stats': dict(variables.get('batch_stats', {}))}
  sources['params']['img_encoder_momentum'] = teacher if teacher is not None else params['img_encoder']
  flat = {(col,) + path: v for col, tree in sources.items() for path, v in _leaves(tree)}
  text = {bert_convert.hf_key(path[2:]): path for path in flat if path[:2] == ('params', 'text_encoder')}
  out, used = collections.OrderedDict(), set()
  for key, shape, dtype in official_layout(model_config):
    value = _fill(key, shape, model_config)
    if value is not None:
      out[key] = value
      continue
    if key.startswith(TEXT_PREFIX):
      name = key[len(TEXT_PREFIX):]
      if name not in text:
        raise ValueError(f'{key}: the text encoder has no variable for it (params/text_encoder holds '
                         f'{len(text)} leaves)')
      path = text[name]
      want = shape[::-1] if path[-1] == 'kernel' else shape
    else:
      target = official.target_shape(key, shape)
      if target is None:
        raise ValueError(f'{key}: official.py maps it to no variable')
      collection, sub, want = target
      path = (collection,) + sub
    if path not in flat:
      raise ValueError(f'{key}: our model has no variable {"/".join(path)}')
    arr = np.asarray(flat[path])
    if tuple(arr.shape) != tuple(want):
      raise ValueError(f'{"/".join(path)} has shape {tuple(arr.shape)}, but {key} {shape} needs {tuple(want)}')
    arr = arr.astype(np.float32, copy=False)
    if key.startswith(TEXT_PREFIX):
      out[key] = arr.T if path[-1] == 'kernel' else arr
    else:
      out[key] = official.to_official(key, shape, arr)
    used.add(path)
  left = sorted('/'.join(p) for p in set(flat) - used)
  if left:
    raise ValueError(f'{len(left)} variables have no key in the authors\' layout: {", ".join(left[:6])}')
  return out


def _plain(tree):
  """ConfigDict / tuples -> JSON-plain dicts and lists (what torch.load(weights_only=True) accepts)."""
  return json.loads(json.dumps(tree.to_dict() if hasattr(tree, 'to_dict') else tree, default=list))


def official_config(model_config, cross_threshold: float = 0.6, provenance: dict | None = None) -> dict:
  """The checkpoint's 'config': the authors' `config.model` keys (configs/default.yml layout) for this model,
  the HF BertConfig as `bert_config` (read back by `convert official` for the text head count), and our own
  model config + provenance under `ovseg_jax`. Plain dict of str / int / float / bool / list.
  """
  m = model_config
  v, b, t = m.vision, m.binding, m.text
  model = {
      'type': 'MultiLabelContrastive',
      'img_encoder': {
          'type': 'GroupViT', 'img_size': int(v.img_size), 'patch_size': int(v.patch_size),
          'embed_dim': int(v.width), 'num_heads': [int(v.num_heads)] * 2, 'embed_factors': [1, 1],
          'depths': [int(d) for d in v.depths], 'num_group_tokens': [int(b.num_group_tokens), 0],
          'num_output_groups': [int(b.num_output_groups)], 'mlp_ratio': float(v.mlp_ratio), 'qkv_bias': True,
          'drop_rate': 0.0, 'drop_path_rate': float(v.drop_path_rate), 'patch_norm': False,
          # their constructor builds the 2-D [L, C] pos_embed of this layout only on the DINO path
          'imgnet_pretrained': 'dino', 'fixed': False},
      'text_encoder': {'type': 'Bert', 'context_length': int(t.max_length), 'width': int(t.width),
                       'layers': int(t.num_layers), 'vocab_size': int(t.vocab_size), 'pretrained': True,
                       'fixed': True},
      'contrast_temperature': float(m.temperature_init),
      'proj_num_layers': 2,
      'output_dim': int(m.proj.out),
      'multi_label': 0,
      'use_entityloss': True,
      'use_maskloss': True,   # the file always has the stage-2 keys (img_encoder_momentum, logit_scale_mask)
      'cross_threshold': float(cross_threshold),
  }
  bert_config = {
      'hidden_size': int(t.width), 'num_hidden_layers': int(t.num_layers), 'num_attention_heads': int(t.num_heads),
      'intermediate_size': int(t.intermediate), 'vocab_size': int(t.vocab_size),
      'max_position_embeddings': int(t.max_position), 'type_vocab_size': int(t.type_vocab),
      'layer_norm_eps': float(t.ln_eps), 'hidden_act': 'gelu', 'hidden_dropout_prob': float(t.dropout),
      'attention_probs_dropout_prob': float(t.dropout)}
  ours = {'model': _plain(m), 'exporter': 'ovseg_jax.export'}
  ours.update(_plain(provenance or {}))
  return {'model': model, 'bert_config': bert_config, 'ovseg_jax': ours}


def checkpoint(model_config, variables, teacher=None, *, epoch: int = 0, cross_threshold: float = 0.6,
               provenance: dict | None = None) -> dict:
  """The whole object `torch.save`d by the authors' save_checkpoint, minus optimizer / scheduler state."""
  return {'model': state_dict(model_config, variables, teacher),
          'config': official_config(model_config, cross_threshold, provenance),
          'epoch': int(epoch), 'optimizer': {}, 'lr_scheduler': {}}
