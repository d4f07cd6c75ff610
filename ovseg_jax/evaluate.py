r"""Zero-shot segmentation benchmark: mIoU / aAcc of a checkpoint on VOC, Context, COCO Object or a folder.

  python -m ovseg_jax.evaluate --checkpoint DIR --dataset voc --data_dir VOCdevkit/VOC2012 \
      --output metrics.json [--max_images N] [--class_names FILE] [--background_threshold 0.95] \
      [--eval.templates=imagenet80] [--eval.window_batch=4] [--save_predictions DIR]
  python -m ovseg_jax.evaluate --predictions DIR --dataset folder --data_dir D --output metrics.json

The protocol is the authors' (docs/paper_vs_authors.md Q25-Q27): short side 448, 448/224 sliding windows, the single
prompt "a photo of a {}.", the per-dataset background threshold (VOC 0.95, Context 0.35, COCO Object 0.9),
IoU accumulated over the whole split with ignore label 255, mIoU = nanmean over classes. `--predictions`
scores saved label PNGs (<name>.png, channel order of the dataset's class list) instead of running a model;
`--save_predictions` writes such PNGs (VOC palette). `--eval.KEY=VALUE` overrides one eval setting (window,
stride, short_side, templates, ...) over the one the checkpoint was exported with.

Prints a per-class table to stdout and writes a JSON with every number (percentages, like the paper).
"""

import json
import math
import os
import sys
import time

from absl import flags
import numpy as np

from ovseg_jax import cli
from ovseg_jax import eval_datasets
from ovseg_jax import metrics as metrics_lib


# Old spellings of eval settings, accepted until cli.REMOVED_IN with a deprecation line.
DEPRECATED = {'--set': '--eval.', '--templates': '--eval.templates', '--window_batch': '--eval.window_batch'}


def parse_args(argv=None):
  """Flags -> namespace; `.eval` holds the --eval.KEY=VALUE overrides given (cli.parse)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder (convert official / export)',
                      flag_values=fv)
  flags.DEFINE_string('predictions', None, 'folder of predicted label PNGs <name>.png to score instead',
                      flag_values=fv)
  flags.DEFINE_enum('dataset', None, eval_datasets.DATASETS, 'benchmark layout', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'dataset root (VOC2012, VOC2010, COCO root or a folder)', flag_values=fv)
  flags.DEFINE_string('class_names', None, 'file with one class name per line (background first) to override',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'metrics JSON path', flag_values=fv)
  flags.DEFINE_integer('max_images', None, 'evaluate the first N images only', flag_values=fv)
  flags.DEFINE_float('background_threshold', None, 'default: the dataset\'s (VOC 0.95, Context 0.35, '
                     'COCO Object 0.9) or eval.bg_threshold', flag_values=fv)
  flags.DEFINE_string('save_predictions', None, 'folder to write predicted label PNGs into', flag_values=fv)
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), DEPRECATED)
  return cli.parse(fv, argv, prog='python -m ovseg_jax.evaluate', doc=__doc__,
                   required=('dataset', 'data_dir', 'output'), one_of=[('checkpoint', 'predictions')],
                   eval_settings=True)


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
    segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **args.eval)
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


@cli.entry_point
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
