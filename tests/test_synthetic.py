"""The embedded synthetic caption dataset (data/synthetic.py): content, captions, held-out split, formats."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import synthetic as S


def _heldout_pairs(ex):
  return [(o[0], o[1]) for o in ex['objects'] if S.HELD_OUT_COLOURS[o[0]] == o[1]]


def test_deterministic_and_seed_dependent():
  a, b = S.make_example(0, 'train', 7), S.make_example(0, 'train', 7)
  assert np.array_equal(a['image'], b['image']) and a['caption'] == b['caption']
  c = S.make_example(1, 'train', 7)
  assert not (a['image'].shape == c['image'].shape and np.array_equal(a['image'], c['image']))


def test_images_labels_and_captions_agree():
  ex_tool = entities_lib.get_extractor(entities_lib.SYNTHETIC, 'fixed')
  counts = np.zeros(len(S.SHAPES) + 1)
  for i in range(150):
    ex = S.make_example(0, 'train', i, 64, 128)
    h, w = ex['label'].shape
    assert ex['image'].shape == (h, w, 3) and ex['image'].dtype == np.uint8
    assert 64 <= min(h, w) and max(h, w) <= 224
    assert 1 <= len(ex['objects']) <= 3
    shapes = [o[0] for o in ex['objects']]
    assert len(set(shapes)) == len(shapes)
    ids = set(np.unique(ex['label'])) - {0, S.IGNORE}
    assert ids == {S.SHAPES.index(s) + 1 for s in shapes}            # every object is visible
    assert ex_tool.entities(ex['caption']) == shapes                 # caption names them, in order
    for shape, colour, *_ in ex['objects']:
      named = [c for c in S.COLOURS if f'{c} {shape}' in ex['caption']]
      assert named in ([], [colour])                                 # a named colour is the object's own
    # the ignore band is thin: most object pixels are labelled
    obj = (ex['label'] > 0) & (ex['label'] != S.IGNORE)
    assert obj.sum() > (ex['label'] == S.IGNORE).sum()
    for k in range(len(S.SHAPES) + 1):
      counts[k] += (ex['label'] == k).sum()
  assert (counts[1:] > 0).all()                                       # all six classes occur


def test_objects_have_their_colour_and_class_pattern():
  for i in range(12):
    ex = S.make_example(0, 'train', i, 96, 96)
    for shape, colour, *_ in ex['objects']:
      m = ex['label'] == S.SHAPES.index(shape) + 1
      px = ex['image'][m].astype(np.float32)
      bright = px.sum(1)
      lit = px[bright >= np.median(bright)].mean(0)                  # the un-patterned part of the object
      target = np.asarray(S._RGB[colour], np.float32)
      assert np.abs(lit - target).max() < 60, (shape, colour, lit)
      # the class pattern: a dark share of the object, none for the plain class
      dark = (bright < 0.6 * np.percentile(bright, 90)).mean()
      if S.PATTERNS[shape] == 'plain':
        assert dark < 0.05, (shape, dark)
      else:
        assert 0.1 < dark < 0.7, (shape, dark)


def test_heldout_split_uses_unseen_combinations():
  train = [S.make_example(0, 'train', i) for i in range(300)]
  val = [S.make_example(1, 'val', i) for i in range(200)]
  assert not any(_heldout_pairs(e) for e in train)
  assert all(S._pair_ok([o[0] for o in e['objects']]) for e in train)
  assert all(_heldout_pairs(e) for e in val)
  co = sum(not S._pair_ok([o[0] for o in e['objects']]) for e in val)
  assert 20 < co < 200
  train_pairs = {(o[0], o[1]) for e in train for o in e['objects']}
  assert len(train_pairs) == 30                                       # 36 pairs minus the 6 held out


def test_voc_format(tmp_path):
  S.write_voc(str(tmp_path), 'val', 6, seed=2, min_size=64, max_size=96)
  ids = (tmp_path / 'ImageSets' / 'Segmentation' / 'val.txt').read_text().split()
  assert len(ids) == 6
  names = (tmp_path / 'class_names.txt').read_text().split()
  assert names == ['background', 'circle', 'square', 'triangle', 'star', 'cross', 'ring']
  for name in ids:
    im = Image.open(tmp_path / 'JPEGImages' / f'{name}.jpg')
    lab = Image.open(tmp_path / 'SegmentationClass' / f'{name}.png')
    assert im.format == 'JPEG' and lab.mode == 'P' and im.size == lab.size
    values = set(np.unique(np.asarray(lab)))
    assert values <= set(range(7)) | {255} and len(values - {0, 255}) >= 1
  ex = S.make_example(2, 'val', 0, 64, 96)
  assert np.array_equal(np.asarray(Image.open(tmp_path / 'SegmentationClass' / f'{ids[0]}.png')), ex['label'])


def test_tfds_format_through_the_builder(tmp_path, capsys):
  rc = S.main(['--output', str(tmp_path), '--split', 'train', '--num_images', '30', '--seed', '0',
               '--format', 'tfds', '--shard_size', '16'])
  assert rc == 0
  assert 'kept' in capsys.readouterr().out
  vdir = os.path.join(str(tmp_path), 'synthetic_captions', '1.0.0')
  src = tfds.builder_from_directory(vdir).as_data_source('train')
  assert len(src) == 30
  rec = src[0]
  assert rec['image'].ndim == 3 and set(e.decode() for e in rec['entities']) <= set(S.SHAPES)
  # a second split lands beside the first
  assert S.main(['--output', str(tmp_path), '--split', 'val', '--num_images', '10', '--format', 'tfds']) == 0
  info = tfds.builder_from_directory(vdir).info
  assert info.splits['train'].num_examples == 30 and info.splits['val'].num_examples == 10


@pytest.mark.parametrize('argv,msg', [
    (['--num_images', '0'], '--num_images must be positive'),
    (['--num_images', '5', '--min_size', '300', '--max_size', '200'], '--min_size'),
])
def test_cli_errors(tmp_path, capsys, argv, msg):
  assert S.main(['--output', str(tmp_path)] + argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and msg in err and err.count('\n') == 1
