"""Performance options of the model change the speed/memory trade-off, never the math or the tree.

* `model.remat` ('full', 'dots'): the same parameter tree (converters' contract) and the same loss and
  gradients as 'none' (recomputation replays the same ops; float32 tolerance 1e-6 relative for reordering);
  it really rematerialises (the jaxpr of the gradient holds a `remat`/checkpoint primitive).
* `model.dtype='bfloat16'`: params stay float32 and the outputs stay close to float32 (bf16 has 8 mantissa
  bits: 3e-2 relative on the projected embeddings of a random tiny model).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import tiny
from ovseg_jax.models.ovsegmentor import OVSegmentor


def _model(**overrides):
  c = tiny.get_config().model
  c.unlock()
  for k, v in overrides.items():
    c[k] = v
  return OVSegmentor(config=ml_collections.FrozenConfigDict(c)), c


def _inputs(c, b=4):
  rng = np.random.default_rng(0)
  size = c.vision.img_size
  images = jnp.asarray(rng.standard_normal((b, size, size, 3), np.float32))
  ids = jnp.asarray(rng.integers(1000, 2000, (b, c.text.max_length)), jnp.int32)
  mask = jnp.asarray(np.arange(c.text.max_length)[None] < rng.integers(3, c.text.max_length, (b, 1)), jnp.int32)
  return images, ids, mask


def _loss_fn(model):
  def loss(params, batch_stats, images, ids, mask):
    out, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images, ids, mask, train=True,
                         rngs={'dropout': jax.random.key(1), 'gumbel': jax.random.key(2)},
                         mutable=['batch_stats'])
    img, txt, dec = out['image'], out['text'], out['decoder']
    return (jnp.sum(jnp.square(img['image_x'])) + jnp.sum(jnp.square(img['image_feat']))
            + jnp.sum(jnp.square(txt['text_x'])) + jnp.sum(jnp.square(dec['question_out']))
            + jnp.sum(jnp.square(img['q'])) + jnp.sum(jnp.square(img['k'])))
  return loss


@pytest.fixture(scope='module')
def reference():
  model, c = _model()
  images, ids, mask = _inputs(c)
  variables = model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0),
                          'gumbel': jax.random.key(0)}, images, ids, mask, train=False)
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(model)))(variables['params'], variables['batch_stats'],
                                                              images, ids, mask)
  return dict(variables=variables, loss=loss, grads=grads, inputs=(images, ids, mask))


@pytest.mark.parametrize('policy', ['full', 'dots'])
def test_remat_keeps_tree_loss_and_gradients(reference, policy):
  model, c = _model(remat=policy)
  images, ids, mask = reference['inputs']
  abstract = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0),
                                                'gumbel': jax.random.key(0)}, images, ids, mask, train=False))
  assert jax.tree.structure(abstract) == jax.tree.structure(reference['variables'])
  assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, reference['variables'])
  v = reference['variables']
  grad_fn = jax.value_and_grad(_loss_fn(model))
  assert 'remat' in str(jax.make_jaxpr(grad_fn)(v['params'], v['batch_stats'], images, ids, mask))
  loss, grads = jax.jit(grad_fn)(v['params'], v['batch_stats'], images, ids, mask)
  np.testing.assert_allclose(loss, reference['loss'], rtol=1e-6)
  flat_ref = jax.tree_util.tree_leaves_with_path(reference['grads'])
  flat = jax.tree.leaves(grads)
  # One scale for the whole tree: some leaves have an exactly-zero true gradient (a bias followed by a
  # LayerNorm over the axis it is constant on) and hold only float32 rounding noise in both runs.
  scale = max(float(np.max(np.abs(w))) for _, w in flat_ref)
  for (path, want), got in zip(flat_ref, flat):
    np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_remat_rejects_unknown_policy(reference):
  model, _ = _model(remat='everything')
  images, ids, mask = reference['inputs']
  with pytest.raises(ValueError, match="model.remat='everything'"):
    model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0), 'gumbel': jax.random.key(0)},
               images, ids, mask, train=False)


def test_bfloat16_compute_keeps_float32_params_and_close_outputs(reference):
  model, _ = _model(dtype='bfloat16')
  images, ids, mask = reference['inputs']
  v = reference['variables']
  out32 = OVSegmentor(config=ml_collections.FrozenConfigDict(_model()[1])).apply(v, images, ids, mask,
                                                                                 train=False)
  out16 = model.apply(v, images, ids, mask, train=False)
  abstract = jax.eval_shape(lambda: model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0),
                                                'gumbel': jax.random.key(0)}, images, ids, mask, train=False))
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract['params']))
  assert out16['image']['image_feat_before_proj'].dtype == jnp.bfloat16
  for key in ('image_x', 'image_feat'):
    a = np.asarray(out32['image'][key], np.float32)
    b = np.asarray(out16['image'][key], np.float32)
    assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 3e-2, key
  a = np.asarray(out32['text']['text_x'], np.float32)
  b = np.asarray(out16['text']['text_x'], np.float32)
  assert np.max(np.abs(a - b)) / np.max(np.abs(a)) < 3e-2
