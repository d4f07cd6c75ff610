"""Training input pipeline (data/pipeline.py) on a tiny synthetic tfds dataset: determinism, exact resume,
per-epoch reshuffle, per-host coverage, the same global batch and state for any host and worker count,
cross-image partners, corrupt-record replacement, worker processes."""

import io
import json
import os

import grain
import numpy as np
import pytest
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from PIL import Image

from configs import tiny
from ovseg_jax import tokenizer as tokenizer_lib
from ovseg_jax.data import augment
from ovseg_jax.data import pipeline
from ovseg_jax.data import synthetic
from ovseg_jax.data import tfds_builder

N = 48


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('syn')
  synthetic.write_tfds(str(out), 'train', N, seed=3, min_size=64, max_size=80, shard_size=16)
  return str(out)


def _config(data_dir, **data):
  c = tiny.get_config()
  c.unlock()
  c.data.data_dir = data_dir
  c.data.image_size = 32
  c.data.num_workers = 0
  c.train.global_batch_size = 8
  for k, v in data.items():
    setattr(c.data, k, v)
  c.lock()
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_batch_dict_shapes_and_text(data_dir):
  c = _config(data_dir)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  b = next(it)
  t = c.model.text.max_length
  assert set(b) == {'image', 'text_ids', 'text_mask', 'question_ids', 'question_mask', 'answer_ids',
                    'answer_mask', 'cross_image', 'cross_entity_ids', 'cross_entity_mask'}
  assert b['image'].shape == b['cross_image'].shape == (8, 32, 32, 3)
  assert b['image'].dtype == b['cross_image'].dtype == np.uint8       # normalised on the device
  for k in ('text', 'question', 'answer', 'cross_entity'):
    assert b[f'{k}_ids'].shape == b[f'{k}_mask'].shape == (8, t) and b[f'{k}_ids'].dtype == np.int32
  assert it.steps_per_epoch == N // 8 and it.per_host_batch == 8
  tok = tokenizer_lib.get_tokenizer(max_length=t)
  shapes = set(synthetic.SHAPES)
  for i in range(8):
    assert (b['question_ids'][i] == tokenizer_lib.MASK_ID).any()        # every caption names a shape
    assert not (b['text_ids'][i] == tokenizer_lib.MASK_ID).any()
    cross = tok.decode(b['cross_entity_ids'][i]).split()
    assert cross[:4] == ['[CLS]', 'a', 'photo', 'of'] and cross[4] in shapes
    answer = tok.decode(b['answer_ids'][i])
    assert any(s in answer.split() for s in shapes)
  # raw 0-255 pixels (the device normalises: tests/test_device_images.py)
  assert b['image'].max() > 100 and b['image'].std() > 10


def test_same_seed_same_batches_other_seed_differs(data_dir):
  a = _take(pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=1), 3)
  b = _take(pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=1), 3)
  assert all(_same(x, y) for x, y in zip(a, b))
  c = _take(pipeline.make_train_iterator(_config(data_dir, shuffle_seed=7), process_index=0,
                                         process_count=1), 1)
  assert not np.array_equal(a[0]['text_ids'], c[0]['text_ids'])


def test_restored_state_gives_the_same_next_batch(data_dir):
  c = _config(data_dir)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))       # what a checkpoint stores
  expected = _take(it, 2)
  resumed = pipeline.make_train_iterator(c, process_index=0, process_count=1, start_state=state)
  got = _take(resumed, 2)
  assert all(_same(x, y) for x, y in zip(expected, got))
  with pytest.raises(ValueError, match='same data config'):
    pipeline.make_train_iterator(_config(data_dir, shuffle_seed=1), process_index=0, process_count=1,
                                 start_state=state)


def test_order_changes_across_epochs(data_dir):
  it = pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=1, with_ids=True)
  ids = np.concatenate([b['example_id'] for b in _take(it, 2 * N // 8)])
  e0, e1 = ids[:N], ids[N:]
  assert sorted(e0) == sorted(e1) == list(range(N))   # each epoch is a permutation of the dataset
  assert not np.array_equal(e0, e1)


def test_four_hosts_cover_each_example_once_per_epoch(data_dir):
  c = _config(data_dir)
  per_host_batches = N // 8                            # one epoch: N / global_batch steps
  seen = []
  for h in range(4):
    it = pipeline.make_train_iterator(c, process_index=h, process_count=4, with_ids=True)
    batches = _take(it, per_host_batches)
    assert batches[0]['image'].shape[0] == 2           # 8 / 4 hosts
    seen.append(np.concatenate([b['example_id'] for b in batches]))
  allids = np.concatenate(seen)
  assert sorted(allids) == list(range(N))
  single = pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True)
  assert set(np.concatenate([b['example_id'] for b in _take(single, per_host_batches)])) == set(range(N))


def test_cross_partner_shares_an_entity(data_dir):
  c = _config(data_dir)
  vdir = tfds_builder.dataset_dir(data_dir, 'synthetic_captions')
  src = tfds.builder_from_directory(vdir).as_data_source('train',
                                                         decoders={'image': tfds.decode.SkipDecoding()})
  ents = [{e.decode() for e in src[i]['canonical']} for i in range(N)]
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True)
  tok = tokenizer_lib.get_tokenizer(max_length=c.model.text.max_length)
  pairs = 0
  for b in _take(it, N // 8):
    for i, (a, p) in enumerate(zip(b['example_id'], b['cross_example_id'])):
      shared = ents[a] & ents[p]
      assert shared, (a, p)
      assert tok.decode(b['cross_entity_ids'][i]).split()[4] in shared   # the prompt names a shared entity
      pairs += int(a != p)
  assert pairs > N // 2                               # partners are mostly other images


def _write_dataset_with_corrupt_records(root):
  """12 good synthetic records + a garbage proto + a record whose JPEG bytes are garbage."""
  feats = tfds_builder.features()
  work = os.path.join(root, 'parts')
  os.makedirs(work)
  path = os.path.join(work, 'part-0.array_record')
  w = array_record_module.ArrayRecordWriter(path, tfds_builder.ARRAY_RECORD_OPTIONS)
  canonical, n = {}, 0
  for i in range(14):
    ex = synthetic.make_example(0, 'train', i, 64, 64)
    shapes = [o[0] for o in ex['objects']]
    out = io.BytesIO()
    Image.fromarray(ex['image']).save(out, 'JPEG')
    if i == 5:
      w.write(b'\x00\x01 this is not a serialized example')
    else:
      image = b'\xff\xd8 broken jpeg' if i == 9 else out.getvalue()
      w.write(feats.serialize_example({'image': image, 'caption': ex['caption'], 'entities': shapes,
                                       'canonical': shapes, 'key': str(i)}))
      for s in shapes:
        canonical.setdefault(s, []).append(n)
    n += 1
  w.close()
  part = {'path': path, 'num_examples': n, 'num_bytes': os.path.getsize(path), 'canonical': canonical,
          'surface': canonical}
  meta = {'vocab': synthetic.entities_lib.SYNTHETIC.to_json(), 'entity_mode': 'fixed'}
  tfds_builder.finalize_split(data_dir=root, name='synthetic_captions', split='train', parts=[part],
                              meta=meta, report={})
  return n


def test_corrupt_records_are_replaced_and_counted(tmp_path):
  n = _write_dataset_with_corrupt_records(str(tmp_path))
  c = _config(str(tmp_path))
  c.unlock()
  c.train.global_batch_size = 2
  c.lock()
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True)
  batches = _take(it, n)                                            # 2 epochs of n = 14 stream positions
  ids = np.concatenate([b['example_id'] for b in batches])
  images = np.concatenate([b['image'] for b in batches])
  # the documented stream order (grain shuffle before repeat); a bad record at position g is replaced by the
  # example of position g + 1 (g + 2, ... while those are bad too)
  order = grain.MapDataset.range(n).shuffle(seed=0).repeat(None)
  expected, failed = [], 0
  for g in range(2 * n):
    t = 0
    while order[g + t] in (5, 9):
      t += 1
    expected.append(order[g + t])
    failed += t
  assert ids.tolist() == expected
  assert it.counters['skipped_records'] == failed >= 4              # 2 bad records x 2 epochs, at least
  good = {i for i in range(n) if i not in (5, 9)}
  assert set(ids[:n]) == set(ids[n:]) == good                       # every good record keeps its own slot
  for g in range(2 * n - 1):                                        # a replacement has draws of its own
    if order[g] in (5, 9) and ids[g] == ids[g + 1]:
      assert not np.array_equal(images[g], images[g + 1])
  # the replacement is a function of the stream position: the same on 2 hosts
  halves = [np.concatenate([b['example_id'] for b in _take(
      pipeline.make_train_iterator(c, process_index=h, process_count=2, with_ids=True), n)]) for h in (0, 1)]
  assert np.array_equal(np.stack(halves, 1).reshape(-1), ids)


def test_deit_recipe_and_stage2_recipe_differ(data_dir):
  b1 = next(pipeline.make_train_iterator(_config(data_dir, deit_aug=True), process_index=0, process_count=1))
  b2 = next(pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=1))
  assert b1['image'].shape == b2['image'].shape and np.isfinite(b1['image']).all()
  assert np.array_equal(b1['text_ids'], b2['text_ids'])              # same examples, other augmentation
  assert not np.allclose(b1['image'], b2['image'])


def test_augment_primitives():
  rng = np.random.default_rng(0)
  for _ in range(200):
    left, top, w, h = augment.rrc_params(rng, 120, 80, (0.4, 1.0))
    assert 0 <= left and left + w <= 120 and 0 <= top and top + h <= 80
    assert 0.4 * 9600 * 0.9 <= w * h <= 9600
  boxes = np.stack([augment.erase_box(rng, 32, 40, prob=1.0) for _ in range(50)])
  top, left, h, w = boxes.T
  assert (h > 0).all() and (w > 0).all() and (top + h <= 32).all() and (left + w <= 40).all()
  assert 0.02 * 0.9 * 32 * 40 <= (h * w).min() and (h * w).max() <= 32 * 40 / 3 * 1.1
  assert not np.count_nonzero(augment.erase_box(rng, 32, 32, prob=0.0))
  im = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 40, 3), dtype=np.uint8))
  out = augment.rand_augment(im, rng)
  assert out.size == (40, 40) and out.mode == 'RGB'
  # magnitude 10 posterizes to 0 bits: a black image (timm's Pillow), not an error that drops the record
  assert np.asarray(augment._OPS['PosterizeIncreasing'](im, 10.0, rng)).max() == 0   # pylint: disable=protected-access
  assert np.asarray(augment._OPS['PosterizeIncreasing'](im, 9.0, rng)).max() > 0     # pylint: disable=protected-access
  # channel shuffle: each output channel is one input channel, and all six orders occur
  arr = np.asarray(im)
  orders = set()
  for _ in range(60):
    sh = augment.shuffle_channels(arr, rng)
    order = tuple(next(j for j in range(3) if np.array_equal(sh[..., i], arr[..., j])) for i in range(3))
    assert sorted(order) == [0, 1, 2]
    orders.add(order)
  assert len(orders) == 6
  assert isinstance(augment.shuffle_channels(im, rng), Image.Image)


def test_channel_shuffle_option_changes_only_the_colours(data_dir):
  plain = next(pipeline.make_train_iterator(_config(data_dir, channel_shuffle=False), process_index=0,
                                            process_count=1))
  shuffled = next(pipeline.make_train_iterator(_config(data_dir, channel_shuffle=True), process_index=0,
                                               process_count=1))
  assert np.array_equal(plain['text_ids'], shuffled['text_ids'])
  assert not np.allclose(plain['image'], shuffled['image'])


def _global_batches(c, process_count, steps, **kwargs):
  """The hosts' batches of `steps` steps concatenated by row (what the trainer's global array holds)."""
  hosts = [_take(pipeline.make_train_iterator(c, process_index=h, process_count=process_count, with_ids=True,
                                              **kwargs), steps) for h in range(process_count)]
  return [{k: np.concatenate([hosts[h][s][k] for h in range(process_count)]) for k in hosts[0][s]}
          for s in range(steps)]


def test_global_batch_is_the_same_for_any_host_count(data_dir):
  """Host h holds rows h*b .. h*b + b-1 of global batch s, with the same augmentation draws, bit for bit."""
  c = _config(data_dir, deit_aug=True)                              # every random draw: RandAugment, erasing
  steps = N // 8 + 2                                                # across an epoch boundary
  one = _global_batches(c, 1, steps)
  for hosts in (2, 4, 8):
    many = _global_batches(c, hosts, steps)
    for s in range(steps):
      assert _same(one[s], many[s]), (hosts, s)
  # any rows a mesh gives a process (here interleaved) are the same rows of the same global batch
  rows = [[0, 1, 4, 5], [2, 3, 6, 7]]
  parts = [_take(pipeline.make_train_iterator(c, process_index=h, process_count=2, host_rows=rows[h],
                                              with_ids=True), 2) for h in (0, 1)]
  for s in range(2):
    for k in one[s]:
      assert np.array_equal(parts[0][s][k], one[s][k][rows[0]])
      assert np.array_equal(parts[1][s][k], one[s][k][rows[1]])
  with pytest.raises(ValueError, match='ascending rows'):
    pipeline.make_train_iterator(c, process_index=0, process_count=2, host_rows=[1, 0, 4, 5])


def test_state_resumes_on_another_host_count(data_dir):
  c = _config(data_dir)
  one = _global_batches(c, 1, 5)
  two = [pipeline.make_train_iterator(c, process_index=h, process_count=2, with_ids=True) for h in (0, 1)]
  for it in two:
    _take(it, 3)
  states = [json.loads(json.dumps(it.get_state())) for it in two]   # what a checkpoint stores
  assert states[0] == states[1] and states[0]['position'] == 3 * 8  # no host in it
  resumed = _take(pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True,
                                               start_state=states[0]), 2)
  assert _same(resumed[0], one[3]) and _same(resumed[1], one[4])   # 2 hosts -> 1 host
  single = pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True)
  _take(single, 1)
  four = _global_batches(c, 4, 2, start_state=single.get_state())   # 1 host -> 4 hosts
  assert _same(four[0], one[1]) and _same(four[1], one[2])


def test_state_of_an_earlier_version_resumes_and_garbage_is_refused(data_dir):
  c = _config(data_dir)
  one = _global_batches(c, 1, 3)
  it = pipeline.make_train_iterator(c, process_index=0, process_count=1)
  fp = dict(it.get_state()['fingerprint'], process_index=1, process_count=2, per_host_batch=4, num_workers=0)
  old = {'grain': {'next_index': 0}, 'counters': {'batches': 2, 'skipped_records': 0}, 'fingerprint': fp}
  got = next(pipeline.make_train_iterator(c, process_index=0, process_count=1, with_ids=True, start_state=old))
  assert _same(got, one[2])                                         # 2 global batches consumed
  for bad, match in (({'fingerprint': dict(fp), 'version': 7, 'position': 0}, 'version 7'),
                     ({'fingerprint': dict(fp), 'version': 2, 'position': -8}, 'stream position'),
                     ({'version': 2}, 'not an input-pipeline state')):
    with pytest.raises(ValueError, match=match):
      pipeline.make_train_iterator(c, process_index=0, process_count=1, start_state=bad)


def test_worker_processes_match_in_process(data_dir):
  """Worker processes build whole host batches: the stream does not depend on the worker count."""
  one = _global_batches(_config(data_dir), 1, 4)
  host0 = _take(pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=2,
                                             with_ids=True), 3)
  it = pipeline.make_train_iterator(_config(data_dir, num_workers=2), process_index=1, process_count=2,
                                    with_ids=True)
  try:
    host1 = [{k: np.array(v) for k, v in b.items()} for b in _take(it, 3)]   # copies: no shared memory kept
    state = it.get_state()
  finally:
    it.close()
  for s in range(3):
    assert _same({k: np.concatenate([host0[s][k], host1[s][k]]) for k in one[s]}, one[s]), s
  resumed = pipeline.make_train_iterator(_config(data_dir, num_workers=2), process_index=0, process_count=1,
                                         with_ids=True, start_state=state)
  try:
    assert _same({k: np.array(v) for k, v in next(resumed).items()}, one[3])
  finally:
    resumed.close()


def test_missing_dataset_error_says_how_to_build(tmp_path):
  with pytest.raises(FileNotFoundError, match='python -m ovseg_jax.data.synthetic'):
    pipeline.make_train_iterator(_config(str(tmp_path)), process_index=0, process_count=1)


def test_official_entity_mode_runs_with_its_quirks(data_dir):
  c = _config(data_dir, entity_mode='official')
  b = next(pipeline.make_train_iterator(c, process_index=0, process_count=1))
  tok = tokenizer_lib.get_tokenizer(max_length=c.model.text.max_length)
  official = synthetic.entities_lib.get_extractor(synthetic.entities_lib.SYNTHETIC, 'official')
  for i in range(8):
    # synthetic captions are lower-case words, so the decoded caption is the caption
    caption = tok.decode(b['text_ids'][i]).replace('[CLS] ', '').replace(' [SEP]', '')
    expected = official.mask(caption)[0]          # strip("'s"): 'cross' -> 'cro', 'stripes' -> 'stripe'
    assert np.array_equal(tok([expected])[0][0], b['question_ids'][i]), (caption, expected)
  fixed = next(pipeline.make_train_iterator(_config(data_dir), process_index=0, process_count=1))
  assert np.array_equal(b['text_ids'], fixed['text_ids'])
  assert not np.array_equal(b['question_ids'], fixed['question_ids'])
