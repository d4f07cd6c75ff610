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


def _numpy_refine(q, k, iters, scale):
  """Soft spherical k-means, written directly: the oracle for binding.refine_queries."""
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  def logits(c):
    return scale * np.einsum('bkc,blc->bkl', c / np.linalg.norm(c, axis=-1, keepdims=True), kn)
  c = q.astype(np.float64)
  for _ in range(iters):
    a = special.softmax(logits(c), axis=1)
    c = np.einsum('bkl,blc->bkc', a, kn) / (a.sum(-1, keepdims=True) + 1e-6)
  return c, logits(c)


def test_refine_queries_is_soft_spherical_kmeans():
  rng = np.random.default_rng(3)
  q, k = rng.normal(size=(B, K_OUT, C)), rng.normal(size=(B, L, C))
  want_q, want_raw = _numpy_refine(q, k, 3, 10.0)
  got_q, got_raw = binding.refine_queries(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32), 3, 10.0)
  np.testing.assert_allclose(got_q, want_q, atol=2e-5)
  np.testing.assert_allclose(got_raw, want_raw, atol=2e-4)


def test_refine_moves_queries_to_the_key_clusters():
  """Two tight key clusters, queries pointing between a cluster and a third direction: the rounds move each
  query onto its cluster's mean direction (the k-means fixed point) and split the keys by cluster."""
  rng = np.random.default_rng(4)
  c = np.eye(C)[:3] * 5
  k = np.concatenate([c[0] + 0.1 * rng.normal(size=(6, C)), c[1] + 0.1 * rng.normal(size=(6, C))])
  q = np.stack([c[0] + 0.8 * c[2], c[1] + 0.8 * c[2]])
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
  means = unit(np.stack([unit(k[:6]).mean(0), unit(k[6:]).mean(0)]))
  for iters, lo, hi in ((0, 0.7, 0.8), (3, 0.99, 1.01)):
    got, raw = binding.refine_queries(jnp.asarray(q[None], jnp.float32), jnp.asarray(k[None], jnp.float32),
                                      iters, 10.0)
    cos = np.sum(unit(np.asarray(got[0], np.float64)) * means, axis=-1)
    assert np.all((cos > lo) & (cos < hi)), (iters, cos)
    np.testing.assert_array_equal(np.asarray(raw[0]).argmax(0), [0] * 6 + [1] * 6)


def test_refine_keeps_the_param_tree():
  x, g = _inputs()
  plain = binding.GroupingBlock(K_OUT, num_heads=2).init(jax.random.PRNGKey(0), x, g)['params']
  refined = binding.GroupingBlock(K_OUT, num_heads=2, refine_iters=2).init(jax.random.PRNGKey(0), x, g)['params']
  assert jax.tree_util.tree_structure(plain) == jax.tree_util.tree_structure(refined)


@pytest.mark.parametrize('residual', [True, False])
def test_query_residual_off_keeps_only_the_pooled_patches(official, residual):
  """query_residual=False drops Eq. 6's `+ y`. Shifting every pre-assignment query by the same vector (the
  bias of pre_assign_attn's last layer) leaves the assignment unchanged (softmax over groups), so without
  the residual the groups stay the same, and with it they move by the shift."""
  _, params, x, g = official
  module = binding.GroupingBlock(K_OUT, num_heads=2, query_residual=residual)
  shifted = jax.tree_util.tree_map(lambda p: p, params)
  bias = shifted['pre_assign_attn']['norm_post']['bias']
  shifted['pre_assign_attn']['norm_post']['bias'] = bias + np.random.default_rng(1).normal(size=bias.shape)
  a = module.apply({'params': params}, x, g)
  b = module.apply({'params': shifted}, x, g)
  np.testing.assert_array_equal(a['hard'], b['hard'])
  change = float(np.abs(np.asarray(a['x']) - np.asarray(b['x'])).max())
  assert (change < 1e-5) if not residual else (change > 0.1), change


def _numpy_farthest(k, num):
  """Farthest-point seeding, written directly: the oracle for binding.farthest_keys."""
  out = []
  for kb in k / np.linalg.norm(k, axis=-1, keepdims=True):
    mean = kb.mean(0) / np.linalg.norm(kb.mean(0))
    idx = [int(np.argmin(kb @ mean))]
    while len(idx) < num:
      idx.append(int(np.argmin(np.max(kb @ kb[idx].T, axis=1))))
    out.append(kb[idx])
  return np.stack(out)


def test_farthest_keys_matches_a_direct_computation():
  k = np.random.default_rng(5).normal(size=(B, L, C))
  got = binding.farthest_keys(jnp.asarray(k, jnp.float32), K_OUT)
  np.testing.assert_allclose(got, _numpy_farthest(k, K_OUT), atol=1e-6)


def test_farthest_seeding_separates_clusters_identical_queries_cannot():
  """Three tight key clusters and identical learned queries: k-means rounds from the queries keep every
  centre identical (one group), rounds from the farthest keys give each cluster its own group."""
  rng = np.random.default_rng(6)
  centres = np.eye(C)[:3] * 5
  k = np.concatenate([c + 0.1 * rng.normal(size=(4, C)) for c in centres])[None]  # [1, 12, C]
  query = np.tile(rng.normal(size=(1, 1, C)), (1, 3, 1))
  module = lambda init: binding.AssignAttention(refine_iters=3, refine_init=init)  # noqa: E731
  params = module('queries').init(jax.random.PRNGKey(0), jnp.asarray(query, jnp.float32),
                                  jnp.asarray(k, jnp.float32))
  # identity q/k projections so the keys the rounds see are the clusters above
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: jnp.eye(C) if path[-1].key == 'kernel' else jnp.zeros_like(p), params)
  groups = {}
  for init in ('queries', 'farthest'):
    _, _, hard, _, _ = module(init).apply(params, jnp.asarray(query, jnp.float32), jnp.asarray(k, jnp.float32))
    groups[init] = np.asarray(hard[0]).argmax(0)
  assert len(set(groups['queries'])) == 1
  assert len(set(groups['farthest'])) == 3
  assert all(len(set(groups['farthest'][i * 4:(i + 1) * 4])) == 1 for i in range(3))


def test_farthest_seeding_needs_refine_rounds():
  x, g = _inputs()
  with pytest.raises(ValueError, match='refine_iters'):
    binding.GroupingBlock(K_OUT, num_heads=2, refine_init='farthest').init(jax.random.PRNGKey(0), x, g)
  with pytest.raises(ValueError, match='refine_init'):
    binding.GroupingBlock(K_OUT, num_heads=2, refine_iters=1, refine_init='random').init(jax.random.PRNGKey(0), x, g)
