"""DINO import. What is compared: a PyTorch ViT with DINO's state-dict layout (random weights, saved with
torch.save) run on the patch tokens only (no cls token, as the authors' model) — patch embed + pos_embed[1:]
(bicubic-resized by torch at 448 px) + all blocks + norm — against our PatchEmbed + resize_pos_embed + the
stage-1 and stage-2 `vit.Block`s + final LN holding the imported weights, on the same patch tokens. The group
tokens and the binding module, which DINO does not have, are not part of this comparison (they are covered by
the golden test). Both sides use the official model's choices (LN eps 1e-5, config head count)."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from configs import vits
from ovseg_jax import checkpoint
from ovseg_jax.convert import __main__ as convert_main
from ovseg_jax.convert import dino
from ovseg_jax.convert import official
from ovseg_jax.models import visual
from ovseg_jax.models import vit

torch = pytest.importorskip('torch')
WIDTH, HEADS, DEPTHS = 32, 2, (2, 2)


class _Block(torch.nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.norm1, self.norm2 = torch.nn.LayerNorm(dim, eps=1e-5), torch.nn.LayerNorm(dim, eps=1e-5)
    self.attn = torch.nn.Module()
    self.attn.qkv, self.attn.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
    self.mlp = torch.nn.Module()
    self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.Linear(4 * dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = ((qkv[0] @ qkv[1].transpose(-2, -1)) * (c // self.heads) ** -0.5).softmax(-1)
    x = x + self.attn.proj((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c))
    return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class _DinoViT(torch.nn.Module):
  """facebookresearch/dino `VisionTransformer` key layout."""

  def __init__(self, dim, depth, heads, patch=16, side=14):
    super().__init__()
    self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = torch.nn.Parameter(torch.randn(1, 1 + side * side, dim) * 0.5)
    self.patch_embed = torch.nn.Module()
    self.patch_embed.proj = torch.nn.Conv2d(3, dim, patch, patch)
    self.blocks = torch.nn.ModuleList([_Block(dim, heads) for _ in range(depth)])
    self.norm = torch.nn.LayerNorm(dim, eps=1e-5)
    self.side = side

  def patch_features(self, images):
    x = self.patch_embed.proj(images)
    h, w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    pos = self.pos_embed[:, 1:].reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)
    if (h, w) != (self.side, self.side):
      pos = torch.nn.functional.interpolate(pos, size=(h, w), mode='bicubic', align_corners=False)
    x = x + pos.permute(0, 2, 3, 1).reshape(1, h * w, -1)
    for blk in self.blocks:
      x = blk(x)
    return self.norm(x)


def _model_config():
  m = ml_collections.ConfigDict(tiny.get_config().model.to_dict())
  m.vision.update(width=WIDTH, depths=DEPTHS, num_heads=HEADS, patch_size=16, img_size=224, stem_channels=())
  return m


@pytest.fixture(scope='module')
def dino_file(tmp_path_factory):
  torch.manual_seed(0)
  net = _DinoViT(WIDTH, sum(DEPTHS), HEADS).eval()
  with torch.no_grad():
    for name, p in net.named_parameters():
      if name.endswith('weight') and p.ndim > 1:
        p.normal_(0, p[0].numel() ** -0.5)  # unit gain: activations stay O(1) through the blocks
      elif name.endswith('weight'):
        p.normal_(1, 0.1)
      elif name.endswith('bias'):
        p.normal_(0, 0.05)
  path = str(tmp_path_factory.mktemp('dino') / 'dino.pth')
  torch.save(net.state_dict(), path)
  return net, path


def _ours(params, images, mc):
  vc = mc.vision
  x, grid = vit.PatchEmbed(16, WIDTH).apply({'params': params['patch_embed']}, images)
  x = x + vit.resize_pos_embed(jnp.asarray(params['pos_embed']), grid)[None]
  names = [f'stage1_block{i}' for i in range(vc.depths[0])] + [f'stage2_block{j}' for j in range(vc.depths[1])]
  for name in names:
    x = vit.Block(vc.num_heads, vc.mlp_ratio, True, vc.ln_eps).apply({'params': params[name]}, x)
  return vit.layer_norm(vc.ln_eps, jnp.float32).apply({'params': params['norm']}, x)


@pytest.mark.parametrize('size,tol', [(224, 1e-4), (448, 1e-3)])
def test_dino_features_match_pytorch(dino_file, size, tol):
  net, path = dino_file
  mc = _model_config()
  params = dino.load_dino(path, mc)
  images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net.patch_features(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
  ours = np.asarray(jax.jit(lambda p, x: _ours(p, x, mc))(params, images))
  worst = np.abs(ours - ref).max()
  print(f'DINO {size}px: worst abs diff {worst:.2e} (max |ref| {np.abs(ref).max():.2f})')
  assert ours.shape == (2, (size // 16) ** 2, WIDTH)
  assert worst < tol


def test_cli_init_merges_into_a_fresh_encoder(dino_file, tmp_path):
  net, path = dino_file
  mc = _model_config()
  cfg_path = tmp_path / 'cfg.py'
  cfg_path.write_text('import ml_collections, json\n'
                      f'def get_config(arg=None):\n  c = ml_collections.ConfigDict()\n'
                      f'  c.model = ml_collections.ConfigDict(json.loads({mc.to_json()!r}))\n  return c\n')
  dst = str(tmp_path / 'init')
  assert convert_main.main(['dino', '--src', path, '--dst', dst, '--config', str(cfg_path)]) == 0
  loaded = dino.load_dino_init(dst)['img_encoder']
  assert 'group_token' not in loaded and 'binding' not in loaded
  enc = visual.VisualEncoder(ml_collections.FrozenConfigDict(mc))
  abstract = jax.eval_shape(enc.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  rng = np.random.default_rng(0)
  fresh = jax.tree.map(lambda l: rng.normal(0, 0.1, l.shape).astype(np.float32), abstract)
  merged = checkpoint.merge_params(fresh, loaded, 'DINO init', allow_missing=True)
  np.testing.assert_array_equal(merged['norm']['scale'], net.norm.weight.detach().numpy())
  np.testing.assert_array_equal(merged['group_token'], fresh['group_token'])
  out = jax.jit(enc.apply)({'params': merged}, np.zeros((1, 32, 48, 3), np.float32))
  assert out['x'].shape == (1, mc.binding.num_output_groups, WIDTH) and out['grid'] == (2, 3)


def test_fake_dino_equals_the_official_img_encoder(golden_dir):
  """golden_small/fake_dino.pth is the file the authors' encoder was built from (README): importing it must
  give exactly the checkpoint's img_encoder, except the group tokens and binding module DINO lacks."""
  from configs import vitb  # pylint: disable=g-import-not-at-top
  mc, variables, _, _ = official.load_official(os.path.join(golden_dir, 'official_ckpt.pth'), vitb.get_config().model)
  ours = official.flatten(dino.load_dino(os.path.join(golden_dir, 'fake_dino.pth'), mc))
  ref = official.flatten(variables['params']['img_encoder'])
  assert set(ref) - set(ours) == {k for k in ref if k[0] in ('group_token', 'binding')}
  for k, v in ours.items():
    np.testing.assert_array_equal(v, ref[k], err_msg=str(k))


def test_vit_s16_layout_and_errors(golden_dir):
  """A ViT-S/16-shaped DINO state dict (384 wide, 12 blocks, `module.backbone.`-prefixed with a head, as in
  DINO training files)
  maps onto configs/vits.py; wrong depth / width give one-line errors naming the problem."""
  mc = vits.get_config().model
  d = 384
  sd = {'cls_token': np.zeros((1, 1, d)), 'pos_embed': np.zeros((1, 197, d)),
        'patch_embed.proj.weight': np.zeros((d, 3, 16, 16)), 'patch_embed.proj.bias': np.zeros(d),
        'norm.weight': np.ones(d), 'norm.bias': np.zeros(d)}
  for i in range(12):
    for name, shape in (('norm1', (d,)), ('norm2', (d,)), ('attn.qkv', (3 * d, d)), ('attn.proj', (d, d)),
                        ('mlp.fc1', (4 * d, d)), ('mlp.fc2', (d, 4 * d))):
      sd[f'blocks.{i}.{name}.weight'] = np.full(shape, i, np.float32)
      sd[f'blocks.{i}.{name}.bias'] = np.zeros(shape[0], np.float32)
  wrapped = {'module.backbone.' + k: v for k, v in sd.items()}
  wrapped['module.head.last_layer.weight'] = np.zeros((7, d))  # DINO training checkpoint layout
  params = dino.dino_to_params(wrapped, mc)
  assert params['stage2_block5']['mlp']['fc1']['kernel'].shape == (d, 4 * d)
  assert float(params['stage2_block5']['mlp']['fc1']['kernel'][0, 0]) == 11
  assert params['pos_embed'].shape == (196, d)
  short = {k: v for k, v in sd.items() if not k.startswith('blocks.11.')}
  with pytest.raises(ValueError, match='has 11 blocks'):
    dino.dino_to_params(short, mc)
  stem = mc.copy_and_resolve_references()
  stem.vision.stem_channels = (32, 64)
  with pytest.raises(ValueError, match='no conv stem'):
    dino.dino_to_params(sd, stem)
  with pytest.raises(ValueError, match=r'pos_embed: shape \(196, 64\).*\(196, 384\)'):
    dino.load_dino(os.path.join(golden_dir, 'fake_dino.pth'), mc)
