"""Zero-shot segmentation benchmark: mIoU / aAcc of a checkpoint on VOC, Context, COCO Object or a folder.

  python -m ovseg_jax.evaluate --checkpoint DIR --dataset voc --data_dir VOCdevkit/VOC2012 \
      --output metrics.json [--max_images N] [--class_names FILE] [--background_threshold 0.95] \
      [--templates simple|imagenet80] [--window_batch 4] [--save_predictions DIR]
  python -m ovseg_jax.evaluate --predictions DIR --dataset folder --data_dir D --output metrics.json

The protocol is the authors' (official notes §2, §6): short side 448, 448/224 sliding windows, the single
prompt "a photo of a {}.", the per-dataset background threshold (VOC 0.95, Context 0.35, COCO Object 0.9),
IoU accumulated over the whole split with ignore label 255, mIoU = nanmean over classes. `--predictions`
scores saved label PNGs (<name>.png, channel order of the dataset's class list) instead of running a model;
`--save_predictions` writes such PNGs (VOC palette).

Prints a per-class table to stdout and writes a JSON with every number (percentages, like the paper).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from ovseg_jax import eval_datasets
from ovseg_jax import metrics as metrics_lib


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog='python -m ovseg_jax.evaluate', description=__doc__.split('\n')[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument('--checkpoint', help='inference checkpoint folder (convert official / export)')
  src.add_argument('--predictions', help='folder of predicted label PNGs <name>.png to score instead')
  p.add_argument('--dataset', required=True, choices=eval_datasets.DATASETS)
  p.add_argument('--data_dir', required=True, help='dataset root (VOC2012, VOC2010, COCO root or a folder)')
  p.add_argument('--class_names', help='file with one class name per line (background first) to override')
  p.add_argument('--output', required=True, help='metrics JSON path')
  p.add_argument('--max_images', type=int, default=None, help='evaluate the first N images only')
  p.add_argument('--background_threshold', type=float, default=None,
                 help='default: the dataset\'s (VOC 0.95, Context 0.35, COCO Object 0.9) or eval.bg_threshold')
  p.add_argument('--templates', choices=('simple', 'imagenet80'), default=None,
                 help='prompt templates (default eval.templates = simple)')
  p.add_argument('--window_batch', type=int, default=None, help='windows per forward pass')
  p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE',
                 help='any other config.eval key, e.g. --set short_side=448 (repeatable)')
  p.add_argument('--save_predictions', help='folder to write predicted label PNGs into')
  return p.parse_args(argv)


def _overrides(args) -> dict:
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  out = inference.parse_eval_overrides(args.set)
  out.update(templates=args.templates, window_batch=args.window_batch)
  return out


def format_table(class_names, scores: dict) -> str:
  """Per-class IoU / Acc table (percent) with the summary line, as mmseg prints it."""
  width = max(10, max(len(c) for c in class_names))
  fmt = lambda v: '   nan' if not np.isfinite(v) else f'{100 * v:6.2f}'
  lines = [f'{"class":<{width}}    IoU    Acc', '-' * (width + 14)]
  for name, iou, acc in zip(class_names, scores['IoU'], scores['Acc']):
    lines.append(f'{name:<{width}} {fmt(iou)} {fmt(acc)}')
  lines.append('-' * (width + 14))
  lines.append(f'aAcc {fmt(scores["aAcc"])}  mIoU {fmt(scores["mIoU"])}  mAcc {fmt(scores["mAcc"])}')
  return '\n'.join(lines)


def _pct(v: float):
  return None if not math.isfinite(v) else round(100.0 * float(v), 4)


def evaluate(args) -> dict:
  """Runs the benchmark described by parsed `args`; returns the JSON-able results."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  ds = eval_datasets.load_dataset(args.dataset, args.data_dir, args.class_names, args.max_images)
  segmenter, threshold, eval_cfg = None, None, None
  if args.checkpoint:
    from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
    segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **_overrides(args))
    eval_cfg = segmenter.eval_config
    threshold = next(t for t in (args.background_threshold, ds.bg_threshold, eval_cfg.bg_threshold)
                     if t is not None)
  elif not os.path.isdir(args.predictions):
    raise FileNotFoundError(f'expected a folder of predicted label PNGs at {args.predictions}')

  metric = metrics_lib.SegmentationMetric(len(ds.class_names))
  start = time.time()
  bar = tqdm(ds.samples, desc=f'evaluate {ds.name}', unit='img', file=sys.stderr, dynamic_ncols=True)
  for sample in bar:
    gt = eval_datasets.read_label_png(sample.label_path)
    if segmenter is not None:
      image = eval_datasets.read_image(sample.image_path)
      pred, _ = segmenter.segment(image, ds.foreground_names, background=ds.with_background,
                                  background_threshold=threshold)
    else:
      path = os.path.join(args.predictions, sample.name + '.png')
      if not os.path.exists(path):
        raise FileNotFoundError(f'expected {path}')
      pred = eval_datasets.read_label_png(path)
    if pred.shape != gt.shape:
      raise ValueError(f'prediction for {sample.name} is {pred.shape[0]}x{pred.shape[1]} but '
                       f'{sample.label_path} is {gt.shape[0]}x{gt.shape[1]}')
    if args.save_predictions:
      eval_datasets.write_label_png(os.path.join(args.save_predictions, sample.name + '.png'), pred)
    metric.update(pred, gt)
  bar.close()

  s = metric.compute()
  print(format_table(ds.class_names, s))
  return {
      'dataset': ds.name,
      'data_dir': ds.root,
      'source': os.path.abspath(args.checkpoint or args.predictions),
      'num_images': metric.num_images,
      'num_classes': len(ds.class_names),
      'units': 'percent',
      'mIoU': _pct(s['mIoU']), 'aAcc': _pct(s['aAcc']), 'mAcc': _pct(s['mAcc']),
      'per_class': {name: {'IoU': _pct(i), 'Acc': _pct(a), 'gt_pixels': int(g), 'pred_pixels': int(p)}
                    for name, i, a, g, p in zip(ds.class_names, s['IoU'], s['Acc'], s['area_gt'],
                                                s['area_pred'])},
      'background_threshold': threshold,
      'eval_config': eval_cfg.to_dict() if eval_cfg is not None else None,
      'seconds': round(time.time() - start, 2),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    results = evaluate(args)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  out_dir = os.path.dirname(os.path.abspath(args.output))
  os.makedirs(out_dir, exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(results, f, indent=1, default=list)
  print(f'{results["dataset"]}: mIoU {results["mIoU"]} over {results["num_images"]} images -> {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
