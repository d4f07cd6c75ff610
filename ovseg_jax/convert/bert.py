"""HF `BertModel` weights -> `ovseg_jax.models.bert.BertModel` params, and the `convert bert` init format.

Key mapping (linen path -> HF key; one rule, applied to every leaf):
    encoder/layer_3/attention/self/query/kernel  <->  {prefix}encoder.layer.3.attention.self.query.weight (.T)
    '/' -> '.', 'layer_N' -> 'layer.N', leaf kernel -> weight (transposed: torch Linear is [out, in], linen
    Dense is [in, out]), embedding -> weight, scale -> weight, bias -> bias.
Old checkpoints (e.g. bert-base-uncased's own files) name LayerNorm params `gamma` / `beta`; they are read as
`weight` / `bias`, as transformers does.

Strictness (big_vision style): every source key under `prefix` must be placed and every model param must be
filled, except the source keys matching `DONT_LOAD` (documented there). Anything else is a ValueError.

Init format written by `save_bert_init` (read by `load_bert_init`, used by `--config.train.init_bert`;
checkpoint.py writes and reads the files):
    DIR/text_config.json   the `config.model.text` ConfigDict (JSON)
    DIR/variables/         Orbax StandardCheckpointer tree {'params': BertModel params}
    DIR/meta.json          provenance (source folder)
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ovseg_jax import checkpoint
from ovseg_jax import errors
from ovseg_jax.models import bert as bert_model

# Source keys that are deliberately not loaded, with the reason.
DONT_LOAD = (
    # transformers' non-persistent buffer arange(max_position); positions are recomputed as 0..T-1.
    r'embeddings\.position_ids',
)
# In `load_hf_folder` only: keys outside the BertModel prefix of BertForPreTraining / BertForMaskedLM files
# (MLM and next-sentence heads, e.g. in bert-base-uncased's own weights); OVSegmentor never uses them.
HEAD_KEYS = (r'cls\..*',)

SAFETENSORS = 'model.safetensors'
SAFETENSORS_INDEX = 'model.safetensors.index.json'
TORCH_BIN = 'pytorch_model.bin'


def hf_key(path: tuple[str, ...]) -> str:
  """Linen param path, e.g. ('encoder', 'layer_0', 'output', 'dense', 'kernel') -> HF key (no prefix)."""
  *mods, leaf = path
  mods = [re.sub(r'^layer_(\d+)$', r'layer.\1', m) for m in mods]
  return '.'.join(mods + [{'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight', 'bias': 'bias'}[leaf]])


def param_shapes(config) -> dict:
  """Abstract param tree of `BertModel(config)` (jax.ShapeDtypeStruct leaves), built with no FLOPs."""
  model = bert_model.BertModel(config)
  ids = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), ids, ids))['params']


def _normalise_key(key: str) -> str:
  return re.sub(r'LayerNorm\.gamma$', 'LayerNorm.weight', re.sub(r'LayerNorm\.beta$', 'LayerNorm.bias', key))


def hf_to_params(state: dict, config, prefix: str = ''):
  """Maps an HF BertModel state dict to the linen param tree of `BertModel(config)`.

  state: flat {key: np.ndarray}, e.g. `safetensors.numpy.load_file(...)`; keys not starting with `prefix`
    (e.g. the image encoder of a full OVSegmentor checkpoint) are ignored and left to the caller.
  prefix: prepended to every HF key, e.g. 'text_encoder.transformer.' for the official checkpoint.
  Returns (params: nested dict of float32 numpy arrays, used_keys: set of source keys consumed, including the
  `DONT_LOAD` ones). Raises ValueError on a shape mismatch, an unplaced source key or an unfilled param.
  """
  by_name = {}
  for key in state:
    if key.startswith(prefix):
      name = _normalise_key(key[len(prefix):])
      if name in by_name:
        raise ValueError(f'{key} and {prefix}{by_name[name]} both map to {prefix}{name}')
      by_name[name] = key
  dont_load = {n for n in by_name if any(re.fullmatch(p, n) for p in DONT_LOAD)}

  flat = {}
  missing = []
  for path, target in jax.tree_util.tree_flatten_with_path(param_shapes(config))[0]:
    path = tuple(p.key for p in path)
    name = hf_key(path)
    if name not in by_name:
      missing.append(prefix + name)
      continue
    key = by_name[name]
    value = np.asarray(state[key])
    want = target.shape[::-1] if path[-1] == 'kernel' else target.shape  # in HF layout
    if value.shape != want:
      raise ValueError(f'{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(want)} '
                       f'(HF layout) for text config width={config.width}, layers={config.num_layers}')
    # Contiguous copies: a transposed view would be written in the wrong order by safetensors.numpy.save_file.
    flat[path] = np.ascontiguousarray(value.T if path[-1] == 'kernel' else value, dtype=np.float32)
  if missing:
    raise ValueError(f'{len(missing)} BERT params have no source key (e.g. {missing[:3]}); is prefix={prefix!r} '
                     'right and is it a BertModel with a pooler?')
  placed = {by_name[hf_key(p)] for p in flat}
  unplaced = sorted(set(by_name.values()) - placed - {by_name[n] for n in dont_load})
  if unplaced:
    raise ValueError(f'{len(unplaced)} source keys under {prefix!r} fit no BERT param (e.g. {unplaced[:3]}); '
                     f'does text config num_layers={config.num_layers} match the checkpoint?')

  params = {}
  for path, value in flat.items():
    node = params
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return params, placed | {by_name[n] for n in dont_load}


# transformers.BertConfig defaults (bert-base-uncased).
_BERT_DEFAULTS = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                      intermediate_size=3072, hidden_act='gelu', hidden_dropout_prob=0.1,
                      max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12,
                      position_embedding_type='absolute')


def text_config_from_hf(config_json: dict) -> ml_collections.ConfigDict:
  """HF BertConfig dict (config.json) -> ConfigDict with the keys of `config.model.text`.

  Keys absent from the file take transformers' BertConfig defaults (bert-base), as `from_pretrained` does.
  Only what this BertModel implements is accepted: absolute positions, exact GELU. HF has two dropout rates
  (hidden, attention probs); this model has one, taken from hidden_dropout_prob.
  """
  c = dict(_BERT_DEFAULTS, **config_json)
  if c['hidden_act'] != 'gelu':
    raise ValueError(f"hidden_act={c['hidden_act']!r}: only 'gelu' (exact erf GELU) is implemented")
  if c['position_embedding_type'] != 'absolute':
    raise ValueError(f"position_embedding_type={c['position_embedding_type']!r}: only 'absolute' is implemented")
  def count(key):
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < 1:
      raise ValueError(f'{key}={value!r}: expected a positive integer')
    return int(value)

  def rate(key):
    value = c[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f'{key}={value!r}: expected a number in [0, 1)')
    return float(value)

  max_position = count('max_position_embeddings')
  width, heads = count('hidden_size'), count('num_attention_heads')
  if width % heads:
    raise ValueError(f'hidden_size={width} is not divisible by num_attention_heads={heads}')
  return ml_collections.ConfigDict(dict(
      vocab_size=count('vocab_size'),
      width=width,
      num_layers=count('num_hidden_layers'),
      num_heads=heads,
      intermediate=count('intermediate_size'),
      max_position=max_position,
      type_vocab=count('type_vocab_size'),
      ln_eps=rate('layer_norm_eps'),
      dropout=rate('hidden_dropout_prob'),
      max_length=min(77, max_position),  # the authors' caption length (docs/paper_vs_authors.md Q5)
  ))


def _load_safetensors(path: str) -> dict:
  """safetensors.numpy.load_file, with a damaged file reported as one line naming it."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError, OSError: the file is bad)
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise errors.UsageError(f'{path} is not a readable safetensors file ({msg})') from None


def index_shards(directory: str, index: str) -> list[str]:
  """The shard files a model.safetensors.index.json names, each checked to lie inside its folder.

  A name must be a relative path without `..`; the file it reaches, symlinks resolved, must lie in
  `directory` or, when the index itself is a symlink (the HF hub cache: snapshots/<rev>/* -> ../../blobs/*),
  in the folder of the index's target. Anything else (an absolute path, `..`, a symlink escaping the folder)
  is refused before any file is opened: an index must not make the converter read files elsewhere.
  """
  try:
    with open(index, encoding='utf-8') as f:
      weight_map = json.load(f)['weight_map']
  except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
    raise errors.UsageError(f'{index} is not a safetensors index ({type(e).__name__}: '
                            f'{str(e).splitlines()[0][:200] if str(e) else ""})') from None
  if not isinstance(weight_map, dict) or not weight_map:
    raise errors.UsageError(f'{index}: weight_map is not a non-empty {{key: shard file}} object')
  bad = [v for v in weight_map.values() if not isinstance(v, str)]
  if bad:
    raise errors.UsageError(f'{index}: weight_map names a shard by a {type(bad[0]).__name__}, not a file name')
  roots = {os.path.realpath(directory), os.path.dirname(os.path.realpath(index))}
  paths = []
  for name in sorted(set(weight_map.values())):
    parts = name.replace('\\', '/').split('/')
    if not name or '\0' in name or os.path.isabs(name) or '..' in parts or not name.endswith('.safetensors'):
      raise errors.UsageError(f'{index} names shard {name[:200]!r}: expected a .safetensors file name inside '
                              f'{directory} (no absolute path, no ..)')
    path = os.path.join(directory, name)
    real = os.path.realpath(path)
    if not any(real.startswith(os.path.join(root, '')) for root in roots):
      raise errors.UsageError(f'{index} names shard {name!r}, which resolves to {real}, outside {directory}; '
                              'refusing to read it')
    if not os.path.isfile(path):
      raise errors.UsageError(f'{index} names shard {name!r}, which is missing from {directory}')
    paths.append(path)
  return paths


def read_hf_weights(directory: str) -> tuple[dict, str]:
  """Reads the weights of an HF folder -> (flat {key: np.ndarray}, file read). No torch needed.

  Order: model.safetensors, model.safetensors.index.json (sharded), pytorch_model.bin (restricted unpickler).
  """
  path = os.path.join(directory, SAFETENSORS)
  if os.path.isfile(path):
    return _load_safetensors(path), path
  index = os.path.join(directory, SAFETENSORS_INDEX)
  if os.path.isfile(index):
    state, origin = {}, {}
    for path in index_shards(directory, index):
      for key, value in _load_safetensors(path).items():
        if key in state:
          raise errors.UsageError(f'{key} is in two shards of {index}: {origin[key]} and {path}')
        state[key], origin[key] = value, path
    return state, index
  path = os.path.join(directory, TORCH_BIN)
  if os.path.isfile(path):
    from ovseg_jax.convert import torch_pickle  # pylint: disable=g-import-not-at-top
    return torch_pickle.state_dict_of(torch_pickle.load(path), path), path
  raise FileNotFoundError(f'expected BERT weights at {os.path.join(directory, SAFETENSORS)} '
                          f'(or {TORCH_BIN} beside it)')


def load_hf_folder(directory: str):
  """Reads an HF BERT folder (config.json + weights) -> (text_config ConfigDict, params of BertModel).

  Accepts BertModel files (keys `embeddings.*`) and BertForPreTraining / BertForMaskedLM files (keys
  `bert.embeddings.*`, heads `cls.*` dropped, see HEAD_KEYS); a head-model file without a pooler fails.
  """
  config_path = os.path.join(directory, 'config.json')
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'expected an HF BERT folder at {directory} (with config.json and {SAFETENSORS})')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'expected the HF BERT config at {config_path}')
  try:
    with open(config_path) as f:
      hf_config = json.load(f)
  except (OSError, ValueError, RecursionError) as e:   # not JSON, bad UTF-8, absurdly nested
    raise errors.UsageError(f'{config_path} is not a readable JSON file ({type(e).__name__}: '
                            f'{(str(e).splitlines() or [""])[0]})') from e
  if not isinstance(hf_config, dict):
    raise errors.UsageError(f'{config_path} must hold a JSON object (an HF BertConfig), not a '
                            f'{type(hf_config).__name__}')
  try:
    text_config = text_config_from_hf(hf_config)
  except (TypeError, ValueError, OverflowError) as e:   # e.g. "hidden_size": "big" or null
    raise errors.UsageError(f'{config_path}: {(str(e).splitlines() or [type(e).__name__])[0]}') from e
  state, path = read_hf_weights(directory)
  prefix = 'bert.' if any(k.startswith('bert.embeddings.') for k in state) else ''
  params, used = hf_to_params(state, text_config, prefix)
  other = sorted(k for k in set(state) - used if not any(re.fullmatch(p, k) for p in HEAD_KEYS))
  if other:
    raise ValueError(f'{len(other)} keys of {path} are neither BERT params nor known heads (e.g. {other[:3]})')
  return text_config, params


def save_bert_init(src_dir: str, dst_dir: str) -> str:
  """`python -m ovseg_jax.convert bert --src HF_DIR --dst DIR`: HF folder -> init format (module doc).

  Returns the absolute destination folder.
  """
  text_config, params = load_hf_folder(src_dir)
  meta = {'source': os.path.abspath(src_dir), 'converter': 'ovseg_jax.convert.bert'}
  return checkpoint.save_text_init(dst_dir, text_config, params, meta)


def load_bert_init(directory: str):
  """Reads `save_bert_init` output -> (text_config ConfigDict, params: nested dict of numpy arrays).

  The params must be exactly those of `BertModel(text_config)` (every mismatch is listed in one error).
  """
  text_config, params = checkpoint.load_text_init(directory)
  checkpoint.check_tree(params, param_shapes(text_config), f'{directory} (checked against its '
                        f'{checkpoint.TEXT_CONFIG})')
  return text_config, params
