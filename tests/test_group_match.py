"""The per-group pieces that are not in the paper: the slot-attention binding, the exclusive group <-> entity
matching loss (against SciPy's Hungarian solver on the present entities only), the background prompt of
inference, and the binding's health signals (against NumPy)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize

from ovseg_jax import group_health
from ovseg_jax import inference
from ovseg_jax import losses
from ovseg_jax.models import binding


# ------------------------------------------------------------------------------------ group_match_loss

def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _oracle(group_x, prompt_x, present, scale, bg_weight):
  """The loss from its definition: per image, SciPy's rectangular Hungarian on the present entities only."""
  unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
  logp = _log_softmax(scale * np.einsum('bkp,vp->bkv', unit(group_x), unit(prompt_x)))
  v = prompt_x.shape[0] - 1
  obj, bg = [], []
  for b in range(group_x.shape[0]):
    ents = np.flatnonzero(present[b])
    rows, cols = optimize.linear_sum_assignment(-logp[b][:, ents]) if len(ents) else ([], [])
    target = np.full(group_x.shape[1], v)
    target[rows] = ents[cols]
    for k, t in enumerate(target):
      (obj if t < v else bg).append(-logp[b, k, t])
  return np.mean(obj) + bg_weight * np.mean(bg)


@pytest.mark.parametrize('v', [3, 6, 12])   # fewer, as many as and more vocabulary entries than groups (K = 6)
def test_group_match_loss_equals_the_hungarian_oracle(v):
  rng = np.random.default_rng(v)
  b, k, p = 5, 6, 8
  group_x = rng.normal(size=(b, k, p)).astype(np.float32)
  prompt_x = rng.normal(size=(v + 1, p)).astype(np.float32)
  present = np.zeros((b, v), bool)
  for i in range(b):
    present[i, rng.choice(v, size=min(v, 1 + i % 3), replace=False)] = True
  for matcher in ('dp', 'scipy'):
    loss, aux = losses.group_match_loss(jnp.asarray(group_x), jnp.asarray(prompt_x), jnp.asarray(present),
                                        jnp.float32(7.0), 0.5, matcher)
    np.testing.assert_allclose(float(loss), _oracle(group_x, prompt_x, present, 7.0, 0.5), rtol=1e-5)
    assert 0.0 <= float(aux['accuracy']) <= 1.0 and 0.0 <= float(aux['background_accuracy']) <= 1.0


def test_group_match_is_exclusive():
  """Two entities that both prefer group 0: only one may take it, the other goes to its next-best group."""
  e = np.eye(4, dtype=np.float32)                      # prompts: entity 0, entity 1, entity 2, background
  groups = np.stack([e[0] + e[1], e[1] * 0.9 + e[3] * 0.1, e[3], e[3]])[None]   # group 0 looks like both
  present = np.array([[True, True, False]])
  loss, aux = losses.group_match_loss(jnp.asarray(groups), jnp.asarray(e), jnp.asarray(present),
                                      jnp.float32(10.0), 1.0)
  assert float(aux['accuracy']) == 1.0     # entity 0 -> group 0, entity 1 -> group 1 (not both -> group 0)
  assert float(aux['background_accuracy']) == 1.0
  assert np.isfinite(float(loss))


def test_entity_presence_matches_whole_token_sequences():
  answer = jnp.asarray([[101, 5, 7, 8, 102, 0], [101, 7, 102, 0, 0, 0]])
  names = jnp.asarray([[7, 8], [5, -1], [8, 5]])
  np.testing.assert_array_equal(losses.entity_presence(answer, names),
                                [[True, True, False], [False, False, False]])


# ------------------------------------------------------------------------------------ slot binding

def _slot_module(**kw):
  return binding.SlotBinding(num_slots=4, iters=3, **kw)


@pytest.mark.parametrize('cosine', [False, True])
def test_slot_binding_shapes_maps_and_draws(cosine):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 16)), jnp.float32)
  module = _slot_module(cosine=cosine)
  variables = module.init({'params': jax.random.PRNGKey(0), 'gumbel': jax.random.PRNGKey(1)}, x, None, True)
  out = module.apply(variables, x)                                   # eval: s_0 = mu, no rng needed
  assert out['x'].shape == (2, 4, 16) and out['soft'].shape == (2, 4, 10)
  np.testing.assert_allclose(np.asarray(out['soft']).sum(1), 1.0, rtol=1e-5)   # softmax over the slots
  hard = np.asarray(out['hard'])
  assert set(np.unique(hard)) <= {0.0, 1.0} and np.all(hard.sum(1) == 1)
  np.testing.assert_allclose(np.asarray(out['slots_init'][0]), np.asarray(variables['params']['slots_mu']))
  draw = lambda seed: module.apply(variables, x, None, True, rngs={'gumbel': jax.random.PRNGKey(seed)})  # noqa: E731
  a, b = draw(1), draw(2)
  assert not np.allclose(a['slots_init'], b['slots_init'])          # a fresh Gaussian draw per call
  np.testing.assert_allclose(np.asarray(draw(1)['x']), np.asarray(a['x']))   # ... and a function of the key
  det = module.apply(variables, x, None, True, True)                      # deterministic training: the mean slots
  np.testing.assert_allclose(np.asarray(det['x']), np.asarray(out['x']), rtol=1e-5, atol=1e-6)


def test_identical_mean_slots_stay_identical_without_the_draw():
  """Slots are exchangeable: from identical means only the per-image draw can tell them apart."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 12, 16)), jnp.float32)
  module = _slot_module()
  variables = module.init({'params': jax.random.PRNGKey(0), 'gumbel': jax.random.PRNGKey(1)}, x, None, True)
  params = dict(variables['params'])
  params['slots_mu'] = jnp.broadcast_to(params['slots_mu'][:1], params['slots_mu'].shape)
  same = module.apply({"params": params}, x)
  assert group_health.mean_pairwise_cosine(same['assign_query']) > 0.9999
  drawn = module.apply({"params": params}, x, None, True, rngs={'gumbel': jax.random.PRNGKey(3)})
  assert group_health.mean_pairwise_cosine(drawn['assign_query']) < 0.99


# ------------------------------------------------------------------------------------ health signals

def test_health_signals_against_numpy():
  rng = np.random.default_rng(3)
  q = rng.normal(size=(2, 5, 8)).astype(np.float32)
  unit = q / np.linalg.norm(q, axis=-1, keepdims=True)
  want = np.mean([unit[b, i] @ unit[b, j] for b in range(2) for i, j in itertools.permutations(range(5), 2)])
  np.testing.assert_allclose(float(group_health.mean_pairwise_cosine(jnp.asarray(q))), want, rtol=1e-5)
  soft = np.full((1, 4, 6), 0.1, np.float32)
  soft[0, 0, :3], soft[0, 2, 3:] = 0.7, 0.7                        # two of four groups win patches
  assert float(group_health.groups_used(jnp.asarray(soft))) == 2.0
  uniform = jnp.full((3, 4, 6), 0.25)
  np.testing.assert_allclose(float(group_health.assignment_entropy(uniform)), math.log(4), rtol=1e-6)
  collapsed = jnp.broadcast_to(jnp.asarray(q[:1, :1]), (1, 5, 8))
  np.testing.assert_allclose(float(group_health.mean_pairwise_cosine(collapsed)), 1.0, rtol=1e-5)


# ------------------------------------------------------------------------------------ background prompt

def test_background_prompt_row_is_kept_and_competes_as_a_class():
  t = np.eye(4, dtype=np.float32)                       # row 0 = background prompt, rows 1-3 = classes
  groups = np.stack([t[0], t[1], t[2]])[None]           # group 0 is background, 1 and 2 are classes 1 and 2
  image = t[1][None] * 2 + t[2][None]                   # the image looks least like the background prompt
  p = inference.group_class_affinity(jnp.asarray(groups), jnp.asarray(image), jnp.asarray(t), jnp.float32(20.0),
                                     top_k=2, background_row=True)
  assert np.asarray(p[0]).argmax(-1).tolist() == [0, 1, 2]
  soft = jnp.asarray(np.repeat(np.eye(3, dtype=np.float32)[None], 1, 0))   # 3 patches, one per group, grid 1x3
  logits = inference.eq1_logits(soft, (1, 3), jnp.asarray(groups), jnp.asarray(image), jnp.asarray(t),
                                jnp.float32(20.0), (1, 3), top_k=2, background_row=True)
  assert logits.shape == (1, 4, 1, 3) and np.asarray(logits[0]).argmax(0).tolist() == [[0, 1, 2]]


def _affinity_numpy(groups, image, text, scale, top_k, margin):
  """Eq. 1's P with the background prompt in row 0, its cosine lowered by margin, written from the definition."""
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  cos = unit(groups) @ text.T
  cos[..., 0] -= margin
  logits = scale * cos
  soft = lambda v: np.exp(v - v.max(-1, keepdims=True)) / np.exp(v - v.max(-1, keepdims=True)).sum(-1, keepdims=True)
  out = np.zeros_like(logits)
  for b in range(groups.shape[0]):
    image_cos = unit(image[b]) @ text.T
    kept = [0] + (1 + np.argsort(-image_cos[1:])[:top_k]).tolist()
    out[b][:, kept] = soft(logits[b][:, kept])
  return out * soft(logits)


def test_background_margin_lowers_the_background_prompt_cosine():
  rng = np.random.default_rng(5)
  text = rng.normal(size=(6, 16)).astype(np.float32)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  groups, image = rng.normal(size=(2, 4, 16)).astype(np.float32), rng.normal(size=(2, 16)).astype(np.float32)
  for margin in (0.0, 0.1, -0.2):
    got = inference.group_class_affinity(jnp.asarray(groups), jnp.asarray(image), jnp.asarray(text),
                                         jnp.float32(14.0), top_k=3, background_row=True, background_margin=margin)
    np.testing.assert_allclose(np.asarray(got), _affinity_numpy(groups, image, text, 14.0, 3, margin), atol=1e-6)
  # a margin beyond every cosine gap takes the background away from each group; no margin leaves it to one
  t = np.eye(3, dtype=np.float32)
  near_bg = np.stack([t[0] * 2 + t[1], t[1] * 2 + t[2]])[None]
  wins = lambda m: np.asarray(inference.group_class_affinity(
      jnp.asarray(near_bg), jnp.asarray(t[1][None]), jnp.asarray(t), jnp.float32(20.0), top_k=2,
      background_row=True, background_margin=m)[0]).argmax(-1).tolist()
  assert wins(0.0) == [0, 1] and wins(0.5) == [1, 1]


def test_segmenter_reads_the_margin_and_rejects_a_non_finite_one():
  from tests import seg_fixtures  # pylint: disable=g-import-not-at-top
  cfg = seg_fixtures.tiny_model_config()
  variables = seg_fixtures.tiny_variables(cfg)
  image = np.random.default_rng(0).integers(0, 255, (40, 56, 3), np.uint8)
  small = dict(short_side=32, window=32, stride=16, background='prompt')
  scores = [inference.Segmenter(cfg, variables, dict(small, bg_prompt_margin=m)).segment(image, ['cat', 'dog'])[1]
            for m in (0.0, 0.5)]
  assert scores[1][0].mean() < scores[0][0].mean()      # the background channel loses probability mass
  with pytest.raises(ValueError, match='eval.bg_prompt_margin=nan: must be a finite number'):
    inference.Segmenter(cfg, variables, dict(small, bg_prompt_margin=float('nan')))


# ------------------------------------------------------------------------------------ in the train step

def _slot_match_run(devices):
  from configs import common  # pylint: disable=g-import-not-at-top
  from tests import train_fixtures as tf
  config = tf.small_config(steps=2)
  config.unlock()
  common.apply_binding_mode(config, 'slot')
  config.loss.group_match_weight = 1.0
  config.lock()
  return tf.sharded_steps(config, devices)[0]


def test_slot_binding_and_group_match_train_sharded():
  """The slot binding + the matching loss in the jitted step: the same losses on 1 and 8 devices, the
  health signals logged."""
  one, eight = _slot_match_run(jax.devices()[:1]), _slot_match_run(jax.devices())
  for a, b in zip(one, eight):
    for key in ('loss', 'loss_group_match', 'group_match_acc', 'groups_used', 'query_cosine'):
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5, err_msg=key)
  for m in one:
    assert np.isfinite(m['loss']) and m['loss_group_match'] > 0
    assert 1.0 <= m['groups_used'] <= 4.0 and 0.0 <= m['assign_entropy'] <= math.log(4) + 1e-5
    assert set(group_health.HEALTH_KEYS) <= set(m)


def test_unknown_background_mode_is_one_clear_error():
  with pytest.raises(ValueError, match="eval.background='nope'"):
    inference.Segmenter.__new__(inference.Segmenter).__init__(
        _tiny_model_config(), None, {'background': 'nope'})


def _tiny_model_config():
  from tests import train_fixtures as tf  # pylint: disable=g-import-not-at-top
  return tf.small_config().model
