"""Semantic-segmentation metrics accumulated over a dataset, as mmseg 0.18 computes them (docs/paper_vs_authors.md Q27).

IoU_c = sum_images |pred == c and gt == c| / sum_images |pred == c or gt == c| over the pixels whose ground
truth is not the ignore label (255). The sums run over the whole dataset before the division (not a mean of
per-image IoUs). mIoU = nanmean over classes, where a class that appears neither in the ground truth nor in
the predictions (union 0) is NaN and so left out. aAcc = correctly labelled pixels / labelled pixels.

Everything is one confusion matrix `cm[gt, pred]` of shape [C + 1, C]. The extra last row counts pixels whose
ground truth is outside [0, C) but is not the ignore label: mmseg keeps those pixels, so their predictions
still count in the prediction area (and so in the union) of the predicted class.
"""

import numpy as np

IGNORE_LABEL = 255


def confusion_matrix(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Confusion counts of one label map pair.

  Args:
    pred: int [H, W] predicted class per pixel, values in [0, num_classes).
    gt: int [H, W] ground-truth class per pixel; `ignore_label` pixels are skipped.
    num_classes: C.
  Returns:
    int64 [C + 1, C]: row = ground truth (row C = out-of-range ground truth), column = prediction.
  """
  pred = np.asarray(pred)
  gt = np.asarray(gt)
  if pred.shape != gt.shape:
    raise ValueError(f'prediction {pred.shape} and ground truth {gt.shape} differ in shape')
  valid = gt != ignore_label
  p = pred[valid].astype(np.int64)
  g = gt[valid].astype(np.int64)
  if p.size and (p.min() < 0 or p.max() >= num_classes):
    raise ValueError(f'predicted labels must lie in [0, {num_classes}); got [{p.min()}, {p.max()}]')
  g = np.where((g >= 0) & (g < num_classes), g, num_classes)
  counts = np.bincount(g * num_classes + p, minlength=(num_classes + 1) * num_classes)
  return counts.reshape(num_classes + 1, num_classes)


def scores_from_confusion(cm: np.ndarray) -> dict:
  """mIoU / aAcc / mAcc and per-class IoU, Acc from a [C + 1, C] confusion matrix.

  Returns a dict of floats in [0, 1] (NaN for a class with no ground truth and no prediction):
  'mIoU', 'aAcc', 'mAcc', 'IoU' [C] and 'Acc' [C] as numpy arrays, 'area_gt' [C], 'area_pred' [C].
  """
  cm = np.asarray(cm, np.float64)
  num_classes = cm.shape[1]
  intersect = np.diag(cm[:num_classes])
  area_gt = cm[:num_classes].sum(axis=1)
  area_pred = cm.sum(axis=0)
  union = area_gt + area_pred - intersect
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = intersect / union
    acc = intersect / area_gt
    aacc = intersect.sum() / area_gt.sum()
  return {
      'mIoU': float(np.nanmean(iou)) if np.isfinite(iou).any() else float('nan'),
      'mAcc': float(np.nanmean(acc)) if np.isfinite(acc).any() else float('nan'),
      'aAcc': float(aacc),
      'IoU': iou, 'Acc': acc, 'area_gt': area_gt, 'area_pred': area_pred,
  }


class SegmentationMetric:
  """Accumulates the confusion matrix over a dataset.

  Example:
    metric = SegmentationMetric(21)
    for pred, gt in pairs:
      metric.update(pred, gt)       # int [H, W] each
    metric.compute()['mIoU']
  """

  def __init__(self, num_classes: int, ignore_label: int = IGNORE_LABEL):
    self.num_classes = num_classes
    self.ignore_label = ignore_label
    self.cm = np.zeros((num_classes + 1, num_classes), np.int64)
    self.num_images = 0

  def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
    self.cm += confusion_matrix(pred, gt, self.num_classes, self.ignore_label)
    self.num_images += 1

  def compute(self) -> dict:
    return scores_from_confusion(self.cm)
