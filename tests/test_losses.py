"""losses.py against NumPy oracles written from the equations, and against the authors' code (train_golden.npz)."""

import functools
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovseg_jax import losses, matching


# --------------------------------------------------------------------------------------------- oracles

def np_info_nce(a, b, scale):
  """Eq. 7 in float64: 0.5 * (CE over rows + CE over columns) of scale * cos."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  a = a / np.linalg.norm(a, axis=1, keepdims=True)
  b = b / np.linalg.norm(b, axis=1, keepdims=True)
  logits = scale * a @ b.T
  def ce(x):  # rows of x are the predictions, the label of row i is i
    m = x.max(1, keepdims=True)
    logp = x - m - np.log(np.exp(x - m).sum(1, keepdims=True))
    return -np.mean(np.diag(logp))
  return 0.5 * (ce(logits) + ce(logits.T))


def np_bilinear_align_corners(img, out_h, out_w):
  """[h, w] -> [out_h, out_w], torch bilinear with align_corners=True, pixel by pixel."""
  h, w = img.shape
  out = np.empty((out_h, out_w))
  for y in range(out_h):
    sy = y * (h - 1) / (out_h - 1) if out_h > 1 else 0.0
    y0 = min(int(np.floor(sy)), h - 1)
    y1, fy = min(y0 + 1, h - 1), sy - y0
    for x in range(out_w):
      sx = x * (w - 1) / (out_w - 1) if out_w > 1 else 0.0
      x0 = min(int(np.floor(sx)), w - 1)
      x1, fx = min(x0 + 1, w - 1), sx - x0
      out[y, x] = ((1 - fy) * ((1 - fx) * img[y0, x0] + fx * img[y0, x1])
                   + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1]))
  return out


def np_mask_loss(m1, m2, grid, group_logits, out_hw, cost='l2', dice_norm='official', threshold=0.6,
                 group_ratio=0.5, per_device_batch=None, constant_student=np.nan):
  """Eq. 10-12 with the official recipe, float64, brute-force matching over all permutations.

  A constant online map (max == min) gets the student value `constant_student` (NaN = the official 0/0).
  """
  m1 = np.asarray(m1, np.float64)
  m2 = np.asarray(m2, np.float64)
  bsz, k, _ = m1.shape
  def up(m):
    maps = m.reshape(bsz, k, *grid)
    if out_hw is None:
      return maps.reshape(bsz, k, -1)
    return np.stack([[np_bilinear_align_corners(x, *out_hw).ravel() for x in row] for row in maps])
  u1, u2 = up(m1), up(m2)
  detached = np.zeros((bsz, k), bool)
  for b in range(bsz):
    detached[b, np.argsort(group_logits[b], kind='stable')[:int(k * group_ratio)]] = True
  dices, all_cols = [], []
  for b in range(bsz):
    a = u1[b] / np.maximum(np.linalg.norm(u1[b], axis=1, keepdims=True), 1e-12)  # F.normalize
    t = u2[b] / np.maximum(np.linalg.norm(u2[b], axis=1, keepdims=True), 1e-12)
    if cost == 'l2':
      c = np.linalg.norm(a[:, None, :] - t[None, :, :], axis=-1)
    else:
      c = -(a @ t.T)
    perm = min(itertools.permutations(range(k)), key=lambda p: sum(c[i, p[i]] for i in range(k)))
    all_cols.append(perm)
    p2 = 1 / (1 + np.exp(-u2[b][list(perm)]))
    tgt = (p2 >= threshold * p2.max(1, keepdims=True)).astype(np.float64)
    lo, hi = u1[b].min(1, keepdims=True), u1[b].max(1, keepdims=True)
    with np.errstate(invalid='ignore'):
      s = np.where(hi > lo, (u1[b] - lo) / (hi - lo), constant_student)
    dices.append(1 - (2 * (s * tgt).sum() + 1) / (s.sum() + tgt.sum() + 1))
  dices = np.array(dices)
  if dice_norm == 'official':
    loss = dices.sum() / k if per_device_batch is None else dices.mean() * per_device_batch / k
  else:
    loss = dices.mean()
  return loss, np.array(all_cols), detached, dices


def _tiny_qk(seed=0, bsz=3, k=4, c=6, grid=(3, 4)):
  rng = np.random.default_rng(seed)
  l = grid[0] * grid[1]
  return (rng.normal(size=(bsz, k, c)).astype(np.float32), rng.normal(size=(bsz, k, c)).astype(np.float32),
          rng.normal(size=(bsz, l, c)).astype(np.float32), rng.normal(size=(bsz, k)).astype(np.float32))


# --------------------------------------------------------------------------------------------- InfoNCE

def test_contrastive_matches_numpy_oracle():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 5, 7)).astype(np.float32)
  got = losses.contrastive_loss(a, b, 10.0)
  np.testing.assert_allclose(got, np_info_nce(a, b, 10.0), rtol=1e-5)
  # Symmetric: swapping a and b keeps the value (the mean of both CEs, which differ from each other).
  np.testing.assert_allclose(losses.contrastive_loss(b, a, 10.0), got, rtol=1e-6)
  np.testing.assert_allclose(losses.entity_loss(a, b, 3.0), np_info_nce(a, b, 3.0), rtol=1e-5)


@pytest.mark.parametrize('chunk', [1, 2, 4])  # B = 6: 4 pads the last block
def test_chunked_contrastive_equals_direct_value_and_grad(chunk):
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(2, 6, 7)).astype(np.float32)
  loss_grad = lambda cs: jax.jit(jax.value_and_grad(
      lambda x, y, s: losses.contrastive_loss(x, y, s, chunk_size=cs), argnums=(0, 1, 2)))(a, b, 20.0)
  (v0, g0), (v1, g1) = loss_grad(0), loss_grad(chunk)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  for x, y in zip(g1, g0):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_chunked_contrastive_bounds_memory():
  # Forward + backward temporaries: the direct form holds several [B, B] arrays, the chunked one [chunk, B].
  bsz, p = 1024, 32
  spec = jax.ShapeDtypeStruct((bsz, p), jnp.float32)
  def temp_bytes(cs):
    f = jax.jit(jax.grad(lambda x, y: losses.contrastive_loss(x, y, 10.0, chunk_size=cs), argnums=(0, 1)))
    return f.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
  direct, chunked = temp_bytes(0), temp_bytes(64)
  assert direct >= bsz * bsz * 4, direct
  assert chunked < direct / 4, (chunked, direct)


# --------------------------------------------------------------------------------------------- mask loss

@pytest.mark.parametrize('cost,dice_norm,matcher', [('l2', 'official', 'dp'), ('neg_cos', 'mean', 'scipy'),
                                                    ('l2', 'mean', 'scipy'), ('neg_cos', 'official', 'dp')])
def test_mask_loss_matches_numpy_oracle(cost, dice_norm, matcher):
  oq, tq, tk, gl = _tiny_qk()
  scale = oq.shape[-1] ** -0.5
  m1 = np.einsum('bkc,blc->bkl', oq.astype(np.float64), tk) * scale
  m2 = np.einsum('bkc,blc->bkl', tq.astype(np.float64), tk) * scale
  want, want_cols, want_det, want_dice = np_mask_loss(m1, m2, (3, 4), gl, (7, 9), cost, dice_norm, 0.6, 0.5)
  loss, aux = jax.jit(functools.partial(
      losses.mask_consistency_loss, grid=(3, 4), upsample_to=(7, 9), cost=cost, dice_norm=dice_norm,
      matcher=matcher))(oq, tq, tk, group_logits=gl)
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(aux['dice'], want_dice, rtol=1e-5)
  np.testing.assert_array_equal(aux['cols'], want_cols)
  np.testing.assert_array_equal(aux['detached'], want_det)
  assert aux['online_logits'].shape == aux['teacher_logits'].shape == (3, 4, 12)
  assert aux['detached'].sum() == 3 * 2  # int(4 * 0.5) per sample


def test_dice_norms_and_per_device_batch():
  oq, tq, tk, gl = _tiny_qk(seed=2)
  run = lambda **kw: losses.mask_consistency_loss(oq, tq, tk, (3, 4), gl, upsample_to=(5, 5), **kw)
  official, aux, mean, per_device = jax.jit(lambda: (
      *run(), run(dice_norm='mean')[0], run(per_device_batch=2)[0]))()
  dice = np.asarray(aux['dice'])
  assert np.all(dice > 0) and np.all(dice < 1)
  np.testing.assert_allclose(official, dice.sum() / 4, rtol=1e-6)  # sum over the batch / K
  np.testing.assert_allclose(mean, dice.mean(), rtol=1e-6)
  # Global batch of 3 samples seen as per-device batches of 2: mean_b(dice_b) * 2 / K.
  np.testing.assert_allclose(per_device, dice.mean() * 2 / 4, rtol=1e-6)
  with pytest.raises(ValueError, match='dice_norm'):
    run(dice_norm='sum')
  with pytest.raises(ValueError, match='matcher'):
    run(matcher='hungarian')


def test_group_selection_gradients():
  oq, tq, tk, gl = _tiny_qk(seed=3, bsz=2, k=8)
  f = lambda o, t_q, t_k, g: losses.mask_consistency_loss(o, t_q, t_k, (3, 4), g, upsample_to=(6, 8))[0]
  g_oq, g_tq, g_tk, g_gl = jax.jit(jax.grad(f, argnums=(0, 1, 2, 3)))(oq, tq, tk, gl)
  smallest = np.argsort(gl, axis=1)[:, :4]
  detached = np.zeros((2, 8), bool)
  np.put_along_axis(detached, smallest, True, axis=1)
  row_norm = np.linalg.norm(np.asarray(g_oq), axis=-1)  # [B, K]
  assert np.all(row_norm[detached] == 0)
  assert np.all(row_norm[~detached] > 1e-6)
  for g in (g_tq, g_tk, g_gl):  # teacher and group logits are stop_gradient
    assert not np.any(np.asarray(g))


def test_l2_and_neg_cos_can_choose_different_matchings():
  # Normalised maps with cos(o0,t0)=1, cos(o1,t1)=0, cos(o0,t1)=cos(o1,t0)=0.55: the identity has the smaller
  # sum of sqrt(2 - 2 cos) (1.41 < 1.90), the swap the larger sum of cos (1.10 > 1.00).
  c = 0.55
  y = -c * c / np.sqrt(1 - c * c)
  online = np.array([[[1, 0, 0], [c, np.sqrt(1 - c * c), 0]]])
  teacher = np.array([[[1, 0, 0], [c, y, np.sqrt(1 - c * c - y * y)]]])
  for cost, want in (('l2', [0, 1]), ('neg_cos', [1, 0])):
    _, aux = jax.jit(functools.partial(losses.mask_loss_from_logits, grid=(1, 3), upsample_to=None, cost=cost))(
        online.astype(np.float32), teacher.astype(np.float32), group_logits=np.zeros((1, 2), np.float32))
    oracle = np.array([[np.linalg.norm(o - t) if cost == 'l2' else -o @ t for t in teacher[0]]
                       for o in online[0]])
    np.testing.assert_allclose(aux['cost'][0], oracle, atol=1e-6)
    np.testing.assert_array_equal(aux['cols'][0], want)
  with pytest.raises(ValueError, match='neg_cos'):
    losses.mask_matching_cost(jnp.asarray(online), jnp.asarray(teacher), 'cos')


def test_constant_online_map_is_guarded_without_changing_other_samples():
  oq, tq, tk, gl = _tiny_qk(seed=4)
  m1 = np.einsum('bkc,blc->bkl', oq, tk) / np.sqrt(6)
  m2 = np.einsum('bkc,blc->bkl', tq, tk) / np.sqrt(6)
  # max == min: 0/0 = NaN in the official code. Zero stays exactly constant through the upsampling (another
  # constant picks up rounding noise there, which min-max then amplifies, in their code as in ours).
  m1[0, 1] = 0.0
  loss_fn = lambda x: losses.mask_loss_from_logits(x, m2, (3, 4), gl, upsample_to=(5, 6))
  (loss, aux), grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(m1)
  assert np.isfinite(loss) and np.all(np.isfinite(grad))
  _, cols, _, want = np_mask_loss(m1, m2, (3, 4), gl, (5, 6))
  assert np.isnan(want[0])  # the unguarded recipe
  np.testing.assert_allclose(aux['dice'][1:], want[1:], rtol=1e-5)  # maps with max > min: unchanged
  # Guarded: the constant map's student is 0, so it only adds its target pixels to the denominator.
  _, _, _, want0 = np_mask_loss(m1[:1], m2[:1], (3, 4), gl[:1], (5, 6), constant_student=0.0)
  np.testing.assert_allclose(aux['dice'][0], want0[0], rtol=1e-5)
  np.testing.assert_array_equal(aux['cols'], cols)


def test_mask_loss_sharded_over_8_devices_equals_single_device():
  mesh = jax.make_mesh((8,), ('data',))
  oq, tq, tk, gl = _tiny_qk(seed=5, bsz=8)
  ref_loss, ref_aux = jax.jit(lambda *a: losses.mask_consistency_loss(*a[:3], (3, 4), a[3], upsample_to=(6, 6)))(
      oq, tq, tk, gl)
  shard = lambda x: jax.device_put(x, jax.NamedSharding(mesh, jax.P('data')))
  for matcher in ('dp', functools.partial(matching.assign_sharded, mesh=mesh, batch_axes='data')):
    f = jax.jit(lambda *a: losses.mask_consistency_loss(*a[:3], (3, 4), a[3], upsample_to=(6, 6),
                                                        matcher=matcher, per_device_batch=1))
    loss, aux = f(*map(shard, (oq, tq, tk, gl)))
    np.testing.assert_array_equal(aux['cols'], ref_aux['cols'])
    np.testing.assert_allclose(loss, ref_loss / 8, rtol=1e-5)  # official per-device normaliser: batch 1 of 8


@pytest.mark.parametrize('matcher', ['dp', 'scipy'])
def test_parity_with_the_authors_mask_loss(golden_dir, matcher):
  g = np.load(os.path.join(golden_dir, 'train_golden.npz'))
  loss, aux = jax.jit(functools.partial(losses.mask_loss_from_logits, grid=(14, 14), upsample_to=(224, 224),
                                        cost='l2', dice_norm='official', threshold=0.6, group_ratio=0.5,
                                        matcher=matcher))(g['train_mask_online'], g['train_mask_teacher'],
                                                          group_logits=g['train_group_logits'])
  np.testing.assert_allclose(loss, g['train_loss_mask'], rtol=1e-4)
  np.testing.assert_array_equal(aux['cols'], g['train_match_cols'])
  np.testing.assert_array_equal([np.flatnonzero(r) for r in np.asarray(aux['detached'])],
                                g['train_detached_groups'])


def test_parity_with_the_authors_contrastive_entity_and_total(golden_dir):
  g = np.load(os.path.join(golden_dir, 'train_golden.npz'))
  scale = min(np.exp(np.log(90.0)), 100.0)  # their logit_scale = log(90), clamp 100
  contrast = losses.contrastive_loss(g['train_image_x'], g['train_text_x'], scale)
  entity = losses.entity_loss(g['train_question_out'], g['train_answer_x'], scale, chunk_size=3)
  np.testing.assert_allclose(contrast, g['train_loss_contrastive'], rtol=1e-5)
  np.testing.assert_allclose(entity, g['train_loss_entity'], rtol=1e-5)
  total = losses.total_loss(contrast, entity, g['train_loss_mask'], entity_weight=1.0, mask_lambda=0.1)
  np.testing.assert_allclose(total, g['train_loss_total'], rtol=1e-5)
  np.testing.assert_allclose(losses.total_loss(2.0, 3.0, None, entity_weight=0.5, mask_lambda=0.1), 3.5)


# --------------------------------------------------------------------------------------------- lambda

def test_mask_loss_weight_schedule():
  w = functools.partial(losses.mask_loss_weight, total_steps=100, mask_weight=0.1, mask_start_fraction=0.75)
  assert [float(w(s, recipe='paper_single')) for s in (0, 74, 75, 99)] == [0.0, 0.0, np.float32(0.1),
                                                                           np.float32(0.1)]
  jitted = jax.jit(lambda s: w(s, recipe='paper_single'))
  assert float(jitted(jnp.int32(74))) == 0.0 and float(jitted(jnp.int32(80))) == np.float32(0.1)
  assert float(w(99, recipe='two_stage', stage=1)) == 0.0
  assert float(w(0, recipe='two_stage', stage=2)) == np.float32(0.1)
  with pytest.raises(ValueError, match='recipe'):
    w(0, recipe='single')


def test_total_loss_terms():
  c, e, m = (jnp.float32(v) for v in (1.0, 2.0, 3.0))
  np.testing.assert_allclose(losses.total_loss(c, e, None, entity_weight=0.5), 2.0)
  np.testing.assert_allclose(losses.total_loss(c, e, m, entity_weight=1.0, mask_lambda=0.1), 3.3, rtol=1e-6)
  assert np.isnan(losses.total_loss(c, e, jnp.float32(np.nan), mask_lambda=0.0))  # NaN never hidden
