"""facebookresearch/dino ViT checkpoints (ViT-S/16, ViT-B/16) -> the visual encoder's params.

Which DINO blocks go where: docs/paper_vs_authors.md Q30.

Source layout: cls_token [1,1,D], pos_embed [1,1+L,D], patch_embed.proj.{weight [D,3,p,p], bias},
blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight, bias}, norm.{weight, bias}
(a DINO training checkpoint's `teacher` entry also works: its `module.` / `backbone.` prefixes are stripped
and its `head.*` projection head is dropped). Mapping, as the authors' loader does:
  blocks.i (i < depths[0]) -> img_encoder/stage1_block{i};  blocks.i (i >= depths[0]) -> stage2_block{i-depths[0]}
  pos_embed[0, 1:] -> img_encoder/pos_embed [L, D]   (the cls position is dropped; cls_token is unused)
  norm -> img_encoder/norm (the LN after the K_out groups);  patch_embed.proj -> patch_embed/proj
The group tokens and the binding module have no DINO counterpart and keep their fresh init
(`NOT_IN_SOURCE`). DINO's 12-head (ViT-B) qkv is run with config.model.vision.num_heads heads (official: 8).

Init format written by `save_dino_init` (read by `load_dino_init`, used by `--config.train.init_from`): the
inference-checkpoint layout of checkpoint.py, holding only what DINO provides:
    DIR/variables/       Orbax tree {'params': {'img_encoder': <the loaded params only>}}
    DIR/model_config.json  the `config.model` it was checked against;  DIR/meta.json provenance
Merge it into freshly initialised params with `checkpoint.merge_params(..., allow_missing=True)`.
"""

import re

import jax
import jax.numpy as jnp
import ml_collections

from ovseg_jax import checkpoint
from ovseg_jax import fileio
from ovseg_jax.convert import official
from ovseg_jax.convert import torch_pickle
from ovseg_jax.models import visual as visual_lib

DONT_LOAD = (
    r'cls_token',   # the authors' model has no cls token (docs/paper_vs_authors.md Q2)
    r'head\..*',    # DINO's projection head (training checkpoints); not part of the backbone
)
NOT_IN_SOURCE = (r'group_token', r'binding/.*')  # learnable group tokens and binding module start fresh
_PREFIXES = ('module.', 'backbone.')  # DataParallel / DINO MultiCropWrapper prefixes, stripped in this order


def _strip(sd: dict) -> dict:
  for p in _PREFIXES:
    if sd and all(k.startswith(p) for k in sd if not k.startswith('head.')):
      sd = {k[len(p):] if k.startswith(p) else k: v for k, v in sd.items()}
  return sd


def visual_abstract(model_config) -> dict:
  model = visual_lib.VisualEncoder(ml_collections.FrozenConfigDict(model_config))
  s = model_config.vision.img_size
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, s, s, 3))))['params']


def dino_to_params(sd: dict, model_config) -> dict:
  """DINO state dict -> nested img_encoder params (only those DINO provides). Strict (module doc)."""
  sd = _strip(sd)
  vc = model_config.vision
  d1 = vc.depths[0]
  if 'pos_embed' not in sd or 'patch_embed.proj.weight' not in sd:
    raise ValueError('not a DINO ViT state dict: pos_embed / patch_embed.proj.weight missing')
  if tuple(vc.stem_channels):
    raise ValueError(f'config.model.vision.stem_channels={tuple(vc.stem_channels)}: DINO has a plain patch embed '
                     'and no conv stem; set --config.model.vision.stem_channels="()" to load it')
  nblocks = official.count_indexed('blocks.', sd)
  if nblocks != sum(vc.depths):
    raise ValueError(f'DINO checkpoint has {nblocks} blocks but config.model.vision.depths={tuple(vc.depths)} '
                     f'needs {sum(vc.depths)}')
  converted = {}
  for key, value in sd.items():
    if any(re.fullmatch(p, key) for p in DONT_LOAD):
      continue
    if key == 'pos_embed':
      if value.ndim != 3 or value.shape[0] != 1:
        raise ValueError(f'DINO key pos_embed: shape {value.shape}, expected [1, 1+L, D]')
      converted[key] = ('params', ('pos_embed',), value[0, 1:])
      continue
    m = re.match(r'blocks\.(\d+)\.(.*)$', key)
    if m:
      i = int(m.group(1))
      key_ours = (f'layers.0.blocks.{i}.' if i < d1 else f'layers.1.blocks.{i - d1}.') + m.group(2)
    else:
      key_ours = key
    tgt = official.target_of('img_encoder.' + key_ours, value)
    if tgt is None:
      raise ValueError(f'DINO key {key} fits no visual-encoder param')
    collection, path, conv = tgt
    converted[key] = (collection, path[1:], conv)
  targets = {('params',) + k: v for k, v in official.flatten(visual_abstract(model_config)).items()}
  targets = {k: v for k, v in targets.items()
             if not any(re.fullmatch(p, '/'.join(k[1:])) for p in NOT_IN_SOURCE)}
  flat = official.place(converted, targets, DONT_LOAD, source_name='DINO')
  return official.unflatten({k[1:]: v for k, v in flat.items()})


def load_dino(path: str, model_config) -> dict:
  """Reads a DINO `.pth` -> nested img_encoder params (see `dino_to_params`)."""
  visual_lib.compute_dtype(model_config)
  obj = torch_pickle.load(path)
  if isinstance(obj, dict) and isinstance(obj.get('teacher'), dict):
    obj = obj['teacher']  # a DINO training checkpoint: the teacher is the released backbone
  return dino_to_params(torch_pickle.state_dict_of(obj, path), model_config)


def save_dino_init(src: str, dst: str, model_config) -> str:
  """`python -m ovseg_jax.convert dino --src dino.pth --dst DIR --config configs/vitb.py`; -> the folder."""
  params = load_dino(src, model_config)
  meta = {'source': fileio.abspath(src), 'converter': 'ovseg_jax.convert.dino',
          'not_in_source': list(NOT_IN_SOURCE)}
  return checkpoint.save_inference(dst, model_config, {'params': {'img_encoder': params}}, meta)


def load_dino_init(directory: str) -> dict:
  """Reads `save_dino_init` output -> {'img_encoder': nested numpy params (partial, see NOT_IN_SOURCE)}."""
  return checkpoint.load_inference(directory)[1]['params']
