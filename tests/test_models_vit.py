"""vit.py against NumPy / PyTorch written from the definitions: Block (LN eps, exact GELU, head split of the
fused qkv), DropPath, pos-embed resize, patch embed errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ovseg_jax.models import vit


def _ln(x, p, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _np_block(x, p, heads, eps):
  """Pre-norm block from its definition; qkv columns are [q; k; v] x (heads, head_dim)."""
  b, n, c = x.shape
  hd = c // heads
  y = _ln(x, p['norm1'], eps)
  qkv = y @ p['attn']['qkv']['kernel'] + p['attn']['qkv']['bias']
  q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(b, n, heads, hd) for i in range(3))
  logits = np.einsum('bnhd,bmhd->bhnm', q, k) / np.sqrt(hd)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum('bhnm,bmhd->bnhd', probs, v).reshape(b, n, c)
  x = x + o @ p['attn']['proj']['kernel'] + p['attn']['proj']['bias']
  h = _ln(x, p['norm2'], eps) @ p['mlp']['fc1']['kernel'] + p['mlp']['fc1']['bias']
  h = 0.5 * h * (1 + special.erf(h / np.sqrt(2)))  # exact GELU
  return x + h @ p['mlp']['fc2']['kernel'] + p['mlp']['fc2']['bias']


def _randomise(params, seed):
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [rng.normal(0, 0.3, l.shape).astype(np.float32) + (1 if l.ndim == 1 else 0)
                                   for l in leaves])


@pytest.mark.parametrize('heads', [1, 4])
def test_block_matches_numpy(heads):
  x = np.random.default_rng(0).normal(0, 0.01, (2, 7, 16)).astype(np.float32)  # tiny variance: eps matters
  block = vit.Block(heads, 4.0, True, 1e-5)
  params = _randomise(block.init(jax.random.PRNGKey(0), x)['params'], heads)
  ours = block.apply({'params': params}, x)
  ref = _np_block(x.astype(np.float64), jax.tree.map(np.float64, params), heads, 1e-5)
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-4)
  ref_eps6 = _np_block(x.astype(np.float64), jax.tree.map(np.float64, params), heads, 1e-6)
  assert np.abs(np.asarray(ours) - ref_eps6).max() > 1e-3  # the eps is really 1e-5, not Flax's 1e-6


def test_attention_mask_excludes_padding():
  x = np.random.default_rng(1).normal(size=(1, 5, 8)).astype(np.float32)
  attn = vit.Attention(2)
  params = attn.init(jax.random.PRNGKey(0), x)
  mask = np.array([[1, 1, 1, 0, 0]], bool)
  full = attn.apply(params, x, mask)
  changed = x.copy()
  changed[:, 3:] = 100.0  # padded positions must not influence the others
  np.testing.assert_allclose(attn.apply(params, changed, mask)[:, :3], full[:, :3], atol=1e-5)
  assert np.abs(np.asarray(attn.apply(params, changed)[:, :3] - full[:, :3])).max() > 1e-2


def test_drop_path_per_sample_and_scaled():
  x = jnp.ones((4000, 3, 2))
  out = vit.DropPath(0.25).apply({}, x, True, rngs={'dropout': jax.random.PRNGKey(0)})
  per_sample = np.asarray(out).reshape(4000, -1)
  assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))  # whole sample dropped
  assert abs((per_sample[:, 0] == 0).mean() - 0.25) < 0.03
  np.testing.assert_array_equal(vit.DropPath(0.25).apply({}, x, False), x)


def test_pos_embed_resize_matches_torch_bicubic():
  torch = pytest.importorskip('torch')
  pos = np.random.default_rng(2).normal(size=(16, 5)).astype(np.float32)
  assert vit.resize_pos_embed(pos, (4, 4)) is pos
  for grid in ((8, 8), (6, 3)):
    ref = torch.nn.functional.interpolate(torch.from_numpy(pos.reshape(1, 4, 4, 5)).permute(0, 3, 1, 2),
                                          size=grid, mode='bicubic', align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    np.testing.assert_allclose(vit.resize_pos_embed(pos, grid), ref, atol=1e-5)
  with pytest.raises(ValueError, match='not a square grid'):
    vit.resize_pos_embed(pos[:15], (4, 4))


def test_patch_embed_is_the_torch_conv_and_rejects_tiny_images():
  torch = pytest.importorskip('torch')
  img = np.random.default_rng(3).normal(size=(2, 8, 12, 3)).astype(np.float32)
  pe = vit.PatchEmbed(4, 6)
  params = pe.init(jax.random.PRNGKey(0), img)
  (tokens, grid) = pe.apply(params, img)
  conv = torch.nn.Conv2d(3, 6, 4, 4)
  with torch.no_grad():
    conv.weight.copy_(torch.tensor(np.asarray(params['params']['proj']['kernel']).transpose(3, 2, 0, 1)))
    conv.bias.copy_(torch.tensor(np.asarray(params['params']['proj']['bias'])))
    ref = conv(torch.from_numpy(img).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2).numpy()
  assert grid == (2, 3)
  np.testing.assert_allclose(tokens, ref, atol=1e-5)
  with pytest.raises(ValueError, match='smaller than one 4x4 patch'):
    pe.apply(params, img[:, :3])
  with pytest.raises(ValueError, match='NHWC'):
    pe.apply(params, img.transpose(0, 3, 1, 2))


def test_conv_stem_patch_embed_is_the_torch_stack_and_keeps_the_grid():
  """stem_channels=(c1, c2): conv3x3/2 + ReLU twice, then a (p/4)x(p/4) conv: torch's Sequential, same grid."""
  torch = pytest.importorskip('torch')
  img = np.random.default_rng(4).normal(size=(2, 16, 24, 3)).astype(np.float32)
  pe = vit.PatchEmbed(8, 6, stem_channels=(4, 5))
  params = pe.init(jax.random.PRNGKey(0), img)['params']
  assert sorted(params) == ['proj', 'stem_0', 'stem_1']
  tokens, grid = pe.apply({'params': params}, img)
  layers = [torch.nn.Conv2d(3, 4, 3, 2, 1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3, 2, 1), torch.nn.ReLU(),
            torch.nn.Conv2d(5, 6, 2, 2)]
  with torch.no_grad():
    for conv, name in zip(layers[::2], ('stem_0', 'stem_1', 'proj')):
      conv.weight.copy_(torch.tensor(np.asarray(params[name]['kernel']).transpose(3, 2, 0, 1)))
      conv.bias.copy_(torch.tensor(np.asarray(params[name]['bias'])))
    ref = torch.nn.Sequential(*layers)(torch.from_numpy(img).permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
  assert grid == (2, 3)
  np.testing.assert_allclose(tokens, ref.numpy(), atol=1e-5)
  with pytest.raises(ValueError, match='not divisible by 2\\^2'):
    vit.PatchEmbed(6, 6, stem_channels=(4, 5)).init(jax.random.PRNGKey(0), img)
