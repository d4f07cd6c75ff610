"""The authors' OVSegmentor checkpoint (`{'model': state_dict, 'config': DictConfig, ...}`) -> OVSegmentor
variables {'params', 'batch_stats'} (+ the EMA teacher's img_encoder params from `img_encoder_momentum.*`).

Key mapping (docs/paper_vs_authors.md Q31; every rule is one line of `_MODULE_RENAMES` or `_WEIGHT_LAYOUTS`; the
exporter, convert/official_export.py, walks the same tables backwards):
  img_encoder.patch_embed.proj.weight [C,3,p,p]  -> img_encoder/patch_embed/proj/kernel [p,p,3,C]
  img_encoder.pos_embed [L,C]                    -> img_encoder/pos_embed
  img_encoder.layers.0.group_token [1,K,C]       -> img_encoder/group_token [K,C]
  img_encoder.layers.0.blocks.i.*                -> img_encoder/stage1_block{i}/*
  img_encoder.layers.1.blocks.j.*                -> img_encoder/stage2_block{j}/*
  img_encoder.layers.0.downsample.*              -> img_encoder/binding/*
  {img,text,bridge}_projector.linear_hidden.0    -> */linear_hidden   (Conv1d [out,in,1] -> kernel [in,out])
  {img,text,bridge}_projector.linear_hidden.1    -> */bn (weight/bias -> params scale/bias; running_mean/var ->
                                                    batch_stats mean/var)
  {img,text,bridge}_projector.linear_out         -> */linear_out
  multimodal_groupingblock.blocks.0.{pre_assign_attn, post_attn, norm_*} -> decoder/{cross_attn, self_attn, norm_*}
  text_encoder.transformer.*                     -> text_encoder/* (ovseg_jax.convert.bert.hf_to_params)
  logit_scale                                    -> logit_scale
Leaves: Linear weight [out,in] -> kernel [in,out]; LayerNorm / BN weight -> scale; bias -> bias.
Source keys deliberately dropped are listed in DONT_LOAD with the reason; anything else unplaced, any model
variable left unfilled, or any shape mismatch is a one-line ValueError.
"""

import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovseg_jax import errors
from ovseg_jax.convert import bert as bert_convert
from ovseg_jax.convert import torch_pickle
from ovseg_jax.models import ovsegmentor
from ovseg_jax.models import visual as visual_lib

# Source keys that are not loaded, and why.
DONT_LOAD = (
    r'logit_scale_mask',                                   # stage-2 parameter nothing reads (paper_vs_authors.md Q8)
    r'.*\.num_batches_tracked',                            # BN step counter; momentum BN does not use it
    r'multimodal_groupingblock\.blocks\.0\.assign\..*',    # AssignAttention never called (paper_vs_authors.md Q9)
    r'text_encoder\.transformer\.embeddings\.position_ids',  # non-persistent arange buffer of old transformers
)
TEXT_PREFIX = 'text_encoder.transformer.'

_MODULE_RENAMES = (  # (regex on the dotted module path, replacement); first match wins, applied once
    (r'^layers\.0\.blocks\.(\d+)\.', r'stage1_block\1.'),
    (r'^layers\.1\.blocks\.(\d+)\.', r'stage2_block\1.'),
    (r'^layers\.0\.downsample\.', 'binding.'),
    (r'^linear_hidden\.0\.', 'linear_hidden.'),
    (r'^linear_hidden\.1\.', 'bn.'),
    (r'^blocks\.0\.pre_assign_attn\.', 'cross_attn.'),
    (r'^blocks\.0\.post_attn\.', 'self_attn.'),
    (r'^blocks\.0\.', ''),
)
_TOP_RENAMES = {'img_encoder': 'img_encoder', 'img_encoder_momentum': 'img_encoder_momentum',
                'img_projector': 'img_projector', 'text_projector': 'text_projector',
                'bridge_projector': 'bridge_projector', 'multimodal_groupingblock': 'decoder'}


# The authors' `weight` tensors by rank: (our leaf, authors' -> ours, ours -> authors'). The one table for
# both directions: `_leaf` (import) and `to_official` (export: convert/official_export.py) read it.
_WEIGHT_LAYOUTS = {
    1: ('scale', lambda w: w, lambda v: v),                                     # LayerNorm / BatchNorm affine
    2: ('kernel', lambda w: w.T, lambda k: k.T),                                # Linear [out, in]
    3: ('kernel', lambda w: w[:, :, 0].T, lambda k: k.T[:, :, None]),            # Conv1d k=1 [out, in, 1]
    4: ('kernel', lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),  # Conv2d [out, in, kh, kw]
}
_BUFFERS = {'running_mean': 'mean', 'running_var': 'var'}  # BN buffers -> batch_stats leaves


def _weight_layout(name: str, shape: tuple):
  if name != 'weight' or len(shape) not in _WEIGHT_LAYOUTS or (len(shape) == 3 and shape[-1] != 1):
    return None
  return _WEIGHT_LAYOUTS[len(shape)]


def _leaf(module_path: str, name: str, value: np.ndarray):
  """(collection, leaf name, converted value) for one torch tensor."""
  del module_path
  if name in _BUFFERS:
    return 'batch_stats', _BUFFERS[name], value
  layout = _weight_layout(name, value.shape)
  if layout is not None:
    return 'params', layout[0], layout[1](value)
  return 'params', name, value                              # bias, pos_embed, group_token, logit_scale


def to_official(key: str, shape: tuple, value: np.ndarray) -> np.ndarray:
  """Inverse of `target_of`'s value conversion: our variable -> the authors' tensor `key` of `shape`.

  Transposes come from _WEIGHT_LAYOUTS; the only other change is group_token's leading 1 ([K,C] -> [1,K,C]).
  """
  shape = tuple(shape)
  layout = _weight_layout(key.rpartition('.')[2], shape)
  out = layout[2](value) if layout is not None else value
  if out.shape != shape:
    if layout is not None or out.ndim > len(shape) or shape[len(shape) - out.ndim:] != out.shape:
      raise ValueError(f'{key}: a value of shape {tuple(value.shape)} does not give the authors\' {shape}')
    out = out.reshape(shape)
  return out


def target_shape(key: str, shape: tuple):
  """Authors' key (no text-encoder keys) and tensor shape -> (collection, path, our shape) or None."""
  tgt = target_of(key, np.broadcast_to(np.zeros((), np.float32), tuple(shape)))  # a view: no memory
  return None if tgt is None else (tgt[0], tgt[1], tuple(tgt[2].shape))


def target_of(key: str, value: np.ndarray):
  """Authors' key (no text-encoder keys) -> (collection, path tuple, converted value) or None if unknown."""
  top, _, rest = key.partition('.')
  if key == 'logit_scale':
    return 'params', ('logit_scale',), value
  if top not in _TOP_RENAMES or not rest:
    return None
  if rest == 'pos_embed':
    return 'params', (_TOP_RENAMES[top], 'pos_embed'), value
  if rest == 'layers.0.group_token':
    return 'params', (_TOP_RENAMES[top], 'group_token'), value.reshape(value.shape[-2:]) if value.ndim == 3 \
        else value
  module, _, name = rest.rpartition('.')
  module += '.'
  for pattern, repl in _MODULE_RENAMES:
    if re.match(pattern, module):
      module = re.sub(pattern, repl, module, count=1)
      break
  collection, leaf, converted = _leaf(module, name, value)
  path = (_TOP_RENAMES[top],) + tuple(p for p in module.split('.') if p) + (leaf,)
  return collection, path, converted


def flatten(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) or hasattr(v, 'items'):
      out.update(flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def unflatten(flat):
  tree = {}
  for path, v in flat.items():
    node = tree
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = v
  return tree


def abstract_variables(model_config) -> dict:
  """Shapes of OVSegmentor's variables (no FLOPs, nothing materialised)."""
  model = ovsegmentor.OVSegmentor(ml_collections.FrozenConfigDict(model_config))
  s = model_config.vision.img_size
  t = min(8, model_config.text.max_position)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3)),
                                           jnp.zeros((1, t), jnp.int32), jnp.ones((1, t), jnp.int32)))


def place(state: dict, targets: dict, dont_load=(), source_name='checkpoint'):
  """Places converted source tensors on a flat target {(collection, *path): ShapeDtypeStruct}.

  state: {source key: (collection, path, value)} already converted.
  Returns flat {(collection, *path): float32 array}. Raises ValueError naming the first unplaced / unfilled /
  mismatched entries.
  """
  out, unplaced = {}, []
  for key, (collection, path, value) in state.items():
    tkey = (collection,) + path
    if tkey not in targets:
      if not any(re.fullmatch(p, key) for p in dont_load):
        unplaced.append(key)
      continue
    want = tuple(targets[tkey].shape)
    if tuple(value.shape) != want:
      raise ValueError(f'{source_name} key {key}: shape {tuple(value.shape)} does not fit model variable '
                       f'{"/".join(tkey)} of shape {want} (checkpoint of another architecture?)')
    out[tkey] = np.asarray(value, np.float32)
  if unplaced:
    raise ValueError(f'{len(unplaced)} {source_name} keys fit no model variable: {", ".join(unplaced[:6])}')
  missing = sorted('/'.join(k) for k in set(targets) - set(out))
  if missing:
    raise ValueError(f'{len(missing)} model variables have no {source_name} key: {", ".join(missing[:6])}')
  return out


def count_indexed(prefix: str, sd: dict) -> int:
  ids = {int(m.group(1)) for k in sd for m in [re.match(re.escape(prefix) + r'(\d+)\.', k)] if m}
  return max(ids) + 1 if ids else 0


def _section(value, where: str) -> dict:
  """A section of the stored authors' config: a mapping ({} when absent); any other type is a UsageError."""
  if value is None:
    return {}
  if not isinstance(value, dict):
    raise errors.UsageError(f"the checkpoint's stored config: {where} is a {type(value).__name__}, not a mapping")
  return value


def _number(value, where: str, kind=int):
  """A stored int (> 0) or float (finite, >= 0): the authors' yaml holds plain numbers; a crafted file may
  hold anything (a bool, a string, a list), which is a UsageError naming the key."""
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
  if ok:
    x = kind(value)
    ok = math.isfinite(x) and x == value and (x > 0 if kind is int else x >= 0)
  if not ok:
    what = 'a positive integer' if kind is int else 'a finite number >= 0'
    raise errors.UsageError(f"the checkpoint's stored config: {where}={value!r} is not {what}")
  return x


def infer_model_config(sd: dict, stored: dict | None, base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config.model` for a checkpoint: every width / depth / count from the tensor shapes; head counts from
  the stored authors' config when present, else from `base` (e.g. configs/vitb.py). Returns an unlocked copy.
  A tensor of too few dimensions and a stored value of the wrong type are one-line errors naming the key.
  """
  def need(key, ndim=1):
    if key not in sd:
      raise ValueError(f'not an OVSegmentor checkpoint: key {key} is missing')
    shape = tuple(getattr(sd[key], 'shape', ()))
    if len(shape) < ndim or 0 in shape:
      raise errors.UsageError(f'not an OVSegmentor checkpoint: {key} has shape {shape} (expected {ndim}+ '
                              'non-empty dimensions)')
    return sd[key]

  m = ml_collections.ConfigDict(base.to_dict())
  stored = _section(stored, 'config')
  img_cfg = _section(_section(stored.get('model'), 'model').get('img_encoder'), 'model.img_encoder')
  pos = need('img_encoder.pos_embed', 2)
  width = pos.shape[-1]
  patch = need('img_encoder.patch_embed.proj.weight', 4).shape[-1]
  side = int(round(math.sqrt(pos.shape[-2])))
  d1 = count_indexed('img_encoder.layers.0.blocks.', sd)
  d2 = count_indexed('img_encoder.layers.1.blocks.', sd)
  m.vision.stem_channels = ()  # the authors' layout: a plain patch embed (configs/tiny.py adds a stem)
  m.patch_head = False         # nor a patch projection head (configs/tiny.py adds one; Q34)
  m.vision.update(width=width, patch_size=patch, img_size=side * patch, depths=(d1, d2),
                  mlp_ratio=need('img_encoder.layers.0.blocks.0.mlp.fc1.weight').shape[0] / width)
  heads = img_cfg.get('num_heads')
  if isinstance(heads, (list, tuple)):   # the authors store one count per stage
    heads = heads[0] if heads else None
  if heads is not None:
    m.vision.num_heads = _number(heads, 'model.img_encoder.num_heads')
  if img_cfg.get('drop_path_rate') is not None:
    m.vision.drop_path_rate = _number(img_cfg['drop_path_rate'], 'model.img_encoder.drop_path_rate', float)
  k_in = need('img_encoder.layers.0.group_token', 2).shape[-2]
  fc2 = sd.get('img_encoder.layers.0.downsample.mlp_inter.fc2.weight')
  m.binding.num_group_tokens = k_in
  if fc2 is not None:
    fc2 = need('img_encoder.layers.0.downsample.mlp_inter.fc2.weight')
    m.binding.token_mlp_ratio = need('img_encoder.layers.0.downsample.mlp_inter.fc1.weight').shape[0] / width
  m.binding.num_output_groups = fc2.shape[0] if fc2 is not None else k_in
  m.binding.mode, m.binding.assignment = 'official', 'gumbel_hard'
  hidden = need('img_projector.linear_hidden.0.weight')
  m.proj.hidden = hidden.shape[0]
  m.proj.out = need('img_projector.linear_out.weight').shape[0]
  m.decoder.mlp_ratio = need('multimodal_groupingblock.blocks.0.post_attn.mlp.fc1.weight').shape[0] / width
  m.decoder.attend_padding = True  # the authors' decoder ignores the padding mask (docs/paper_vs_authors.md Q10)

  words = need(TEXT_PREFIX + 'embeddings.word_embeddings.weight', 2)
  bc = _section(stored.get('bert_config'), 'bert_config')
  m.text.update(vocab_size=words.shape[0], width=words.shape[1],
                num_layers=count_indexed(TEXT_PREFIX + 'encoder.layer.', sd),
                intermediate=need(TEXT_PREFIX + 'encoder.layer.0.intermediate.dense.weight').shape[0],
                max_position=need(TEXT_PREFIX + 'embeddings.position_embeddings.weight').shape[0],
                type_vocab=need(TEXT_PREFIX + 'embeddings.token_type_embeddings.weight').shape[0])
  if bc:
    m.text.num_heads = _number(bc.get('num_attention_heads'), 'bert_config.num_attention_heads')
    if bc.get('layer_norm_eps') is not None:
      m.text.ln_eps = _number(bc['layer_norm_eps'], 'bert_config.layer_norm_eps', float)
    if bc.get('hidden_dropout_prob') is not None:
      m.text.dropout = _number(bc['hidden_dropout_prob'], 'bert_config.hidden_dropout_prob', float)
  m.text.max_length = min(m.text.max_length, m.text.max_position)
  for name, c, heads in (('vision', width, m.vision.num_heads), ('decoder', width, m.decoder.num_heads),
                         ('text', m.text.width, m.text.num_heads)):
    if c % heads:
      raise ValueError(f'{name} width {c} is not divisible by {heads} heads; pass a --config whose head '
                       'counts fit the checkpoint')
  return m


def convert_state(sd: dict, model_config: ml_collections.ConfigDict):
  """Flat authors' state dict -> (variables {'params', 'batch_stats'}, teacher img_encoder params or None)."""
  abstract = abstract_variables(model_config)
  targets = {(col,) + k: v for col in abstract for k, v in flatten(abstract[col]).items()}
  text_targets = {k: v for k, v in targets.items() if k[:2] == ('params', 'text_encoder')}
  other_targets = {k: v for k, v in targets.items() if k[:2] != ('params', 'text_encoder')}
  has_teacher = any(k.startswith('img_encoder_momentum.') for k in sd)
  if has_teacher:
    for k, v in list(other_targets.items()):
      if k[:2] == ('params', 'img_encoder'):
        other_targets[('params', 'img_encoder_momentum') + k[2:]] = v

  converted = {}
  for key, value in sd.items():
    if key.startswith(TEXT_PREFIX):
      continue
    tgt = target_of(key, value)
    if tgt is None:
      if not any(re.fullmatch(p, key) for p in DONT_LOAD):
        raise ValueError(f'checkpoint key {key} fits no model variable (not an OVSegmentor checkpoint?)')
      continue
    converted[key] = tgt
  flat = place(converted, other_targets, DONT_LOAD)

  text_params, used = bert_convert.hf_to_params(sd, model_config.text, TEXT_PREFIX)
  for path, v in flatten(text_params).items():
    want = tuple(text_targets[('params', 'text_encoder') + path].shape)
    if tuple(v.shape) != want:
      raise ValueError(f'text encoder param {"/".join(path)}: shape {v.shape} != model {want}')
    flat[('params', 'text_encoder') + path] = v
  left = sorted(k for k in sd if k.startswith(TEXT_PREFIX) and k not in used)
  if left:
    raise ValueError(f'{len(left)} text encoder keys were not loaded: {", ".join(left[:6])}')

  tree = unflatten(flat)
  teacher = tree['params'].pop('img_encoder_momentum', None)
  return {'params': tree['params'], 'batch_stats': tree['batch_stats']}, teacher


def load_official(path: str, base_config: ml_collections.ConfigDict):
  """Reads the authors' `.pth` -> (model_config, variables, teacher params or None, stored config dict).

  base_config: a `config.model` (e.g. `configs/vitb.get_config().model`) supplying head counts when the
  checkpoint stores no config, and every non-shape default.
  """
  obj = torch_pickle.load(path)
  sd = torch_pickle.state_dict_of(obj, path)
  stored = torch_pickle.plain(obj.get('config'), f'{path}: config') if isinstance(obj, dict) else None
  stored = stored if isinstance(stored, dict) else None
  model_config = infer_model_config(sd, stored, base_config)
  visual_lib.compute_dtype(model_config)
  variables, teacher = convert_state(sd, model_config)
  return model_config, variables, teacher, stored
