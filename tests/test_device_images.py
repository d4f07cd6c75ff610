"""uint8 batches normalised on the device, stage-1 random erasing on the device, no stage-1 partner.

* the float32 images the model sees from a pipeline uint8 batch equal what the workers computed before
  (normalise + timm erasing on the host; `_old_train_image`, a copy of that code) to 1e-6, outside the
  erase boxes; the boxes are the ones the old draws chose, and the partner and its draws are unchanged;
* the device's erasing: noise only inside the box, finite, ~N(0, 1), a fresh draw per row and per step;
* a stage-1 batch has no cross keys, reads no partner, and its other arrays are the stage-2 batch's;
* the jitted train step runs a stage-1 uint8 batch without cross keys, with the losses of the same batch
  normalised and erased on the host, and compiles nothing more on the next step.
"""

import math

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from ovseg_jax import device_images
from ovseg_jax import sharding
from ovseg_jax import tokenizer as tokenizer_lib
from ovseg_jax import train_step as ts
from ovseg_jax.data import augment
from ovseg_jax.data import pipeline
from ovseg_jax.data import synthetic
from ovseg_jax.data import tfds_builder
from tests import train_fixtures
from tests.test_no_recompile import _sharded_setup as sharded_setup  # pylint: disable=g-importing-member
from tests.test_no_recompile import count_compiles  # pylint: disable=g-importing-member

N = 48
CROSS = {'cross_image', 'cross_entity_ids', 'cross_entity_mask', 'cross_image_erase_box', 'cross_example_id'}
train_fixtures.use_compile_cache()


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('syn')
  synthetic.write_tfds(str(out), 'train', N, seed=3, min_size=64, max_size=80, shard_size=16)
  return str(out)


def _config(data_dir, *, stage, deit=True, answer_template=''):
  """tiny's data at 32 px; stage 1 / 2 of the authors' two-stage recipe (stage 2: with the partner)."""
  c = tiny.get_config()
  c.unlock()
  c.data.update(data_dir=data_dir, image_size=32, num_workers=0, deit_aug=deit, answer_template=answer_template)
  c.train.global_batch_size = 8
  c.recipe, c.stage = 'two_stage', stage
  c.loss.mask_weight = 0.1 if stage == 2 else 0.0
  c.lock()
  return c


def _batches(config, n):
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1, with_ids=True)
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------- the workers' code before this change
def _old_random_erasing(x, rng, prob=0.25, area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))):
  """timm RandomErasing(mode='pixel', max_count=1) on the host, as the workers did it -> (x, box or None)."""
  if rng.random() > prob:
    return x, None
  hh, ww, c = x.shape
  for _ in range(10):
    target = rng.uniform(*area) * hh * ww
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < ww and h < hh:
      top = int(rng.integers(0, hh - h + 1))
      left = int(rng.integers(0, ww - w + 1))
      x = x.copy()
      x[top:top + h, left:left + w] = rng.standard_normal((h, w, c), dtype=np.float32)
      return x, (top, left, h, w)
  return x, None


def _old_train_image(data, rng, size, deit, crop_scale, channel_shuffle):
  """augment.train_image before uint8: normalised float32 [size, size, 3] (+ erased box) on the host."""
  if deit:
    im = augment.rand_augment(augment.decode_crop_resize(data, rng, size, (0.08, 1.0)), rng)
  else:
    im = augment.decode_crop_resize(data, rng, size, tuple(crop_scale))
  if channel_shuffle:
    im = augment.shuffle_channels(im, rng)
  x = augment.normalize(im)
  return _old_random_erasing(x, rng) if deit else (x, None)


def _device(batch, seed=0):
  return jax.device_get(device_images.prepare_images(jax.tree.map(np.asarray, batch), jax.random.key(seed)))


@pytest.mark.parametrize('deit', [True, False])
def test_device_normalisation_equals_the_old_worker_images(data_dir, deit):
  """Per row of 3 stage-2 batches: replay the old worker (main image, partner draw, partner image) from the
  row's generator; the device's images equal it to 1e-6 outside the erase boxes, and the boxes match."""
  c = _config(data_dir, stage=2, deit=deit)
  path = pipeline.dataset_path(c)
  src = tfds.builder_from_directory(path).as_data_source('train', decoders={'image': tfds.decode.SkipDecoding()})
  index = tfds_builder.load_entity_index(path, 'train', 'canonical')
  key = pipeline.stream_key(c.data.shuffle_seed)
  recipe = (c.data.crop_scale, c.data.channel_shuffle)
  assert c.data.channel_shuffle                                      # tiny's: every draw of the recipe
  erased = kept = 0
  for s, batch in enumerate(_batches(c, 3)):
    assert batch['image'].dtype == batch['cross_image'].dtype == np.uint8
    assert ('image_erase_box' in batch) == ('cross_image_erase_box' in batch) == deit
    got = _device(batch)
    assert got['image'].dtype == np.float32 and 'image_erase_box' not in got
    for i in range(8):
      rng = pipeline.example_rng(key, s * 8 + i)
      rec = src[int(batch['example_id'][i])]
      old = {'image': _old_train_image(rec['image'], rng, 32, deit, *recipe)}
      ents = [e.decode() for e in rec['canonical']]
      cands = index[ents[int(rng.integers(len(ents)))]]
      assert int(cands[rng.integers(len(cands))]) == batch['cross_example_id'][i]   # the same partner draw
      old['cross_image'] = _old_train_image(src[int(batch['cross_example_id'][i])]['image'], rng, 32, deit,
                                            *recipe)
      for k, (x, box) in old.items():
        inside = np.zeros((32, 32), bool)
        if deit:
          assert tuple(batch[f'{k}_erase_box'][i]) == (box or (0, 0, 0, 0)), (s, i, k)
        if box:
          top, left, h, w = box
          inside[top:top + h, left:left + w] = True
          erased += 1
        else:
          kept += 1
        np.testing.assert_allclose(got[k][i][~inside], x[~inside], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got[k][i][~inside], augment.normalize(batch[k][i])[~inside], atol=1e-6)
        if box:                                                      # noise, not the image
          assert np.isfinite(got[k][i][inside]).all()
          assert not np.allclose(got[k][i][inside], augment.normalize(batch[k][i])[inside])
  assert kept > 4 and (erased > 4 if deit else erased == 0)   # both cases met (p = 0.25 per image)


def test_device_erasing_fills_only_the_box_with_unit_noise():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (16, 48, 40, 3), dtype=np.uint8)
  box = np.stack([augment.erase_box(rng, 48, 40, prob=1.0) for _ in range(16)])
  box[3] = 0                                                         # a row without erasing
  batch = {'image': x, 'image_erase_box': box, 'text_ids': np.ones((16, 4), np.int32)}
  out = _device(batch)
  assert set(out) == {'image', 'text_ids'} and out['image'].shape == (16, 48, 40, 3)
  plain = np.stack([augment.normalize(r) for r in x])
  noise = []
  for i, (top, left, h, w) in enumerate(box):
    inside = np.zeros((48, 40), bool)
    inside[top:top + h, left:left + w] = True
    np.testing.assert_allclose(out['image'][i][~inside], plain[i][~inside], atol=1e-6)
    noise.append(out['image'][i][inside].reshape(-1))
  assert noise[3].size == 0
  values = np.concatenate(noise)
  assert values.size > 5000 and np.isfinite(values).all()
  assert abs(values.mean()) < 0.05 and 0.95 < values.std() < 1.05   # N(0, 1), not the image
  assert not np.allclose(noise[0][:50], noise[1][:50])
  again = _device(batch, seed=1)                                     # another step: other noise
  assert not np.allclose(again['image'][0][~np.isclose(again['image'][0], plain[0])], out['image'][0][
      ~np.isclose(again['image'][0], plain[0])])
  # float32 images are already normalised: passed through (the golden fixtures and tests feed them)
  f = {'image': plain}
  np.testing.assert_array_equal(_device(f)['image'], plain)


def test_stage1_batch_has_no_partner_and_the_same_other_arrays(data_dir, monkeypatch):
  made = []
  init = pipeline.ExampleTransform.__init__

  def keep(self, **kwargs):
    init(self, **kwargs)
    made.append(self)
  monkeypatch.setattr(pipeline.ExampleTransform, '__init__', keep)
  tok = tokenizer_lib.get_tokenizer(max_length=tiny.get_config().model.text.max_length)
  for template in ('a photo of {}.', ''):
    one = _batches(_config(data_dir, stage=1, answer_template=template), 3)
    two = _batches(_config(data_dir, stage=2, answer_template=template), 3)
    for a, b in zip(one, two):
      assert not CROSS & set(a) and CROSS <= set(b)
      assert set(a) == set(b) - CROSS
      # answer_template '' draws the answer's template prefix after the partner's draws (the stream of a run
      # with partners is unchanged); without a partner that one draw comes from another generator state
      same = [k for k in a if not (template == '' and k.startswith('answer_'))]
      for k in same:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
      assert {'image', 'image_erase_box', 'text_ids', 'question_ids', 'example_id'} <= set(same)
      for x, y in zip(a['answer_ids'], b['answer_ids']):              # template prefix + the same entities
        assert tok.decode(x).split()[-2:] == tok.decode(y).split()[-2:]
  # the transforms themselves: stage 1 reads one record per example, stage 2 two (the partner)
  assert [t.cross_image for t in made] == [False, True] * 2
  for transform, per_example in zip(made[:2], (1, 2)):
    reads = []
    read = transform._read                                           # pylint: disable=protected-access
    transform._read = lambda idx, read=read: reads.append(idx) or read(idx)   # pylint: disable=protected-access
    for g in range(8):
      assert '_bad' not in transform(g, pipeline.example_rng(pipeline.stream_key(0), g))
    assert len(reads) == 8 * per_example


def test_pipeline_and_step_agree_on_when_the_partner_is_needed():
  c = tiny.get_config()
  for stage, recipe, weight in [(1, 'two_stage', 0.0), (2, 'two_stage', 0.1), (2, 'two_stage', 0.0),
                                (1, 'paper_single', 0.1), (1, 'paper_single', 0.0), (2, 'paper_single', 0.1)]:
    with c.unlocked():
      c.stage, c.recipe, c.loss.mask_weight = stage, recipe, weight
    assert pipeline.needs_cross_image(c) == ts.uses_teacher(c), (stage, recipe, weight)
    keys = set(ts.required_batch_keys(c))
    assert (set(ts.CROSS_KEYS) <= keys) == ts.uses_teacher(c)
    assert not set(ts.CROSS_KEYS) & set(ts.required_batch_keys(c, mask_branch=False))


def test_the_mask_branch_refuses_a_batch_without_cross_keys():
  c = train_fixtures.small_config(stage=2)
  batch = {k: np.zeros((8, 4), np.int32) for k in ts.BATCH_KEYS if k not in ts.CROSS_KEYS}
  with pytest.raises(KeyError, match='cross_image'):
    ts.forward_losses(None, None, None, batch, jax.random.key(0), 0, config=c, model=None, total_steps=1)


def _stage1_batch(config, index):
  """The fixture's stage-1 batch as the pipeline ships it: uint8 images + erase boxes, no cross keys."""
  b = train_fixtures.batches(config, {'index': index})
  batch = {k: v for k, v in next(b).items() if k not in ts.CROSS_KEYS}
  rng = np.random.default_rng(index)
  s = config.data.image_size
  batch['image'] = rng.integers(0, 256, (8, s, s, 3), dtype=np.uint8)
  batch['image_erase_box'] = np.stack([augment.erase_box(rng, s, s, prob=0.5) for _ in range(8)])
  return batch


def test_stage1_step_runs_uint8_without_cross_keys_and_matches_host_normalisation():
  config = train_fixtures.small_config(stage=1)
  assert not ts.uses_teacher(config)
  rng = jax.random.key(1)
  batch = _stage1_batch(config, 0)
  assert batch['image_erase_box'][:, 2].any() and not batch['image_erase_box'][:, 2].all()
  # the same batch normalised and erased on the host, with the key the step derives (step 0)
  erase_key = jax.random.fold_in(jax.random.fold_in(rng, 0), device_images.RNG_FOLD)
  host = jax.device_get(device_images.prepare_images(batch, erase_key))
  assert host['image'].dtype == np.float32 and 'image_erase_box' not in host
  losses = {}
  for name, b in (('float32', host), ('uint8', batch)):
    mesh, model, tx, sched, state, shardings = sharded_setup(config)
    step_fn = ts.jit_train_step(config, model, tx, sched, config.train.total_steps, mesh, shardings)
    state, m = step_fn(state, sharding.host_batch_to_global(b, mesh), rng)
    m = jax.device_get(m)
    assert np.isfinite(m['loss']) and m['finite'] == 1.0
    losses[name] = m
  for k in ('loss', 'loss_contrast', 'loss_entity', 'grad_norm'):
    np.testing.assert_allclose(losses['uint8'][k], losses['float32'][k], rtol=1e-5, err_msg=k)
  with count_compiles() as seen:                                    # new pixels and boxes: the same program
    for i in (1, 2):
      state, m = step_fn(state, sharding.host_batch_to_global(_stage1_batch(config, i), mesh), rng)
      assert np.isfinite(jax.device_get(m)['loss'])
  assert not seen, f'{len(seen)} XLA compilations after the first uint8 step'
