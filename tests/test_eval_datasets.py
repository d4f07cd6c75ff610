"""The benchmark readers (eval_datasets.py) on fake datasets in their real layouts, scored through
`evaluate --predictions` with hand-computed IoUs; the `--suite` table; the evaluation's bad-input cases.

Every fake dataset is a few tiny PNGs written here. Each builder plants ground truth in the benchmark's own
encoding (ADE's 0 = ignore, Cityscapes' labelIds, COCO-Stuff's raw 182 ids or mmseg's labelTrainIds, VOC20's
and Context59's dropped background) and a prediction in class-index space, and returns the IoUs worked out by
hand in the comments (IoU_c = I / (gt_c + pred_c - I) over the pixels whose ground truth is not ignored; a
class with neither ground truth nor prediction is left out of the mean).
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax import evaluate

E = eval_datasets


# Every label map and prediction below is drawn at 1 pixel per cell; a builder's `scale` s blows each cell
# up to s x s pixels (images get the label's size), which leaves every IoU as it is.
_SCALE = {'s': 1}


def _big(labels) -> np.ndarray:
  s = _SCALE['s']
  return np.kron(np.asarray(labels), np.ones((s, s), np.int64))


def _image(path, shape=(8, 8)):
  """A flat RGB image with the size of the label map of `shape` cells."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  h, w = (_SCALE['s'] * n for n in shape)
  Image.fromarray(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), np.uint8)).save(path)


def _grey(path, labels):
  """A greyscale ('L') label PNG, as ADE20K, Cityscapes and COCO-Stuff store theirs."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(_big(labels).astype(np.uint8), mode='L').save(path)


def _palette(path, labels):
  """A palette ('P') label PNG, as VOC and Context store theirs."""
  E.write_label_png(path, _big(labels))


def _pred(pred_root, bench, stem, labels):
  E.write_label_png(os.path.join(pred_root, bench, stem + '.png'), _big(labels))


def _scaled(builder, root, preds, scale):
  _SCALE['s'] = scale
  try:
    return builder(root, preds)
  finally:
    _SCALE['s'] = 1


def _run(*argv) -> int:
  return evaluate.main([str(a) for a in argv])


def _score(tmp_path, bench, data_dir, pred_root, *extra):
  out = tmp_path / f'{bench}.json'
  assert _run('--predictions', os.path.join(pred_root, bench), '--dataset', bench, '--data_dir', data_dir,
              '--output', out, *extra) == 0
  return json.load(open(out))


def _check(result, expected):
  """expected: {'per_class': {name: IoU fraction}, 'mIoU': fraction, 'aAcc': fraction}."""
  for name, iou in expected['per_class'].items():
    assert result['per_class'][name]['IoU'] == pytest.approx(100 * iou, abs=1e-3), name
  scored = [n for n, c in result['per_class'].items() if c['IoU'] is not None]
  assert sorted(scored) == sorted(expected['per_class'])      # every other class is NaN (left out)
  assert result['mIoU'] == pytest.approx(100 * expected['mIoU'], abs=1e-3)
  assert result['aAcc'] == pytest.approx(100 * expected['aAcc'], abs=1e-3)


# ------------------------------------------------------------------------------------------------------------
# Builders: one per layout. Each returns {benchmark: expected}.
# ------------------------------------------------------------------------------------------------------------

def make_voc(root, preds):
  """VOC2012 layout; VOC scores 21 classes, VOC20 the same files without background (0 -> ignored)."""
  _image(os.path.join(root, 'JPEGImages', '2007_000033.jpg'), (2, 4))
  _image(os.path.join(root, 'JPEGImages', '2007_000042.jpg'), (2, 2))
  os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'), exist_ok=True)
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt'), 'w') as f:
    f.write('2007_000033\n2007_000042\n')
  gt = np.array([[0, 1, 1, 255], [15, 15, 0, 20]])
  _palette(os.path.join(root, 'SegmentationClass', '2007_000033.png'), gt)
  _palette(os.path.join(root, 'SegmentationClass', '2007_000042.png'), np.full((2, 2), 255))
  _pred(preds, 'voc', '2007_000033', [[0, 1, 0, 3], [15, 0, 0, 20]])
  _pred(preds, 'voc', '2007_000042', np.zeros((2, 2)))
  # VOC20 ground truth: [[ign, 0, 0, ign], [14, 14, ign, 19]]
  _pred(preds, 'voc20', '2007_000033', [[3, 0, 1, 0], [14, 0, 0, 19]])
  _pred(preds, 'voc20', '2007_000042', np.zeros((2, 2)))
  return {
      # background: gt 2, pred 4 ((0,0) (0,2) (1,1) (1,2)), I 2 -> 2/4; aeroplane: gt 2, pred 1, I 1 -> 1/2;
      # person: gt 2, pred 1, I 1 -> 1/2; monitor 1/1; class 3 is predicted on an ignored pixel only (NaN).
      'voc': {'per_class': {'background': 1 / 2, 'aeroplane': 1 / 2, 'person': 1 / 2, 'monitor': 1.0},
              'mIoU': 2.5 / 4, 'aAcc': 5 / 7},
      # aeroplane: gt 2, pred 2 ((0,1) (1,1)), I 1 -> 1/3; bicycle: pred 1 only -> 0; person: gt 2, pred 1, I 1
      # -> 1/2; tvmonitor 1/1. Correct: (0,1) (1,0) (1,3) of 5 scored pixels.
      'voc20': {'per_class': {'aeroplane': 1 / 3, 'bicycle': 0.0, 'person': 1 / 2, 'tvmonitor': 1.0},
                'mIoU': (1 / 3 + 0 + 1 / 2 + 1) / 4, 'aAcc': 3 / 5},
  }


def make_context(root, preds):
  """VOC2010 + mmseg's SegmentationClassContext (0 = background, 1..59); Context59 drops the background."""
  _image(os.path.join(root, 'JPEGImages', '2008_000002.jpg'), (2, 3))
  os.makedirs(os.path.join(root, 'ImageSets', 'SegmentationContext'), exist_ok=True)
  with open(os.path.join(root, 'ImageSets', 'SegmentationContext', 'val.txt'), 'w') as f:
    f.write('2008_000002\n')
  _palette(os.path.join(root, 'SegmentationClassContext', '2008_000002.png'), [[0, 59, 59], [1, 0, 255]])
  _pred(preds, 'context', '2008_000002', [[0, 59, 1], [1, 0, 0]])
  # Context59 ground truth: [[ign, 58, 58], [0, ign, ign]]
  _pred(preds, 'context59', '2008_000002', [[7, 58, 58], [1, 0, 0]])
  return {
      # background 2/2; wood: gt 2, pred 1 -> 1/2; airplane: gt 1, pred 2 ((0,2) (1,0)), I 1 -> 1/2.
      'context': {'per_class': {'background': 1.0, 'wood': 1 / 2, 'airplane': 1 / 2},
                  'mIoU': 2 / 3, 'aAcc': 4 / 5},
      # wood 2/2; aeroplane: gt 1, predicted 'bag' -> 0; bag: pred 1, gt 0 -> 0.
      'context59': {'per_class': {'wood': 1.0, 'aeroplane': 0.0, 'bag': 0.0}, 'mIoU': 1 / 3, 'aAcc': 2 / 3},
  }


def make_coco(root, preds):
  """One COCO root: images/val2017, annotations/val2017_cocoobject (COCO-Object) and annotations/val2017
  (COCO-Stuff: mmseg's <stem>_labelTrainIds.png for one image, the raw stuffthingmap <stem>.png for the other)."""
  _image(os.path.join(root, 'images', 'val2017', '000000000139.jpg'), (1, 3))
  _image(os.path.join(root, 'images', 'val2017', '000000000285.jpg'), (2, 3))
  obj = os.path.join(root, 'annotations', 'val2017_cocoobject')
  _grey(os.path.join(obj, '000000000139_instanceTrainIds.png'), [[0, 1, 80]])
  _grey(os.path.join(obj, '000000000285_instanceTrainIds.png'), [[255, 255, 255], [255, 255, 255]])
  _pred(preds, 'coco_object', '000000000139', [[0, 1, 1]])
  _pred(preds, 'coco_object', '000000000285', [[3, 3, 3], [3, 3, 3]])
  stuff = os.path.join(root, 'annotations', 'val2017')
  _grey(os.path.join(stuff, '000000000139_labelTrainIds.png'), [[80, 170, 255]])
  # raw ids: 0 person -> 0, 91 banner -> 80, 181 wood -> 170, 11 unused (no class), 12 stop sign -> 11
  _grey(os.path.join(stuff, '000000000285.png'), [[0, 91, 181], [11, 255, 12]])
  _pred(preds, 'coco_stuff', '000000000139', [[80, 80, 3]])
  _pred(preds, 'coco_stuff', '000000000285', [[0, 80, 0], [5, 7, 11]])
  return {
      # background 1/1; person: gt 1, pred 2, I 1 -> 1/2; toothbrush: gt 1, pred 0 -> 0.
      'coco_object': {'per_class': {'background': 1.0, 'person': 1 / 2, 'toothbrush': 0.0},
                      'mIoU': 1.5 / 3, 'aAcc': 2 / 3},
      # person: gt 1, pred 2 -> 1/2; banner: gt 2, pred 3, I 2 -> 2/3; wood: gt 2, pred 0 -> 0; stop sign 1/1;
      # bus (class 5) is predicted on the unused id 11, a pixel mmseg keeps: pred 1, gt 0 -> 0.
      'coco_stuff': {'per_class': {'person': 1 / 2, 'banner': 2 / 3, 'wood': 0.0, 'stop sign': 1.0, 'bus': 0.0},
                     'mIoU': (1 / 2 + 2 / 3 + 0 + 1 + 0) / 5, 'aAcc': 4 / 6},
  }


def make_cityscapes(root, preds):
  """leftImg8bit/val/<city>/ + gtFine/val/<city>/ (labelIds; lindau has only mmseg's labelTrainIds)."""
  a, b = 'frankfurt_000000_000294', 'lindau_000000_000019'
  _image(os.path.join(root, 'leftImg8bit', 'val', 'frankfurt', a + '_leftImg8bit.png'), (2, 4))
  _image(os.path.join(root, 'leftImg8bit', 'val', 'lindau', b + '_leftImg8bit.png'), (1, 2))
  _grey(os.path.join(root, 'gtFine', 'val', 'frankfurt', a + '_gtFine_color.png'), [[1]])   # not a label
  # labelIds -> trainIds: [[road, sidewalk, ign (unlabeled), car], [car, ign (parking), bicycle, road]]
  _grey(os.path.join(root, 'gtFine', 'val', 'frankfurt', a + '_gtFine_labelIds.png'),
        [[7, 8, 0, 26], [26, 9, 33, 7]])
  _grey(os.path.join(root, 'gtFine', 'val', 'lindau', b + '_gtFine_labelTrainIds.png'), [[10, 255]])
  _pred(preds, 'cityscapes', a + '_leftImg8bit', [[0, 0, 5, 13], [14, 2, 18, 0]])
  _pred(preds, 'cityscapes', b + '_leftImg8bit', [[10, 3]])
  return {
      # road: gt 2, pred 3, I 2 -> 2/3; sidewalk 0/1; car: gt 2, pred 1, I 1 -> 1/2; truck 0/1; bicycle 1/1;
      # sky 1/1 (lindau). Classes 5, 2, 3 are predicted on ignored pixels only.
      'cityscapes': {'per_class': {'road': 2 / 3, 'sidewalk': 0.0, 'car': 1 / 2, 'truck': 0.0, 'bicycle': 1.0,
                                   'sky': 1.0},
                     'mIoU': (2 / 3 + 0 + 1 / 2 + 0 + 1 + 1) / 6, 'aAcc': 5 / 7},
  }


def make_ade(root, preds):
  """ADEChallengeData2016: 0 is ignored, 1..150 -> 0..149; 151 is outside the classes (counted)."""
  img, ann = os.path.join(root, 'images', 'validation'), os.path.join(root, 'annotations', 'validation')
  _image(os.path.join(img, 'ADE_val_00000001.jpg'), (2, 4))
  _image(os.path.join(img, 'ADE_val_00000003.jpg'), (1, 2))
  with open(os.path.join(img, 'README.txt'), 'w') as f:
    f.write('not an image')
  _grey(os.path.join(ann, 'ADE_val_00000001.png'), [[0, 1, 1, 2], [2, 2, 151, 255]])
  _grey(os.path.join(ann, 'ADE_val_00000003.png'), [[0, 0]])
  _pred(preds, 'ade20k', 'ADE_val_00000001', [[5, 0, 1, 1], [1, 0, 1, 3]])
  _pred(preds, 'ade20k', 'ADE_val_00000003', [[4, 4]])
  return {
      # wall: gt 2, pred 2 ((0,1) (1,1)), I 1 -> 1/3; building: gt 3, pred 4 (the out-of-range pixel counts in
      # the predicted class's area, as mmseg), I 2 -> 2/5.
      'ade20k': {'per_class': {'wall': 1 / 3, 'building': 2 / 5}, 'mIoU': (1 / 3 + 2 / 5) / 2, 'aAcc': 3 / 5},
  }


def make_all(root, preds) -> dict:
  """The eight benchmarks under `root` in mmseg's data/ layout; predictions under preds/<benchmark>/."""
  expected = {}
  expected.update(make_voc(os.path.join(root, 'VOCdevkit', 'VOC2012'), preds))
  expected.update(make_context(os.path.join(root, 'VOCdevkit', 'VOC2010'), preds))
  expected.update(make_coco(os.path.join(root, 'coco_stuff164k'), preds))
  expected.update(make_cityscapes(os.path.join(root, 'cityscapes'), preds))
  expected.update(make_ade(os.path.join(root, 'ade', 'ADEChallengeData2016'), preds))
  return expected


# ------------------------------------------------------------------------------------------------------------
# Each reader: file names, label encodings, exact IoUs through `evaluate --predictions`.
# ------------------------------------------------------------------------------------------------------------

def test_voc_and_voc20(tmp_path):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  expected = make_voc(root, preds)
  ds = E.load_dataset('voc20', root)
  assert ds.class_names == E.VOC20_CLASSES and not ds.with_background and ds.bg_threshold is None
  assert [s.name for s in ds.samples] == ['2007_000033', '2007_000042']
  assert ds.samples[0].label_path == os.path.join(root, 'SegmentationClass', '2007_000033.png')
  np.testing.assert_array_equal(E.read_labels(ds.samples[0]), [[255, 0, 0, 255], [14, 14, 255, 19]])
  for bench in ('voc', 'voc20'):
    r = _score(tmp_path, bench, root, preds)
    _check(r, expected[bench])
    assert r['num_images'] == 2 and r['num_classes'] == (21 if bench == 'voc' else 20)
  assert r['protocol'] == dict(E.PROTOCOL) and r['background_threshold'] is None
  # Drawn at 3 x 3 pixels per cell, every IoU stays the same.
  big, big_preds = str(tmp_path / 'big' / 'VOC2012'), str(tmp_path / 'big' / 'preds')
  assert _scaled(make_voc, big, big_preds, 3) == expected
  assert E.read_label_png(os.path.join(big, 'SegmentationClass', '2007_000033.png')).shape == (6, 12)
  for bench in ('voc', 'voc20'):
    _check(_score(tmp_path / 'big', bench, big, big_preds), expected[bench])


def test_context_and_context59(tmp_path):
  root, preds = str(tmp_path / 'VOC2010'), str(tmp_path / 'preds')
  expected = make_context(root, preds)
  ds = E.load_dataset('context59', root)
  assert len(ds.class_names) == 59 and ds.class_names[0] == 'aeroplane' and ds.class_names[-1] == 'wood'
  np.testing.assert_array_equal(E.read_labels(ds.samples[0]), [[255, 58, 58], [0, 255, 255]])
  assert E.load_dataset('context', root).protocol['bg_threshold'] == 0.35
  for bench in ('context', 'context59'):
    _check(_score(tmp_path, bench, root, preds), expected[bench])


def test_coco_object_and_coco_stuff_both_encodings(tmp_path):
  root, preds = str(tmp_path / 'coco_stuff164k'), str(tmp_path / 'preds')
  expected = make_coco(root, preds)
  ds = E.load_dataset('coco_stuff', root)
  assert len(ds.class_names) == 171 and not ds.with_background
  assert [(s.name, os.path.basename(s.label_path), s.encoding) for s in ds.samples] == [
      ('000000000139', '000000000139_labelTrainIds.png', 'index'),
      ('000000000285', '000000000285.png', 'coco_stuff_raw')]
  np.testing.assert_array_equal(E.read_labels(ds.samples[1]), [[0, 80, 170], [-1, 255, 11]])
  _check(_score(tmp_path, 'coco_object', root, preds), expected['coco_object'])
  r = _score(tmp_path, 'coco_stuff', root, preds)
  _check(r, expected['coco_stuff'])
  assert r['out_of_range_labels']['pixels'] == 1 and r['out_of_range_labels']['values'] == [-1]


def test_coco_stuff_raw_ids_follow_mmseg_and_coco_object():
  """182 raw ids -> 171 classes: spot values of mmseg's clsID_to_trID, and the thing ids of coco_object.py."""
  from ovseg_jax.data import coco_object
  lut = E.LABEL_ENCODINGS['coco_stuff_raw']
  for raw, cls in {0: 0, 10: 10, 12: 11, 24: 23, 26: 24, 27: 25, 30: 26, 45: 40, 66: 60, 69: 61, 71: 62,
                   81: 72, 83: 73, 89: 79, 91: 80, 181: 170, 255: 255}.items():
    assert lut[raw] == cls, raw
  assert all(lut[i] == -1 for i in (*E.COCO_STUFF_UNUSED_IDS, 182, 200, 254))
  assert E.COCO_STUFF_RAW_IDS[:80] == tuple(c - 1 for c in coco_object.COCO_THING_IDS)
  assert E.COCO_STUFF_CLASSES[:80] == E.COCO_OBJECT_CLASSES[1:] and E.COCO_STUFF_CLASSES[80] == 'banner'


def test_cityscapes_label_ids(tmp_path):
  root, preds = str(tmp_path / 'cityscapes'), str(tmp_path / 'preds')
  expected = make_cityscapes(root, preds)
  ds = E.load_dataset('cityscapes', root)
  assert [s.name for s in ds.samples] == ['frankfurt_000000_000294_leftImg8bit', 'lindau_000000_000019_leftImg8bit']
  assert [s.encoding for s in ds.samples] == ['cityscapes_ids', 'index']
  np.testing.assert_array_equal(E.read_labels(ds.samples[0]), [[0, 1, 255, 13], [13, 255, 18, 0]])
  lut = E.LABEL_ENCODINGS['cityscapes_ids']
  assert [int(lut[i]) for i in range(34)].count(255) == 34 - 19
  assert [int(lut[i]) for i in E.CITYSCAPES_LABEL_IDS] == list(range(19))
  _check(_score(tmp_path, 'cityscapes', root, preds), expected['cityscapes'])


def test_ade20k_zero_is_ignored_and_151_is_counted(tmp_path, capsys):
  root, preds = str(tmp_path / 'ADEChallengeData2016'), str(tmp_path / 'preds')
  expected = make_ade(root, preds)
  _image(os.path.join(root, 'images', 'validation', 'ADE_val_00000002.jpg'))   # no annotation
  capsys.readouterr()
  r = _score(tmp_path, 'ade20k', root, preds)
  _check(r, expected['ade20k'])
  assert r['num_images'] == 2 and r['skipped_images'] == {'no label file': 1}
  assert r['out_of_range_labels'] == {'pixels': 1, 'images': 1, 'values': [150],
                                      'first_file': os.path.join(root, 'annotations', 'validation',
                                                                 'ADE_val_00000001.png')}
  err = capsys.readouterr().err
  assert 'warning: ade20k: skipped 1 of 3 images: 1 no label file (first: ' in err
  assert 'ADE_val_00000002.png)' in err
  assert ('warning: ade20k: 1 label files hold 1 pixels with values outside 0..149 and not 255 '
          f'(first: {r["out_of_range_labels"]["first_file"]}; values [150]') in err
  assert 'bed' in r['per_class'] and len(r['per_class']) == 150


# ------------------------------------------------------------------------------------------------------------
# --suite: the paper table.
# ------------------------------------------------------------------------------------------------------------

def test_suite_all_prints_and_writes_the_paper_table(tmp_path, capsys):
  root, preds = str(tmp_path / 'data'), str(tmp_path / 'preds')
  expected = make_all(root, preds)
  out = str(tmp_path / 'table.json')
  assert _run('--predictions', preds, '--suite', 'all', '--data_root', root, '--output', out,
              '--model_name', 'planted') == 0
  table = json.load(open(out))
  titles = ['VOC', 'VOC20', 'Context', 'Context59', 'COCO-Object', 'COCO-Stuff', 'Cityscapes', 'ADE20K']
  assert table['columns'] == ['model', *titles, 'Avg'] and table['average_over'] == titles
  row = table['rows'][0]
  miou = [100 * expected[n]['mIoU'] for n in E.SUITE]
  assert row['model'] == 'planted'
  for title, value in zip(titles, miou):
    assert row[title] == pytest.approx(value, abs=1e-3), title
  assert row['Avg'] == pytest.approx(np.mean(miou), abs=1e-3)
  assert table['details']['ade20k']['per_class']['wall']['IoU'] == pytest.approx(100 / 3, abs=1e-3)
  assert all(b['status'] == 'evaluated' for b in table['benchmarks'].values())
  assert table['benchmarks']['VOC']['data_dir'] == os.path.join(root, 'VOCdevkit', 'VOC2012')
  # The markdown table: printed and written next to the JSON, one decimal per cell.
  cells = ' | '.join(f'{v:.1f}' for v in miou + [float(np.mean(miou))])
  line = f'| planted | {cells} |'
  assert line == '| planted | 62.5 | 45.8 | 66.7 | 33.3 | 50.0 | 43.3 | 52.8 | 36.7 | 48.9 |'
  md = open(str(tmp_path / 'table.md')).read()
  assert md.splitlines()[0] == '| Model | ' + ' | '.join(titles) + ' | Avg |'
  assert md.splitlines()[2] == line and 'Avg over all 8 benchmarks.' in md
  captured = capsys.readouterr()
  assert line in captured.out and f'wrote {out} and {tmp_path / "table.md"}' in captured.out
  assert 'suite 8/8 ade20k' in captured.err and 'skip ' not in captured.err
  assert 'voc (VOC): mIoU 62.5 over 2 images' in captured.err


def test_suite_skips_absent_benchmarks_with_one_line_each(tmp_path, capsys):
  root, preds = str(tmp_path / 'data'), str(tmp_path / 'preds')
  expected = make_voc(os.path.join(root, 'VOCdevkit', 'VOC2012'), preds)
  make_ade(os.path.join(root, 'ADEChallengeData2016'), preds)          # the second folder name ADE20K may use
  os.makedirs(os.path.join(root, 'cityscapes'))                        # there, but empty
  os.makedirs(os.path.join(preds, 'coco_object'))
  out = str(tmp_path / 't.json')
  assert _run('--predictions', preds, '--suite', 'voc, voc20,ade20k,cityscapes,context', '--data_root', root,
              '--output', out) == 0
  err = capsys.readouterr().err
  skips = [line for line in err.splitlines() if line.startswith('skip ')]
  assert skips == [
      f'skip context (Context): not found (looked for VOCdevkit/VOC2010, VOC2010 under {root})',
      f'skip cityscapes (Cityscapes): expected {os.path.join(root, "cityscapes", "leftImg8bit", "val")} '
      '(data_dir must be the Cityscapes root holding leftImg8bit/ and gtFine/)']
  table = json.load(open(out))
  row = table['rows'][0]
  assert row['model'] == 'preds' and row['Context'] is None and row['COCO-Object'] is None
  assert row['VOC'] == pytest.approx(62.5) and table['average_over'] == ['VOC', 'VOC20', 'ADE20K']
  assert table['benchmarks']['COCO-Object']['status'] == 'not requested'
  assert table['benchmarks']['Cityscapes']['status'] == 'skipped'
  md = open(str(tmp_path / 't.md')).read()
  assert '| preds | 62.5 | 45.8 | - | - | - | - | - | 36.7 | 48.3 |' in md
  assert 'Avg over 3 of 8: VOC, VOC20, ADE20K.' in md
  assert ('Not evaluated: Context (skipped), Context59 (not requested), COCO-Object (not requested), COCO-Stuff '
          '(not requested), Cityscapes (skipped) (the JSON says why).') in md
  assert row['Avg'] == pytest.approx(100 * np.mean([expected['voc']['mIoU'], expected['voc20']['mIoU'],
                                                    (1 / 3 + 2 / 5) / 2]), abs=1e-3)
  # Nothing there at all: one error line.
  empty = tmp_path / 'empty'
  empty.mkdir()
  assert _run('--predictions', preds, '--suite', 'all', '--data_root', empty, '--output', out) == 2
  err = capsys.readouterr().err.splitlines()
  assert len([line for line in err if line.startswith('skip ')]) == 8
  assert err[-1].startswith(f'error: no benchmark of --suite found under {empty}')


def test_suite_missing_prediction_folder_and_a_failing_benchmark(tmp_path, capsys):
  root, preds = str(tmp_path / 'data'), str(tmp_path / 'preds')
  make_voc(os.path.join(root, 'VOCdevkit', 'VOC2012'), preds)
  make_ade(os.path.join(root, 'ade', 'ADEChallengeData2016'), preds)
  os.remove(os.path.join(preds, 'voc20', '2007_000042.png'))
  out = str(tmp_path / 't.json')
  assert _run('--predictions', preds, '--suite', 'voc,voc20,ade20k,context', '--data_root', root,
              '--output', out) == 1
  err = capsys.readouterr().err
  missing = os.path.join(preds, 'voc20', '2007_000042.png')
  assert f"error: voc20 (VOC20) failed: expected {missing} (a label PNG named after the image file's stem)" in err
  assert err.strip().splitlines()[-1] == ('error: 1 benchmark(s) failed (voc20); the table holds the others')
  table = json.load(open(out))
  assert table['rows'][0]['VOC20'] is None and table['benchmarks']['VOC20']['status'] == 'failed'
  assert table['average_over'] == ['VOC', 'ADE20K']
  # a requested benchmark that is on disk but has no prediction folder is skipped
  make_context(os.path.join(root, 'VOCdevkit', 'VOC2010'), str(tmp_path / 'elsewhere'))
  assert _run('--predictions', preds, '--suite', 'voc,context', '--data_root', root, '--output', out) == 0
  assert f'skip context (Context): no predictions folder {os.path.join(preds, "context")}' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# Bad inputs (issue 19): one line, or a counted skip; never a silently different number.
# ------------------------------------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines and lines[-1].startswith('error: ') and 'Traceback' not in err, err
  assert sum(line.startswith('error: ') for line in lines) == 1, err
  return lines[-1]


@pytest.mark.parametrize('flags, message', [
    (['--max_images', '0'], 'error: --max_images must be a positive number of images; got 0'),
    (['--max_images=-3'], 'error: --max_images must be a positive number of images; got -3'),
    (['--eval.window=0'], 'error: --eval.window=0: must be a positive whole number'),
    (['--eval.stride=-1'], 'error: --eval.stride=-1: must be a positive whole number'),
    (['--eval.window=64', '--eval.stride=96'], 'error: --eval.stride=96 is larger than --eval.window=64: the '
     'windows would leave pixels unscored (the stride must not exceed the window)'),
    (['--eval.short_side=0'], 'error: --eval.short_side=0: must be a positive whole number'),
])
def test_bad_settings_are_one_line(tmp_path, capsys, flags, message):
  argv = ['--checkpoint', str(tmp_path / 'nothing'), '--dataset', 'voc', '--data_dir', str(tmp_path),
          '--output', str(tmp_path / 'm.json'), *flags]
  assert evaluate.main(argv) == 2
  assert _one_error_line(capsys) == message


@pytest.mark.parametrize('flags, message', [
    (['--suite', 'all', '--dataset', 'voc'], 'error: give --dataset (one benchmark) or --suite (the table), '
     'not both'),
    (['--suite', 'all'], 'error: --data_root is required with --suite (the folder holding VOCdevkit/, ade/, '
     'cityscapes/, ...)'),
    (['--suite', 'voc,ade', '--data_root', 'r'], "error: --suite='voc,ade': unknown benchmark 'ade'; give all or "
     'a comma list of voc,voc20,context,context59,coco_object,coco_stuff,cityscapes,ade20k'),
    (['--suite', 'all', '--data_root', 'r', '--data_dir', 'd'], 'error: --data_dir applies to one --dataset, '
     'not to --suite'),
    (['--dataset', 'voc'], 'error: --data_dir is required with --dataset (python -m ovseg_jax.evaluate --help '
     'lists the flags)'),
    ([], 'error: give --dataset and --data_dir (one benchmark), or --suite and --data_root (the paper table)'),
])
def test_bad_flag_combinations_are_one_line(capsys, flags, message):
  assert evaluate.main(['--predictions', 'p', '--output', 'o.json', *flags]) == 2
  assert _one_error_line(capsys) == message


def test_settings_that_only_clash_after_the_protocol_are_one_error(tmp_path):
  """--eval.window=128 alone is fine, but the benchmark protocol's stride 224 then exceeds it: a UsageError
  before any image is read (not a per-image skip)."""
  from ovseg_jax import errors
  from ovseg_jax import inference
  model = evaluate.Model.__new__(evaluate.Model)
  model._inference, model.meta = inference, {}
  model.saved, model.user = {'short_side': 64, 'window': 64, 'stride': 32, 'window_batch': 2}, {'stride': 16}
  ds = E.EvalDataset('voc', str(tmp_path), E.VOC_CLASSES, [], 0.95, E.BENCHMARKS['voc'].protocol)
  cfg = model.settings(ds)
  # defaults < checkpoint < protocol < --eval: the protocol's geometry, the user's stride, the saved batch
  assert (cfg.short_side, cfg.window, cfg.stride, cfg.window_batch, cfg.bg_threshold) == (448, 448, 16, 2, 0.95)
  assert model.protocol_note(ds) == ('note: the benchmark protocol (docs/evaluation.md) sets short_side=448 '
                                     '(checkpoint: 64), window=448 (checkpoint: 64); --eval.KEY=VALUE keeps the '
                                     "checkpoint's")
  model.user = {'window': 128}
  with pytest.raises(errors.UsageError, match=r'^voc: eval setting stride=224 is larger than eval setting '
                     r'window=128'):
    model.settings(ds)
  folder = E.EvalDataset('folder', str(tmp_path), ('background', 'a'), [])
  model.user = {}
  assert model.settings(folder).short_side == 64 and model.protocol_note(folder) is None


def test_selection_split_warning(tmp_path):
  model = evaluate.Model.__new__(evaluate.Model)
  voc = E.EvalDataset('voc', str(tmp_path / 'VOC2012'), E.VOC_CLASSES, [])
  folder = E.EvalDataset('folder', str(tmp_path / 'synth'), ('background', 'a'), [])
  model.meta = {'selection': {'dataset': 'voc', 'data_dir': '/elsewhere/VOC2012'}}
  assert model.selection_warning(voc) == (
      'warning: voc: the checkpoint was selected on the images this benchmark scores (meta.json selection: '
      '{"dataset": "voc", "data_dir": "/elsewhere/VOC2012"}), so its VOC score is not a held-out result')
  voc20 = E.EvalDataset('voc20', voc.root, E.VOC20_CLASSES, [])
  assert 'so its VOC20 score is not a held-out result' in model.selection_warning(voc20)   # VOC's images
  assert model.selection_warning(E.EvalDataset('context59', 'c', E.CONTEXT59_CLASSES, [])) is None
  assert model.selection_warning(folder) is None
  model.meta = {'selection': {'dataset': 'folder', 'data_dir': str(tmp_path / 'synth' / '.')}}
  assert 'warning: folder: the checkpoint was selected on the images' in model.selection_warning(folder)
  model.meta = {'selection': 'voc'}
  assert model.selection_warning(voc) is not None
  model.meta = {}
  assert model.selection_warning(voc) is None


def test_repeated_split_line_is_scored_once(tmp_path, capsys):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  expected = make_voc(root, preds)
  split = os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt')
  with open(split, 'w') as f:
    f.write('2007_000033\n2007_000042\n2007_000033\n2007_000033 extra-column\n')
  r = _score(tmp_path, 'voc', root, preds)
  assert r['num_images'] == 2 and r['mIoU'] == pytest.approx(100 * expected['voc']['mIoU'], abs=1e-3)
  warning = (f'warning: {split} lists 1 image name(s) more than once (2 extra line(s), first: 2007_000033); '
             'each image is scored once')
  assert warning in capsys.readouterr().err.splitlines() and r['warnings'] == [warning[len('warning: '):]]


def test_benchmark_folder_with_its_own_class_names_warns(tmp_path, capsys):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  make_voc(root, preds)
  with open(os.path.join(root, 'class_names.txt'), 'w') as f:
    f.write('background\ncircle\nsquare\nstar\n')
  r = _score(tmp_path, 'voc', root, preds)
  assert r['num_classes'] == 21
  assert (f'warning: {root}/class_names.txt lists 4 class names (background, circle, square, ...) but --dataset '
          'voc scores its own 21 classes; the file is not used (--dataset folder or --class_names FILE use it)'
          ) in capsys.readouterr().err.splitlines()
  with open(os.path.join(root, 'class_names.txt'), 'w') as f:
    f.write('\n'.join(E.VOC_CLASSES))
  _score(tmp_path, 'voc', root, preds)
  assert 'class_names.txt' not in capsys.readouterr().err


def test_unreadable_and_missing_label_files_are_counted_skips(tmp_path, capsys):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  make_voc(root, preds)
  _image(os.path.join(root, 'JPEGImages', '2007_000099.jpg'))
  _image(os.path.join(root, 'JPEGImages', '2007_000123.jpg'))
  with open(os.path.join(root, 'SegmentationClass', '2007_000099.png'), 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n not really')
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt'), 'a') as f:
    f.write('2007_000099\n2007_000123\n')
  r = _score(tmp_path, 'voc', root, preds)
  assert r['num_images'] == 2 and r['skipped_images'] == {'label unreadable': 1, 'no label file': 1}
  err = capsys.readouterr().err
  line = next(line for line in err.splitlines() if 'skipped' in line)
  assert line.startswith('warning: voc: skipped 2 of 4 images: 1 label unreadable (first: ')
  assert '2007_000099.png' in line and f'1 no label file (first: {root}/SegmentationClass/2007_000123.png)' in line
  # every label missing: one error naming the first one
  assert _run('--predictions', preds, '--dataset', 'ade20k', '--data_dir', tmp_path / 'none', '--output',
              tmp_path / 'x.json') == 2
  assert _one_error_line(capsys) == f'error: expected {tmp_path / "none"}'


def test_bad_predictions_are_errors_naming_the_file(tmp_path, capsys):
  root, preds = str(tmp_path / 'ADEChallengeData2016'), str(tmp_path / 'preds')
  make_ade(root, preds)
  bad = os.path.join(preds, 'ade20k', 'ADE_val_00000003.png')
  E.write_label_png(bad, [[150, 0]])
  argv = ['--predictions', os.path.join(preds, 'ade20k'), '--dataset', 'ade20k', '--data_dir', root,
          '--output', tmp_path / 'm.json']
  assert _run(*argv) == 2
  assert _one_error_line(capsys) == f'error: {bad} holds class 150, outside the 150 classes of ade20k (0..149)'
  E.write_label_png(bad, [[1, 0, 0]])
  assert _run(*argv) == 2
  label = os.path.join(root, 'annotations', 'validation', 'ADE_val_00000003.png')
  assert _one_error_line(capsys) == f'error: {bad} is 1x3 but {label} is 1x2'
  os.remove(bad)
  assert _run(*argv) == 2
  assert _one_error_line(capsys) == f"error: expected {bad} (a label PNG named after the image file's stem)"
  assert not os.path.exists(tmp_path / 'm.json')


def test_save_predictions_never_overwrites_the_dataset(tmp_path, capsys):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  make_voc(root, preds)
  label_dir = os.path.join(root, 'SegmentationClass')
  before = open(os.path.join(label_dir, '2007_000033.png'), 'rb').read()
  assert _run('--predictions', os.path.join(preds, 'voc'), '--dataset', 'voc', '--data_dir', root, '--output',
              tmp_path / 'm.json', '--save_predictions', label_dir) == 2
  assert _one_error_line(capsys) == (f'error: --save_predictions {label_dir} would overwrite '
                                     f'{label_dir}/2007_000033.png, a file of the voc dataset; give another folder')
  assert open(os.path.join(label_dir, '2007_000033.png'), 'rb').read() == before


def test_unreadable_split_lists_and_folders_are_one_line(tmp_path, capsys):
  root, preds = str(tmp_path / 'VOC2012'), str(tmp_path / 'preds')
  make_voc(root, preds)
  split = os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt')
  with open(split, 'wb') as f:
    f.write(b'\xff\xfe\x00binary')
  argv = ['--predictions', os.path.join(preds, 'voc'), '--dataset', 'voc', '--data_dir', root, '--output',
          tmp_path / 'm.json']
  assert _run(*argv) == 2
  assert _one_error_line(capsys) == f'error: {split} is not a UTF-8 text file'
  os.remove(split)
  os.makedirs(split)
  assert _run(*argv) == 2
  assert _one_error_line(capsys) == f'error: {split} is a folder, not a text file'
  ade = tmp_path / 'ADEChallengeData2016'
  (ade / 'images').mkdir(parents=True)
  (ade / 'images' / 'validation').write_text('a file where a folder belongs')
  (ade / 'annotations' / 'validation').mkdir(parents=True)
  assert _run('--predictions', preds, '--dataset', 'ade20k', '--data_dir', ade, '--output', tmp_path / 'a.json') == 2
  assert _one_error_line(capsys) == f'error: expected a folder at {ade / "images" / "validation"}, not a file'


def test_find_benchmark_prefers_the_folder_holding_it(tmp_path):
  root = str(tmp_path)
  os.makedirs(os.path.join(root, 'coco', 'annotations', 'val2017_cocoobject'))
  os.makedirs(os.path.join(root, 'coco_stuff164k', 'annotations', 'val2017'))
  assert E.find_benchmark('coco_object', root)[0] == os.path.join(root, 'coco')
  assert E.find_benchmark('coco_stuff', root)[0] == os.path.join(root, 'coco_stuff164k')
  assert E.find_benchmark('ade20k', root) == (None, [os.path.join(root, 'ade', 'ADEChallengeData2016'),
                                                     os.path.join(root, 'ADEChallengeData2016')])
  os.makedirs(os.path.join(root, 'VOC2012'))
  assert E.find_benchmark('voc20', root)[0] == os.path.join(root, 'VOC2012')   # there, though incomplete


def test_class_lists_and_protocol():
  sizes = {'voc': 21, 'voc20': 20, 'context': 60, 'context59': 59, 'coco_object': 81, 'coco_stuff': 171,
           'cityscapes': 19, 'ade20k': 150}
  for name, n in sizes.items():
    b = E.BENCHMARKS[name]
    assert len(b.class_names) == len(set(b.class_names)) == n, name
    assert (b.class_names[0] == 'background') == (b.bg_threshold is not None), name
    assert all(c == c.strip() and c for c in b.class_names), name
    assert b.protocol['short_side'] == 448 and b.protocol['window'] == 448 and b.protocol['stride'] == 224
  assert E.SUITE == tuple(sizes) and E.DATASETS[-1] == 'folder'
  assert E.BG_THRESHOLDS == {'voc': 0.95, 'context': 0.35, 'coco_object': 0.9}
  assert E.CONTEXT59_CLASSES == tuple('aeroplane' if c == 'airplane' else 'pottedplant' if c == 'plant' else
                                      'tvmonitor' if c == 'monitor' else c for c in E.CONTEXT_CLASSES[1:])
  assert E.VOC20_CLASSES == tuple({'table': 'diningtable', 'plant': 'pottedplant', 'monitor': 'tvmonitor'}
                                  .get(c, c) for c in E.VOC_CLASSES[1:])


# ------------------------------------------------------------------------------------------------------------
# A model through the suite (tiny random checkpoint): settings, selection warning, saved predictions.
# ------------------------------------------------------------------------------------------------------------

def _random_variables(model_config) -> dict:
  """Random variables of the right shapes without running (and compiling) model.init."""
  import jax
  from ovseg_jax import inference
  rng = np.random.default_rng(0)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: (np.abs(rng.normal(1.0, 0.1, x.shape)) if 'var' in jax.tree_util.keystr(p) or
                    'scale' in jax.tree_util.keystr(p) else rng.normal(0.0, 0.05, x.shape)).astype(x.dtype),
      inference.abstract_variables(model_config))


def test_suite_with_a_checkpoint_round_trips_through_saved_predictions(tmp_path, capsys):
  from ovseg_jax import checkpoint
  from tests import seg_fixtures
  root, unused = str(tmp_path / 'data'), str(tmp_path / 'unused')
  _scaled(make_voc, os.path.join(root, 'VOCdevkit', 'VOC2012'), unused, 8)   # the tiny model's patch is 8 px
  _scaled(make_ade, os.path.join(root, 'ade', 'ADEChallengeData2016'), unused, 8)
  mc = seg_fixtures.tiny_model_config()
  ckpt = checkpoint.save_inference(str(tmp_path / 'tiny'), mc, _random_variables(mc), {
      'eval': {'short_side': 64, 'window': 64, 'stride': 32},
      'selection': {'dataset': 'voc', 'data_dir': os.path.join(root, 'VOCdevkit', 'VOC2012')}})
  out, saved = str(tmp_path / 'tiny.json'), str(tmp_path / 'saved')
  geometry = ['--eval.short_side=64', '--eval.window=64', '--eval.stride=32', '--eval.window_batch=1']
  assert _run('--checkpoint', ckpt, '--suite', 'voc,ade20k', '--data_root', root, '--output', out,
              '--save_predictions', saved, *geometry) == 0
  err = capsys.readouterr().err
  assert ('warning: voc: the checkpoint was selected on the images this benchmark scores (meta.json selection: '
          f'{{"dataset": "voc", "data_dir": "{os.path.join(root, "VOCdevkit", "VOC2012")}"}}), so its VOC score is '
          'not a held-out result') in err
  assert 'note: the benchmark protocol' not in err          # --eval.KEY=VALUE kept the tiny geometry
  table = json.load(open(out))
  voc, ade = table['details']['voc'], table['details']['ade20k']
  assert voc['selected_on_this_split'] and 'selected_on_this_split' not in ade
  assert voc['background_threshold'] == 0.95 and ade['background_threshold'] is None
  assert voc['eval_config']['short_side'] == 64 and voc['eval_config']['templates'] == 'simple'
  assert ade['num_classes'] == 150 and table['rows'][0]['model'] == 'tiny'
  assert sorted(os.listdir(os.path.join(saved, 'ade20k'))) == ['ADE_val_00000001.png', 'ADE_val_00000003.png']
  # The saved predictions (PRED_ROOT/<benchmark>/<stem>.png) score the same.
  out2 = str(tmp_path / 'again.json')
  assert _run('--predictions', saved, '--suite', 'voc,ade20k', '--data_root', root, '--output', out2) == 0
  again = json.load(open(out2))
  for title in ('VOC', 'ADE20K', 'Avg'):
    assert again['rows'][0][title] == table['rows'][0][title], title
