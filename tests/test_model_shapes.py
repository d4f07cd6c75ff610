"""Abstract shapes of the whole model (jax.eval_shape: nothing is materialised) and the parameter counts of
the authors' ViT-B/16 model (docs/paper_vs_authors.md Q2, counted on their code), plus input errors."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from configs import vitb
from configs import vits
from ovseg_jax.convert import official
from ovseg_jax.models.ovsegmentor import OVSegmentor


def _counts(model_config):
  abstract = official.abstract_variables(model_config)
  counts = {k: sum(int(np.prod(l.shape)) for l in jax.tree.leaves(v)) for k, v in abstract['params'].items()}
  return abstract, counts


def test_vitb_parameter_counts():
  abstract, counts = _counts(vitb.get_config().model)
  print('vitb param counts:', counts)
  assert counts['img_encoder'] == 100_053_128
  assert counts['text_encoder'] == 109_482_240  # incl. the (unused) pooler, as the authors' state dict
  for head in ('img_projector', 'text_projector', 'bridge_projector'):
    assert counts[head] == 4_206_848
  # the authors' decoder has 16,542,720 incl. an AssignAttention it never calls (4 x (768^2 + 768))
  assert counts['decoder'] == 16_542_720 - 4 * (768 * 768 + 768)
  assert counts['logit_scale'] == 1
  assert set(abstract) == {'params', 'batch_stats'}
  assert abstract['batch_stats']['img_projector']['bn']['var'].shape == (4096,)
  assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(abstract['params']))


@pytest.mark.parametrize('cfg', [tiny, vits])
def test_other_configs_trace(cfg):
  c = cfg.get_config().model
  _, counts = _counts(c)
  print(cfg.__name__, 'param counts:', counts)
  model = OVSegmentor(ml_collections.FrozenConfigDict(c))
  s, t, b = c.vision.img_size, c.text.max_length, 2
  variables = official.abstract_variables(c)
  img = jax.ShapeDtypeStruct((b, s, s, 3), jnp.float32)
  ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
  out = jax.eval_shape(lambda v, x, i: model.apply(v, x, i, i, train=True, rngs={
      'dropout': jax.random.PRNGKey(0), 'gumbel': jax.random.PRNGKey(1)}, mutable=['batch_stats']),
      variables, img, ids)[0]
  k, l, w, p = c.binding.num_output_groups, (s // c.vision.patch_size) ** 2, c.vision.width, c.proj.out
  assert out['image']['image_feat'].shape == (b, k, p) and out['image']['soft'].shape == (b, k, l)
  assert out['image']['q'].shape == (b, k, w) and out['image']['k'].shape == (b, l, w)
  assert out['text']['text_feat_after_proj'].shape == (b, t, p)
  assert out['decoder']['question_out'].shape == (b, p)


def test_tiny_train_step_updates_bn_stats_in_official_order():
  c = tiny.get_config().model
  model = OVSegmentor(ml_collections.FrozenConfigDict(c))
  s, t = c.vision.img_size, 6
  rng = np.random.default_rng(0)
  img = rng.normal(size=(2, s, s, 3)).astype(np.float32)
  ids = rng.integers(1000, 2000, size=(2, t)).astype(np.int32)
  mask = np.ones((2, t), np.int32)
  # random values on the abstract tree (compiling `init` costs more than this whole test's math)
  variables = jax.tree.map(lambda l: rng.normal(0, 0.1, l.shape).astype(np.float32) + 1,
                           official.abstract_variables(c))
  init_scale = jax.eval_shape(model.init, jax.random.PRNGKey(0), img, ids, mask)['params']['logit_scale']
  assert init_scale.shape == () and init_scale.dtype == jnp.float32
  np.testing.assert_allclose(model.apply({'params': {'logit_scale': np.log(1 / 0.07)}},
                                         method=OVSegmentor.logit_scale_exp), 1 / 0.07, rtol=1e-5)
  np.testing.assert_allclose(model.apply({'params': {'logit_scale': np.float32(5.0)}},
                                         method=OVSegmentor.logit_scale_exp), 100.0)  # clamped
  out, new = jax.jit(lambda v, x: model.apply(v, x, True, True, method=OVSegmentor.encode_image,
                                              mutable=['batch_stats']))(variables, img)
  bs = new['batch_stats']['img_projector']['bn']
  # two BN calls: pooled [2, C] first, then the groups [2*K, C]; running mean after both, momentum 0.9
  h = lambda x: np.asarray(x) @ np.asarray(variables['params']['img_projector']['linear_hidden']['kernel']) + \
      np.asarray(variables['params']['img_projector']['linear_hidden']['bias'])  # noqa: E731
  m1 = 0.9 * np.asarray(variables['batch_stats']['img_projector']['bn']['mean']) + \
      0.1 * h(out['image_x_before_proj']).mean(0)
  m2 = 0.9 * m1 + 0.1 * h(np.asarray(out['image_feat_before_proj']).reshape(-1, c.vision.width)).mean(0)
  np.testing.assert_allclose(bs['mean'], m2, atol=1e-5)
  x2 = h(np.asarray(out['image_feat_before_proj']).reshape(-1, c.vision.width))
  v1 = 0.9 * np.asarray(variables['batch_stats']['img_projector']['bn']['var']) + \
      0.1 * h(out['image_x_before_proj']).var(0, ddof=1)
  np.testing.assert_allclose(bs['var'], 0.9 * v1 + 0.1 * x2.var(0, ddof=1), rtol=1e-4)  # unbiased, as torch


def test_image_smaller_than_a_patch_is_a_clear_error():
  c = tiny.get_config().model
  model = OVSegmentor(ml_collections.FrozenConfigDict(c))
  variables = official.abstract_variables(c)
  with pytest.raises(ValueError, match='smaller than one 8x8 patch'):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 4, 64, 3)), False, method=OVSegmentor.encode_image),
                   variables)


def test_group_token_init_std():
  """The K_in group tokens start as the authors' trunc_normal(std=0.02)."""
  std = 0.02
  c = tiny.get_config().model
  model = OVSegmentor(ml_collections.FrozenConfigDict(c))
  img = jnp.zeros((1, c.vision.img_size, c.vision.img_size, 3))
  ids = jnp.ones((1, 4), jnp.int32)
  tokens = jax.jit(model.init)(jax.random.PRNGKey(0), img, ids, ids)['params']['img_encoder']['group_token']
  # truncated at 2 std: the sample std is ~0.88 std
  assert tokens.shape == (c.binding.num_group_tokens, c.vision.width)
  np.testing.assert_allclose(np.std(np.asarray(tokens)), 0.88 * std, rtol=0.05)
