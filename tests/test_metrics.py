"""mIoU / aAcc against an independent computation written from the definitions."""

import numpy as np
import pytest

from ovseg_jax import metrics


def _oracle(pairs, num_classes, ignore=255):
  """IoU_c = sum |P=c & G=c| / sum |(P=c | G=c)| over non-ignored pixels, accumulated over all images."""
  inter = np.zeros(num_classes)
  union = np.zeros(num_classes)
  correct, labelled = 0, 0
  for pred, gt in pairs:
    valid = gt != ignore
    for c in range(num_classes):
      inter[c] += np.sum((pred == c) & (gt == c) & valid)
      union[c] += np.sum(((pred == c) | (gt == c)) & valid)
    in_range = valid & (gt < num_classes)
    correct += np.sum((pred == gt) & in_range)
    labelled += np.sum(in_range)
  present = union > 0
  return inter, union, float(np.mean(inter[present] / union[present])), correct / labelled


def test_miou_matches_definition_with_ignore_pixels():
  rng = np.random.default_rng(0)
  num_classes = 7
  pairs = []
  for shape in [(13, 17), (20, 9), (5, 31)]:
    gt = rng.integers(0, num_classes - 1, shape)  # class 6 never in the ground truth ...
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, num_classes - 2, shape))  # ... nor predicted
    gt[rng.random(shape) < 0.15] = 255
    pairs.append((pred, gt))
  m = metrics.SegmentationMetric(num_classes)
  for pred, gt in pairs:
    m.update(pred, gt)
  s = m.compute()
  inter, union, miou, aacc = _oracle(pairs, num_classes)
  np.testing.assert_allclose(s['IoU'][:6], inter[:6] / union[:6], rtol=1e-12)
  assert np.isnan(s['IoU'][6])              # absent everywhere -> left out of the mean
  assert s['mIoU'] == pytest.approx(miou, rel=1e-12)
  assert s['aAcc'] == pytest.approx(aacc, rel=1e-12)
  assert m.num_images == 3


def test_accumulates_over_dataset_not_per_image_mean():
  # image 1: class 1 IoU 1/2 on 2 pixels; image 2: class 1 IoU 1 on 8 pixels -> dataset IoU 9/10, not 3/4
  pred1, gt1 = np.array([[1, 1]]), np.array([[1, 0]])
  pred2, gt2 = np.ones((1, 8), int), np.ones((1, 8), int)
  m = metrics.SegmentationMetric(2)
  m.update(pred1, gt1)
  m.update(pred2, gt2)
  s = m.compute()
  assert s['IoU'][1] == pytest.approx(9 / 10)
  assert s['IoU'][0] == 0.0                  # class 0 in the ground truth, never predicted
  assert s['mIoU'] == pytest.approx(0.45)
  assert s['aAcc'] == pytest.approx(9 / 10)


def test_out_of_range_ground_truth_counts_in_prediction_area_like_mmseg():
  # gt 9 (not ignore, beyond C=3): the pixel's prediction (class 2) still enlarges class 2's union
  pred = np.array([[2, 2]])
  gt = np.array([[2, 9]])
  s = metrics.scores_from_confusion(metrics.confusion_matrix(pred, gt, 3))
  assert s['IoU'][2] == pytest.approx(0.5)
  assert s['aAcc'] == pytest.approx(1.0)


def test_rejects_bad_inputs():
  with pytest.raises(ValueError, match='differ in shape'):
    metrics.confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 3), int), 3)
  with pytest.raises(ValueError, match=r'must lie in \[0, 3\)'):
    metrics.confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), int), 3)
