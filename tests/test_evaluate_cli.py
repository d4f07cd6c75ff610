"""`python -m ovseg_jax.evaluate`: planted predictions give hand-computed numbers; readers; exact errors."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax import evaluate
from tests import seg_fixtures

CLASSES = ('background', 'circle', 'square')


def _planted(root):
  """Two 20 x 30 images with hand-made ground truth and predictions (numbers worked out in the test)."""
  os.makedirs(os.path.join(root, 'JPEGImages'))
  os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'))
  gt_a = np.zeros((20, 30), np.uint8)
  gt_a[5:15, 5:15] = 1
  gt_a[0] = 255
  pred_a = np.zeros((20, 30), np.uint8)
  pred_a[5:15, 10:20] = 1                       # half of the square overlaps: I = 50, U = 150
  gt_b = np.zeros((20, 30), np.uint8)
  gt_b[:, 20:] = 2
  gt_b[0] = 255
  pred_b = gt_b.copy()
  pred_b[0] = 1                                 # on ignored pixels: must not count
  pred_b[10:, 20:25] = 0                        # 50 class-2 pixels called background
  for name, gt in (('a', gt_a), ('b', gt_b)):
    Image.fromarray(seg_fixtures.random_image(20, 30)).save(os.path.join(root, 'JPEGImages', name + '.jpg'))
    eval_datasets.write_label_png(os.path.join(root, 'SegmentationClass', name + '.png'), gt)
  for name, pred in (('a', pred_a), ('b', pred_b)):
    eval_datasets.write_label_png(os.path.join(root, 'pred', name + '.png'), pred)
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt'), 'w') as f:
    f.write('a\nb\n')
  with open(os.path.join(root, 'class_names.txt'), 'w') as f:
    f.write('\n'.join(CLASSES) + '\n')


def test_planted_predictions_give_expected_numbers(tmp_path, capsys):
  root = str(tmp_path / 'data')
  _planted(root)
  out = str(tmp_path / 'm.json')
  assert evaluate.main(['--predictions', os.path.join(root, 'pred'), '--dataset', 'folder', '--data_dir', root,
                        '--output', out]) == 0
  r = json.load(open(out))
  # background: I = 420 + 380, gt = 470 + 380, pred = 470 + 430 -> U = 950
  # circle: I = 50, U = 150; square: I = 140, gt 190, pred 140 -> U = 190
  iou = [800 / 950, 50 / 150, 140 / 190]
  for name, v in zip(CLASSES, iou):
    assert r['per_class'][name]['IoU'] == pytest.approx(100 * v, abs=1e-3)
  assert r['mIoU'] == pytest.approx(100 * np.mean(iou), abs=1e-3)
  assert r['aAcc'] == pytest.approx(100 * 990 / 1140, abs=1e-3)
  assert r['per_class']['square']['gt_pixels'] == 190 and r['per_class']['background']['pred_pixels'] == 900
  assert r['num_images'] == 2 and r['num_classes'] == 3
  table = capsys.readouterr().out
  assert 'circle' in table and '33.33' in table and f'{100 * np.mean(iou):.2f}' in table


def test_missing_files_give_exact_errors(tmp_path, capsys):
  root = str(tmp_path / 'VOC2012')
  os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'))
  os.makedirs(os.path.join(root, 'JPEGImages'))
  argv = ['--predictions', str(tmp_path), '--dataset', 'voc', '--data_dir', root, '--output', str(tmp_path / 'm.json')]
  assert evaluate.main(argv) == 2
  split = os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt')
  assert f'error: expected {split}' in capsys.readouterr().err
  with open(split, 'w') as f:
    f.write('2007_000033\n')
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(os.path.join(root, 'JPEGImages', '2007_000033.jpg'))
  assert evaluate.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err == f'error: expected {os.path.join(root, "SegmentationClass", "2007_000033.png")}'
  assert not os.path.exists(tmp_path / 'm.json')

  coco = str(tmp_path / 'coco')
  os.makedirs(os.path.join(coco, 'images', 'val2017'))
  assert evaluate.main(['--predictions', str(tmp_path), '--dataset', 'coco_object', '--data_dir', coco,
                        '--output', str(tmp_path / 'c.json')]) == 2
  assert 'val2017_cocoobject' in capsys.readouterr().err


def test_readers_for_each_layout(tmp_path):
  voc = tmp_path / 'voc'
  seg_fixtures.write_voc_folder(str(voc), ['x1'], [(20, 24)], eval_datasets.VOC_CLASSES[:3])
  ds = eval_datasets.load_dataset('voc', str(voc))
  assert ds.class_names == eval_datasets.VOC_CLASSES and ds.bg_threshold == 0.95 and ds.with_background
  assert ds.foreground_names[:2] == ['aeroplane', 'bicycle']
  ctx = tmp_path / 'ctx'
  (ctx / 'ImageSets' / 'SegmentationContext').mkdir(parents=True)
  (ctx / 'ImageSets' / 'SegmentationContext' / 'val.txt').write_text('2008_000002\n')
  (ctx / 'JPEGImages').mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(ctx / 'JPEGImages' / '2008_000002.jpg')
  eval_datasets.write_label_png(str(ctx / 'SegmentationClassContext' / '2008_000002.png'), np.zeros((8, 8)))
  ds = eval_datasets.load_dataset('context', str(ctx))
  assert len(ds.class_names) == 60 and ds.bg_threshold == 0.35
  coco = tmp_path / 'coco'
  (coco / 'images' / 'val2017').mkdir(parents=True)
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(coco / 'images' / 'val2017' / '000000000139.jpg')
  eval_datasets.write_label_png(str(coco / 'annotations' / 'val2017_cocoobject' /
                                    '000000000139_instanceTrainIds.png'), np.zeros((8, 8)))
  ds = eval_datasets.load_dataset('coco_object', str(coco))
  assert len(ds.class_names) == 81 and ds.bg_threshold == 0.9 and ds.samples[0].name == '000000000139'
  names = tmp_path / 'names.txt'
  names.write_text('sky\npotted plant\n')
  ds = eval_datasets.load_dataset('voc', str(voc), class_names_file=str(names))
  assert ds.class_names == ('sky', 'potted plant') and not ds.with_background


def test_checkpoint_end_to_end_on_synthetic_voc_folder(tmp_path, capsys):
  from ovseg_jax.data import synthetic
  root = str(tmp_path / 'synth')
  synthetic.write_voc(root, 'val', 2, seed=1, min_size=48, max_size=72, log=open(os.devnull, 'w'))
  ckpt = seg_fixtures.shared_tiny_checkpoint()
  out, preds = str(tmp_path / 'm.json'), str(tmp_path / 'preds')
  sets = [f'--eval.{k}={v}' for k, v in seg_fixtures.TINY_EVAL.items() if k != 'window_batch']
  assert evaluate.main(['--checkpoint', ckpt, '--dataset', 'folder', '--data_dir', root, '--output', out,
                        '--save_predictions', preds, '--eval.window_batch', '2', '--background_threshold', '0.5',
                        *sets]) == 0
  r = json.load(open(out))
  assert r['num_images'] == 2 and r['background_threshold'] == 0.5
  assert r['eval_config']['short_side'] == 64 and r['eval_config']['window_batch'] == 2
  assert 0 <= r['mIoU'] <= 100 and 0 <= r['aAcc'] <= 100
  # Re-scoring the saved predictions gives the same numbers.
  out2 = str(tmp_path / 'm2.json')
  assert evaluate.main(['--predictions', preds, '--dataset', 'folder', '--data_dir', root, '--output', out2]) == 0
  r2 = json.load(open(out2))
  assert r2['mIoU'] == r['mIoU'] and r2['per_class'] == r['per_class']
  assert 'mIoU' in capsys.readouterr().out
