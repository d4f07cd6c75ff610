"""The binding module: assignment maps, straight-through gradients, Gumbel noise, and the paper form
(K_in == K_out, soft assignment) against Eq. 3-6 computed directly in NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from ovseg_jax.models import binding

B, L, K_IN, K_OUT, C = 2, 12, 6, 3, 16


def _inputs(seed=0, k_in=K_IN):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(B, L, C)).astype(np.float32), rng.normal(size=(B, k_in, C)).astype(np.float32)


def _init(module, x, g):
  """Unit-gain random weights (as the golden harness uses) so assignments are far from uniform."""
  params = module.init({'params': jax.random.PRNGKey(0), 'gumbel': jax.random.PRNGKey(1)}, x, g)['params']
  rng = np.random.default_rng(7)

  def draw(path, p):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(0, 1 / np.sqrt(p.shape[0]), p.shape).astype(np.float32)
    return (rng.normal(0, 0.1, p.shape) + (name == 'scale')).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.fixture(scope='module')
def official():
  x, g = _inputs()
  module = binding.GroupingBlock(K_OUT, num_heads=2, assignment='gumbel_hard')
  return module, _init(module, x, g), x, g


@pytest.mark.parametrize('train,deterministic', [(False, False), (True, False), (True, True)])
def test_maps_are_distributions_and_one_hot(official, train, deterministic):
  module, params, x, g = official
  out = module.apply({'params': params}, x, g, train, deterministic, rngs={'gumbel': jax.random.PRNGKey(2)})
  assert out['x'].shape == (B, K_OUT, C) and out['soft'].shape == (B, K_OUT, L)
  assert out['q'].shape == (B, K_OUT, C) and out['k'].shape == (B, L, C)
  np.testing.assert_allclose(np.asarray(out['soft']).sum(1), 1.0, atol=1e-6)  # softmax over the groups
  hard = np.asarray(out['hard'])
  np.testing.assert_allclose(hard.sum(1), 1.0, atol=1e-6)
  assert np.all((np.abs(hard) < 1e-6) | (np.abs(hard - 1) < 1e-6))
  if not (train and not deterministic):  # noise-free: hard is the argmax of the soft map
    np.testing.assert_array_equal(hard.argmax(1), np.asarray(out['soft']).argmax(1))


def test_gumbel_noise_is_drawn_from_the_rng(official):
  module, params, x, g = official
  hards = [np.asarray(module.apply({'params': params}, x, g, True, rngs={'gumbel': jax.random.PRNGKey(s)})['hard'])
           for s in range(3)]
  assert not np.array_equal(hards[0], hards[1]) or not np.array_equal(hards[0], hards[2])
  with pytest.raises(Exception, match='gumbel'):
    module.apply({'params': params}, x, g, True)  # train mode needs the 'gumbel' stream


def test_straight_through_gradient(official):
  module, params, x, g = official

  def loss(p, det):
    out = module.apply({'params': p}, x, g, True, det, rngs={'gumbel': jax.random.PRNGKey(0)})
    return jnp.sum(out['x'] ** 2)

  for det in (True, False):
    grads = jax.grad(loss)(params, det)
    # q_proj / k_proj only reach the output through the (hard) assignment: non-zero => straight-through works
    assert float(jnp.abs(grads['assign']['q_proj']['kernel']).max()) > 1e-6
    assert float(jnp.abs(grads['assign']['k_proj']['kernel']).max()) > 1e-6
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  w = jnp.arange(20.0).reshape(4, 5)
  st = jax.grad(lambda z: jnp.sum(w * binding.straight_through_hard(jax.nn.softmax(z, 0), 0)))(logits)
  soft = jax.grad(lambda z: jnp.sum(w * jax.nn.softmax(z, 0)))(logits)
  np.testing.assert_allclose(st, soft, atol=1e-6)


def _ln(x, p, eps=1e-5):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ p['kernel'] + p['bias']


def _mlp(x, p):
  h = _dense(x, p['fc1'])
  return _dense(0.5 * h * (1 + special.erf(h / np.sqrt(2))), p['fc2'])


def _softmax(z, axis):
  e = np.exp(z - z.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def test_paper_mode_equals_eq3_to_6_in_numpy():
  x, g = _inputs(1, k_in=K_OUT)
  module = binding.GroupingBlock(K_OUT, num_heads=2, assignment='soft')
  params = _init(module, x, g)
  assert 'mlp_inter' not in params and 'norm_post_tokens' not in params  # no token MLP when K_in == K_out
  out = module.apply({'params': params}, x, g, True)  # soft mode: train needs no rng, no noise
  p = jax.tree.map(np.float64, params)
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  gn, xn = _ln(g64, p['norm_tokens']), _ln(x64, p['norm_x'])
  # pre-assignment cross-attention block (2 heads, post-norm)
  pa = p['pre_assign_attn']
  q = _dense(gn, pa['attn']['q_proj']).reshape(B, K_OUT, 2, C // 2)
  k = _dense(xn, pa['attn']['k_proj']).reshape(B, L, 2, C // 2)
  v = _dense(xn, pa['attn']['v_proj']).reshape(B, L, 2, C // 2)
  a = _softmax(np.einsum('bkhd,blhd->bhkl', q, k) / np.sqrt(C // 2), -1)
  y = gn + _dense(np.einsum('bhkl,blhd->bkhd', a, v).reshape(B, K_OUT, C), pa['attn']['proj'])
  y = _ln(y + _mlp(_ln(y, pa['norm2']), pa['mlp']), pa['norm_post'])
  # Eq. 4: A = softmax over groups of q k^T / sqrt(C)
  asg = p['assign']
  A = _softmax(np.einsum('bkc,blc->bkl', _dense(y, asg['q_proj']), _dense(xn, asg['k_proj'])) / np.sqrt(C), 1)
  # Eq. 5: groups = weighted mean of the assigned values (official +1 in the normaliser); Eq. 6: residual
  z = _dense(np.einsum('bkl,blc->bkc', A / (A.sum(-1, keepdims=True) + 1), _dense(xn, asg['v_proj'])),
             asg['proj']) + y
  z = z + _mlp(_ln(z, p['norm_new_x']), p['mlp_channels'])
  np.testing.assert_allclose(out['soft'], A, atol=1e-5)
  np.testing.assert_allclose(out['hard'], A, atol=1e-5)  # soft assignment throughout
  np.testing.assert_allclose(out['x'], z, atol=1e-4, rtol=1e-4)


def test_unknown_assignment_is_an_error(official):
  _, params, x, g = official
  with pytest.raises(ValueError, match='assignment'):
    binding.GroupingBlock(K_OUT, num_heads=2, assignment='sinkhorn').apply({'params': params}, x, g)
