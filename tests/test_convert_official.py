"""The authors' checkpoint importer on a file holding EVERY key pattern of official_checkpoint_keys.txt at a
reduced size (width 24, 2+2 ViT blocks, 2 BERT layers, 6 -> 3 groups), wrapped as the authors do. Each tensor
is filled with values unique in the whole file, so every model variable can be traced back to exactly one
source key and element: nothing dropped (beyond the documented DONT_LOAD), nothing misplaced, every
transpose right."""

import os
import re

import numpy as np
import pytest

from configs import tiny
from ovseg_jax.convert import official
from tests import official_keys

torch = pytest.importorskip('torch')

VITB_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'vitb.py')
# full-size dim -> reduced dim (every dim of the ViT-B/BERT-base key list has a unique meaning)
DIMS = {768: 24, 2304: 72, 3072: 96, 4096: 40, 256: 12, 384: 12, 64: 6, 8: 3, 196: 16, 16: 4, 30522: 50,
        512: 20, 3: 3, 2: 2, 1: 1}
STRIDE = 4096  # value = key_index * STRIDE + element index: unique and exact in float32
ALLOWED_DROPS = (r'logit_scale_mask', r'.*num_batches_tracked', r'multimodal_groupingblock\.blocks\.0\.assign\..*',
                 r'text_encoder\.transformer\.embeddings\.position_ids')


class _AuthorsConfig:
  """Stands in for their OmegaConf DictConfig: unpickling it for real would write a marker file."""

  def __init__(self, marker):
    self.marker = marker

  def __setstate__(self, state):
    with open(state['marker'], 'w') as f:
      f.write('executed')


def _reduced_keys(reference_dir):
  """Every key pattern of the authors' model, with blocks/layers >= 2 dropped and widths reduced by DIMS."""
  out = []
  for key, shape, dtype in official_keys.read_official_keys(reference_dir):
    m = re.search(r'(?:blocks|layer)\.(\d+)\.', key)
    if m and int(m.group(1)) >= 2:
      continue
    out.append((key, tuple(DIMS[d] for d in shape), dtype))
  return out


def _state(keys):
  sd = {}
  for i, (key, shape, dtype) in enumerate(keys):
    if dtype == 'int64':
      sd[key] = torch.tensor(100)
    else:
      sd[key] = (torch.arange(int(np.prod(shape)), dtype=torch.float64) + i * STRIDE).float().reshape(shape)
  sd['text_encoder.transformer.embeddings.position_ids'] = torch.arange(20).reshape(1, 20)
  return sd


@pytest.fixture(scope='module')
def synthetic(golden_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('official')
  keys = _reduced_keys(golden_dir)
  sd = _state(keys)
  marker = str(tmp / 'config_executed')
  path = str(tmp / 'ckpt.pth')
  torch.save({'model': sd, 'optimizer': {}, 'lr_scheduler': {}, 'epoch': 3,
              'config': _AuthorsConfig(marker)}, path)
  base = tiny.get_config().model
  model_config, variables, teacher, stored = official.load_official(path, base)
  assert not os.path.exists(marker)  # the config's class was never executed
  return dict(keys=keys, sd={k: v.numpy() for k, v in sd.items()}, model_config=model_config,
              variables=variables, teacher=teacher, stored=stored, path=path, tmp=tmp)


def _expected_path(key):
  """Where a source key must land: (collection, path) written from the layout spec, independent of
  official.py's rename table."""
  if key == 'logit_scale':
    return 'params', ('logit_scale',)
  top, rest = key.split('.', 1)
  if top.startswith('img_encoder'):
    root = 'teacher' if top == 'img_encoder_momentum' else 'img_encoder'
    if rest in ('pos_embed', 'layers.0.group_token'):
      return 'params', (root, rest.split('.')[-1])
    rest = re.sub(r'^layers\.0\.blocks\.(\d+)\.', r'stage1_block\1.', rest)
    rest = re.sub(r'^layers\.1\.blocks\.(\d+)\.', r'stage2_block\1.', rest)
    rest = rest.replace('layers.0.downsample.', 'binding.')
    parts = (root,) + tuple(rest.split('.'))
  elif top.endswith('_projector'):
    rest = rest.replace('linear_hidden.0.', 'linear_hidden.').replace('linear_hidden.1.', 'bn.')
    parts = (top,) + tuple(rest.split('.'))
  elif top == 'multimodal_groupingblock':
    rest = rest.replace('blocks.0.', '').replace('pre_assign_attn.', 'cross_attn.').replace('post_attn.', 'self_attn.')
    parts = ('decoder',) + tuple(rest.split('.'))
  else:
    rest = rest.replace('transformer.', '')
    rest = re.sub(r'layer\.(\d+)\.', r'layer_\1.', rest)
    parts = ('text_encoder',) + tuple(rest.split('.'))
  leaf = parts[-1]
  if leaf == 'running_mean':
    return 'batch_stats', parts[:-1] + ('mean',)
  if leaf == 'running_var':
    return 'batch_stats', parts[:-1] + ('var',)
  return 'params', parts[:-1] + (leaf,)


def _get(tree, path):
  for p in path:
    tree = tree[p]
  return np.asarray(tree)


def test_every_key_lands_where_it_belongs(synthetic):
  sd, variables, teacher = synthetic['sd'], synthetic['variables'], synthetic['teacher']
  assert teacher is not None
  trees = {'params': dict(variables['params'], teacher=teacher), 'batch_stats': variables['batch_stats']}
  placed = set()
  for key, src in sd.items():
    if any(re.fullmatch(p, key) for p in ALLOWED_DROPS):
      continue
    collection, path = _expected_path(key)
    leaf = path[-1]
    if leaf == 'weight':  # LayerNorm / BN affine -> scale, nn.Embedding -> embedding, Linear / Conv -> kernel
      new = 'scale' if src.ndim == 1 else 'embedding' if key.endswith('_embeddings.weight') else 'kernel'
      path = path[:-1] + (new,)
    dst = _get(trees[collection], path)
    if path[-1] == 'kernel' and src.ndim == 2:
      want = src.T                                   # Linear [out, in] -> [in, out]
    elif path[-1] == 'kernel' and src.ndim == 3:
      want = src[:, :, 0].T                          # Conv1d k=1 [out, in, 1]
    elif path[-1] == 'kernel' and src.ndim == 4:
      want = src.transpose(2, 3, 1, 0)               # Conv2d [out, in, kh, kw] -> [kh, kw, in, out]
    elif path[-1] == 'group_token':
      want = src[0]
    else:
      want = src
    np.testing.assert_array_equal(dst, want, err_msg=key)
    placed.add(key)
  # every variable is accounted for: the multiset of source-key indices over all leaves is exactly `placed`
  index = {k: i for i, (k, _, _) in enumerate(synthetic['keys'])}
  seen = set()
  for collection, tree in trees.items():
    for leaf in _leaves(tree):
      ids = np.unique(np.floor(np.asarray(leaf, np.float64) / STRIDE).astype(int))
      assert len(ids) == 1, f'a {collection} variable mixes several source keys: {ids}'
      seen.add(int(ids[0]))
  assert seen == {index[k] for k in placed}
  n_drop = sum(any(re.fullmatch(p, k) for p in ALLOWED_DROPS) for k in sd)
  assert len(placed) + n_drop == len(sd)
  print(f'{len(placed)} keys placed, {n_drop} dropped by DONT_LOAD, {len(sd)} in the file')


def _leaves(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _leaves(v)
  else:
    yield tree


def test_qkv_rows_are_q_k_v_then_heads(synthetic):
  """The fused qkv kernel's column j is torch row j: [q; k; v], each (heads, head_dim)."""
  sd, params = synthetic['sd'], synthetic['variables']['params']
  src = sd['img_encoder.layers.0.blocks.1.attn.qkv.weight']  # [3C, C]
  kernel = np.asarray(params['img_encoder']['stage1_block1']['attn']['qkv']['kernel'])  # [C, 3C]
  c = kernel.shape[0]
  heads = synthetic['model_config'].vision.num_heads
  q = kernel[:, :c].reshape(c, heads, c // heads)
  np.testing.assert_array_equal(q[:, 1, 0], src[c // heads])  # head 1, dim 0 of q = torch row C/H
  np.testing.assert_array_equal(kernel[:, 2 * c], src[2 * c])  # first v row


def test_inferred_config(synthetic):
  mc = synthetic['model_config']
  assert mc.vision.width == 24 and tuple(mc.vision.depths) == (2, 2) and mc.vision.patch_size == 4
  assert mc.vision.img_size == 16
  assert (mc.binding.num_group_tokens, mc.binding.num_output_groups, mc.binding.token_mlp_ratio) == (6, 3, 0.5)
  assert (mc.proj.hidden, mc.proj.out) == (40, 12)
  assert (mc.text.width, mc.text.num_layers, mc.text.intermediate, mc.text.vocab_size) == (24, 2, 96, 50)
  assert synthetic['stored'] is None  # the stand-in config is not an OmegaConf tree


def _resave(synthetic, edit, name):
  sd = {k: torch.from_numpy(np.array(v)) for k, v in synthetic['sd'].items()}
  edit(sd)
  path = str(synthetic['tmp'] / name)
  torch.save({'model': sd}, path)
  return path


def test_missing_key_is_named(synthetic):
  path = _resave(synthetic, lambda sd: sd.pop('img_encoder.layers.0.downsample.norm_x.bias'), 'missing.pth')
  with pytest.raises(ValueError, match=r'img_encoder/binding/norm_x/bias'):
    official.load_official(path, tiny.get_config().model)


def test_unknown_key_is_named(synthetic):
  def add(sd):
    sd['img_encoder.layers.0.downsample.extra.weight'] = torch.ones(3)
  with pytest.raises(ValueError, match=r'img_encoder\.layers\.0\.downsample\.extra\.weight'):
    official.load_official(_resave(synthetic, add, 'extra.pth'), tiny.get_config().model)


def test_shape_mismatch_names_key_and_shapes(synthetic):
  def bad(sd):
    sd['img_encoder.layers.1.blocks.0.mlp.fc1.weight'] = torch.ones(95, 24)
  with pytest.raises(ValueError, match=r'mlp\.fc1\.weight: shape \(24, 95\).*\(24, 96\)'):
    official.load_official(_resave(synthetic, bad, 'shape.pth'), tiny.get_config().model)


def test_another_architecture_and_missing_file(synthetic, golden_dir):
  with pytest.raises(ValueError, match='not an OVSegmentor checkpoint: key img_encoder.pos_embed'):
    official.load_official(os.path.join(golden_dir, 'fake_dino.pth'), tiny.get_config().model)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    official.load_official(str(synthetic['tmp'] / 'nope.pth'), tiny.get_config().model)


def test_cli_errors_are_one_line(synthetic, golden_dir, capsys):
  from ovseg_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top
  cases = [
      (['official', '--src', str(synthetic['tmp'] / 'nope.pth'), '--dst', str(synthetic['tmp'] / 'o')],
       'does not exist'),
      (['official', '--src', os.path.join(golden_dir, 'fake_dino.pth'), '--dst', str(synthetic['tmp'] / 'o')],
       'not an OVSegmentor checkpoint'),
      (['dino', '--src', synthetic['path'], '--dst', str(synthetic['tmp'] / 'd'), '--config', VITB_CONFIG],
       'not a DINO ViT state dict'),
  ]
  for argv, needle in cases:
    assert convert_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and needle in err and err.count('\n') == 1, err
