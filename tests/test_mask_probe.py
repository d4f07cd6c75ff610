"""Mask probing (mask_probe.py) on cases worked out by hand, through the functions and through the CLI."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from ovseg_jax import eval_datasets
from ovseg_jax import inference
from ovseg_jax import mask_probe
from tests import seg_fixtures

# Image "a": objects 1 (4 px, top right) and 2 (6 px; 2 more pixels of its rows are ignore), background 4 px.
GT_A = np.array([[0, 0, 1, 1],
                 [0, 0, 1, 1],
                 [2, 2, 2, 255],
                 [2, 2, 2, 255]], np.uint8)
# Groups of "a": group 0 = the top half, group 1 = the bottom half.
#   object 1: J(g0) = 4 / 8 = 0.5, J(g1) = 0          -> 0.5
#   object 2: J(g1) = 6 / 6 = 1 (the 2 ignore pixels count in neither), J(g0) = 0  -> 1.0
#   probe(a) = (0.5 + 1.0) / 2 = 0.75;  with the background as an object: J(g0, bg) = 4 / 8 -> (0.5 + 0.5 + 1) / 3
AFF_A = np.stack([np.repeat([[1.0], [1.0], [0.0], [0.0]], 4, 1), np.repeat([[0.0], [0.0], [1.0], [1.0]], 4, 1)])
# Image "b": object 3 = column 0; group 0 = columns 0-1 (soft: 0.7), group 1 = columns 2-3.
#   object 3: J(g0) = 4 / 8 = 0.5 -> probe(b) = 0.5
GT_B = np.zeros((4, 4), np.uint8)
GT_B[:, 0] = 3
AFF_B = np.stack([np.tile([0.7, 0.7, 0.2, 0.1], (4, 1)), np.tile([0.3, 0.3, 0.8, 0.9], (4, 1))])
# Image "c": background only -> no object, not counted.
GT_C = np.zeros((4, 4), np.uint8)
AFF_C = AFF_A
# Mask probe = 100 * mean(0.75, 0.5) = 62.5; over all 3 objects alike: 100 * (0.5 + 1 + 0.5) / 3.
EXPECTED = 62.5


def test_binarize_by_hand():
  np.testing.assert_array_equal(mask_probe.binarize(AFF_B)[0], np.tile([1, 1, 0, 0], (4, 1)).astype(bool))
  # ties go to the lowest group
  np.testing.assert_array_equal(mask_probe.binarize(np.ones((3, 1, 2)))[:, 0, 0], [True, False, False])
  # DINO's mass rule: values 1, 2, 3, 4 (sum 10); 60 % of the mass is held by {4, 3} (7 / 10 >= 6 / 10,
  # while {4} alone holds 4 / 10)
  m = mask_probe.binarize(np.array([[[3.0, 1.0, 4.0, 2.0]]]), 'mass', 0.6)
  np.testing.assert_array_equal(m[0, 0], [True, False, True, False])
  with pytest.raises(ValueError, match='binarize mode'):
    mask_probe.binarize(AFF_A, 'top')


def test_probe_by_hand():
  assert mask_probe.probe_image(mask_probe.binarize(AFF_A), GT_A) == {1: 0.5, 2: 1.0}
  assert mask_probe.probe_image(mask_probe.binarize(AFF_A), GT_A, background=None) == {0: 0.5, 1: 0.5, 2: 1.0}
  assert mask_probe.probe_image(mask_probe.binarize(AFF_B), GT_B) == {3: 0.5}
  assert mask_probe.probe_image(mask_probe.binarize(AFF_C), GT_C) == {}
  probe = mask_probe.MaskProbe(('background', 'one', 'two', 'three'))
  for aff, gt in ((AFF_A, GT_A), (AFF_B, GT_B), (AFF_C, GT_C)):
    probe.update(mask_probe.probe_image(mask_probe.binarize(aff), gt))
  res = probe.compute()
  assert res['mask_probe'] == pytest.approx(EXPECTED)
  assert res['num_images'] == 2 and res['num_objects'] == 3
  assert res['object_mean'] == pytest.approx(100 * 2 / 3)
  assert res['per_class'] == {'one': {'mean_best_jaccard': 50.0, 'objects': 1},
                              'two': {'mean_best_jaccard': 100.0, 'objects': 1},
                              'three': {'mean_best_jaccard': 50.0, 'objects': 1}}


def _write_folder(root):
  """A VOC-layout folder of images a, b, c (4 x 4; image i is filled with 40 * (i + 1))."""
  os.makedirs(os.path.join(root, 'JPEGImages'))
  os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'))
  for i, (name, gt) in enumerate((('a', GT_A), ('b', GT_B), ('c', GT_C))):
    Image.fromarray(np.full((4, 4, 3), 40 * (i + 1), np.uint8)).save(os.path.join(root, 'JPEGImages', name + '.jpg'))
    eval_datasets.write_label_png(os.path.join(root, 'SegmentationClass', name + '.png'), gt)
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt'), 'w') as f:
    f.write('a\nb\nc\n')
  with open(os.path.join(root, 'class_names.txt'), 'w') as f:
    f.write('background\none\ntwo\nthree\n')


def test_cli_on_a_folder_with_known_group_maps(tmp_path, monkeypatch):
  """The whole CLI path (dataset, labels, averaging, JSON) with the model's maps replaced by the hand cases."""
  root = str(tmp_path / 'val')
  _write_folder(root)
  by_fill = {40: AFF_A, 80: AFF_B, 120: AFF_C}
  monkeypatch.setattr(mask_probe, 'group_affinity',
                      lambda seg, image: by_fill[int(round(image.mean() / 40)) * 40])
  out = str(tmp_path / 'probe.json')
  ckpt = seg_fixtures.shared_tiny_checkpoint()
  assert mask_probe.main(['--checkpoint', ckpt, '--dataset', 'folder', '--data_dir', root, '--output', out]) == 0
  with open(out) as f:
    res = json.load(f)
  assert res['mask_probe'] == pytest.approx(EXPECTED)
  assert res['num_images'] == 2 and res['binarize'] == 'argmax' and res['include_background'] is False
  assert mask_probe.main(['--checkpoint', ckpt, '--dataset', 'folder', '--data_dir', root, '--output', out,
                          '--include_background']) == 0
  with open(out) as f:
    res = json.load(f)
  # a: (0.5 + 0.5 + 1) / 3; b: bg = columns 1-3 (12 px), best J = g1 (8 px, all bg) -> 8 / 12, obj 3 -> 0.5;
  # c: bg = everything, best J = 8 / 16
  assert res['mask_probe'] == pytest.approx(100 * np.mean([2 / 3, (8 / 12 + 0.5) / 2, 0.5]))
  assert mask_probe.main(['--checkpoint', ckpt, '--dataset', 'folder', '--output', out]) == 2   # no data_dir


def test_real_model_maps(tmp_path):
  """The model path: soft group maps of the whole image, resized to the label size, scored in [0, 100]."""
  root = str(tmp_path / 'voc')
  seg_fixtures.write_voc_folder(root, ['x', 'y'], [(40, 56), (48, 40)], ['background', 'cat', 'dog'])
  seg = inference.Segmenter.from_checkpoint(seg_fixtures.shared_tiny_checkpoint(), **seg_fixtures.TINY_EVAL)
  image = eval_datasets.read_image(os.path.join(root, 'JPEGImages', 'x.jpg'))
  a = mask_probe.group_affinity(seg, image)
  k = seg.model_config.binding.num_output_groups
  assert a.shape == (k, 40, 56)
  np.testing.assert_allclose(a.sum(0), 1.0, atol=1e-4)        # a soft assignment over the K groups
  # the network input: short side 64, each side a multiple of 16 (2 patches of 8)
  assert mask_probe.network_size(40, 56, 64, 2048, 16) == (64, 96)          # 64 x 89.6 -> 64 x 96
  assert mask_probe.network_size(48, 40, 64, 2048, 16) == (80, 64)          # 76.8 x 64 -> 80 x 64
  ds = eval_datasets.load_dataset('folder', root)
  for mode in ('argmax', 'mass'):
    res = mask_probe.probe_dataset(seg, ds, mode=mode)
    assert res['num_images'] == 2 and 0.0 < res['mask_probe'] <= 100.0
