"""Patch-level grounding (losses.patch_grounding_loss, not in the paper): the loss against a NumPy loop written
from its definition, which parts of the model each term trains, and the term in the jitted step on 1 and 8
devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ovseg_jax import losses


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _oracle(patch_x, group_x, soft, prompt_x, present, scale, top_k, w_dist, w_pur):
  """The docstring's equations, one image, one class, one group at a time."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  b, l, _ = patch_x.shape
  k = group_x.shape[1]
  n = prompt_x.shape[0]
  t = unit(prompt_x)
  mil, dist, pur = [], 0.0, 0.0
  for i in range(b):
    p = np.stack([_softmax(scale * t @ unit(patch_x[i, j])) for j in range(l)])   # [L, V + 1]
    for v in range(n):
      score = np.clip(np.sort(p[:, v])[::-1][:top_k].mean(), 1e-6, 1 - 1e-6)
      y = 1.0 if v == n - 1 or present[i, v] else 0.0
      mil.append(-(y * np.log(score) + (1 - y) * np.log(1 - score)))
    for g in range(k):
      a = soft[i, g]
      mix = (a[:, None] * p).sum(0) / (a.sum() + 1e-6)
      q = scale * t @ unit(group_x[i, g])
      logq = q - q.max() - np.log(np.exp(q - q.max()).sum())
      dist += a.sum() / l * -(mix * logq).sum()
      for j in range(l):
        pur += a[j] * -(p[j] * np.log(mix + 1e-6)).sum()
  return np.mean(mil) + w_dist * dist / b + w_pur * pur / (b * l)


@pytest.mark.parametrize('top_k', [1, 3])
def test_patch_grounding_loss_equals_the_definition(top_k):
  rng = np.random.default_rng(top_k)
  b, l, k, p, v = 3, 10, 4, 6, 5
  patch_x = rng.normal(size=(b, l, p)).astype(np.float32)
  group_x = rng.normal(size=(b, k, p)).astype(np.float32)
  soft = _softmax(rng.normal(size=(b, l, k)) * 2).transpose(0, 2, 1).astype(np.float32)   # over the groups
  prompt_x = rng.normal(size=(v + 1, p)).astype(np.float32)
  present = rng.random((b, v)) < 0.4
  got, aux = losses.patch_grounding_loss(jnp.asarray(patch_x), jnp.asarray(group_x), jnp.asarray(soft),
                                         jnp.asarray(prompt_x), jnp.asarray(present), 3.0, top_k, 0.7, 0.3)
  want = _oracle(patch_x.astype(np.float64), group_x.astype(np.float64), soft.astype(np.float64),
                 prompt_x.astype(np.float64), present, 3.0, top_k, 0.7, 0.3)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert 0.0 <= float(aux['foreground_share']) <= 1.0 and 0.0 <= float(aux['group_agreement']) <= 1.0 + 1e-6


def test_each_term_trains_its_own_part():
  """The groups' and the assignment's targets are stop-gradient patch classes: the distillation term moves the
  groups only, the purity term the assignment only, and the multiple-instance term the patches only."""
  rng = np.random.default_rng(0)
  args = [jnp.asarray(rng.normal(size=s).astype(np.float32)) for s in ((2, 8, 4), (2, 3, 4))]
  soft = jnp.asarray(_softmax(rng.normal(size=(2, 8, 3))).transpose(0, 2, 1).astype(np.float32))
  prompt_x = jnp.asarray(rng.normal(size=(4, 4)).astype(np.float32))
  present = jnp.asarray([[True, False, False], [False, True, True]])

  def grads(term):
    f = lambda px, gx, a: losses.patch_grounding_loss(px, gx, a, prompt_x, present, 5.0)[1][term]  # noqa: E731
    return [float(jnp.abs(g).max()) for g in jax.grad(f, argnums=(0, 1, 2))(*args, soft)]

  mil, dist, pur = grads('mil'), grads('distill'), grads('purity')
  assert mil[0] > 0 and mil[1] == 0 and mil[2] == 0
  assert dist[0] == 0 and dist[1] > 0
  assert pur[0] == 0 and pur[1] == 0 and pur[2] > 0


def _patch_run(devices):
  from tests import train_fixtures as tf
  config = tf.small_config(steps=2)
  config.unlock()
  config.model.patch_head = True
  config.loss.patch_ground_weight = 1.0
  config.lock()
  metrics, params = tf.sharded_steps(config, devices)
  assert 'patch_projector' in params
  return metrics, config.loss.entity_weight


def test_patch_grounding_trains_sharded():
  """The term in the jitted step: the same losses on 1 and 8 devices, and it moves the total."""
  (one, entity_weight), (eight, _) = _patch_run(jax.devices()[:1]), _patch_run(jax.devices())
  for a, b in zip(one, eight):
    for key in ('loss', 'loss_patch_ground', 'patch_mil', 'patch_distill', 'patch_purity'):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  for m in one:
    assert m['loss_patch_ground'] > 0
    paper = m['loss_contrast'] + entity_weight * m['loss_entity'] + m.get('mask_lambda', 0.0) * m['loss_mask']
    np.testing.assert_allclose(m['loss'], paper + m['loss_patch_ground'], rtol=1e-5)


def test_patch_grounding_without_the_head_is_one_clear_error():
  from ovseg_jax import train_step as ts
  from tests import train_fixtures as tf
  config = tf.small_config(steps=2)
  config.unlock()
  config.loss.patch_ground_weight = 1.0
  config.lock()
  model = ts.make_model(config)
  from ovseg_jax import optim
  tx, _ = optim.make_optimizer(config.optim, total_steps=2, warmup_steps=1,
                               global_batch=config.train.global_batch_size)
  state = ts.init_state(config, model, tx, jax.random.key(0))
  batch = next(tf.batches(config))
  with pytest.raises(ValueError, match='model.patch_head=True'):
    ts.forward_losses(state['params'], state['batch_stats'], state['ema'], batch, jax.random.key(0),
                      jnp.int32(0), config=config, model=model, total_steps=2)
