r"""Zero-shot segmentation benchmarks: mIoU of a checkpoint on one benchmark, or the paper's table of eight.

One benchmark (a per-class table on stdout, every number in the JSON):
  python -m ovseg_jax.evaluate --checkpoint DIR --dataset voc --data_dir data/VOCdevkit/VOC2012 \
      --output voc.json [--max_images N] [--class_names FILE] [--background_threshold T] \
      [--eval.KEY=VALUE ...] [--save_predictions DIR]
The paper's table (VOC, VOC20, Context, Context59, COCO-Object, COCO-Stuff, Cityscapes, ADE20K, average):
  python -m ovseg_jax.evaluate --checkpoint DIR --suite all --data_root data --output table.json
  (or --suite voc,ade20k; writes table.json and table.md, prints the table; a benchmark that is not under
  --data_root is skipped with one line; one progress bar with an ETA runs over the images of the whole suite)
Saved predictions instead of a model: DIR/<image file stem>.png holding class indices in the dataset's class
order (for --suite: PRED_ROOT/<benchmark>/<image file stem>.png; --save_predictions writes that layout):
  python -m ovseg_jax.evaluate --predictions DIR --dataset ade20k --data_dir ADEChallengeData2016 --output m.json

`--dataset X` uses X's protocol (docs/evaluation.md, with the source of every number): short side 448 (long
side at most 2048), 448 x 448 windows with stride 224, the prompt "a photo of a {}.", and on the benchmarks
with a background class the authors' threshold (VOC 0.95, Context 0.35, COCO-Object 0.9). Settings resolve
as: eval defaults < the checkpoint's saved eval block < the benchmark's protocol < --eval.KEY=VALUE <
--background_threshold. `--dataset folder` (a VOC-layout folder with class_names.txt) has no protocol.

--suite looks under --data_root for mmseg's data/ folders: VOCdevkit/VOC2012 (VOC, VOC20),
VOCdevkit/VOC2010 (Context, Context59), coco_stuff164k or coco (COCO-Object, COCO-Stuff), cityscapes, and
ade/ADEChallengeData2016 or ADEChallengeData2016 (ADE20K).

IoU is summed over the whole split before dividing (mmseg 0.18; docs/paper_vs_authors.md Q25-Q27), label 255 is
ignored, mIoU is the nan-mean over classes, in percent. An image without a label file, or with an unreadable
file, is skipped and counted; ground-truth values outside the class range are counted and reported (and
scored as mmseg scores them). A checkpoint selected on a split (meta.json `selection`) gets a warning when
that split is scored here.
"""

import json
import math
import os
import sys
import time

from absl import flags
import numpy as np

from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax import eval_datasets
from ovseg_jax import metrics as metrics_lib


# Old spellings of eval settings, accepted until cli.REMOVED_IN with a deprecation line.
DEPRECATED = {'--set': '--eval.', '--templates': '--eval.templates', '--window_batch': '--eval.window_batch'}
# Eval settings that must be positive whole numbers (a window or stride of 0 would divide by zero).
POSITIVE_SETTINGS = ('short_side', 'long_side', 'window', 'stride', 'window_batch', 'top_k')
TABLE_TITLE = 'Zero-shot semantic segmentation, mIoU (%)'


def parse_args(argv=None):
  """Flags -> namespace; `.eval` holds the --eval.KEY=VALUE overrides given (cli.parse), `.suite` the list of
  benchmarks (None for one --dataset)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder (convert official / export)',
                      flag_values=fv)
  flags.DEFINE_string('predictions', None, 'folder of predicted label PNGs <image stem>.png to score instead '
                      '(with --suite: one sub-folder per benchmark)', flag_values=fv)
  flags.DEFINE_enum('dataset', None, eval_datasets.DATASETS, 'one benchmark (docs/evaluation.md), or folder',
                    flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'the dataset folder of --dataset (VOC2012, VOC2010, COCO root, '
                      'cityscapes, ADEChallengeData2016 or a folder)', flag_values=fv)
  flags.DEFINE_string('class_names', None, 'file with one class name per line (background first) to override',
                      flag_values=fv)
  flags.DEFINE_string('output', None, 'metrics JSON path (--suite also writes the table as <output>.md)',
                      flag_values=fv)
  flags.DEFINE_integer('max_images', None, 'evaluate the first N images only (of each benchmark)',
                       flag_values=fv)
  flags.DEFINE_float('background_threshold', None, 'default: the benchmark\'s (VOC 0.95, Context 0.35, '
                     'COCO-Object 0.9) or eval.bg_threshold', flag_values=fv)
  flags.DEFINE_string('save_predictions', None, 'folder to write predicted label PNGs into', flag_values=fv)
  # --- the paper table (run_suite) ---
  flags.DEFINE_string('suite', None, "'all' or a comma list of benchmarks (" + ','.join(eval_datasets.SUITE)
                      + '): evaluate each one found under --data_root and write the paper table',
                      flag_values=fv)
  flags.DEFINE_string('data_root', None, "folder holding the benchmarks in mmseg's data/ layout (--suite)",
                      flag_values=fv)
  flags.DEFINE_string('model_name', None, 'the row name of the --suite table (default: the checkpoint or '
                      'predictions folder name)', flag_values=fv)
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), DEPRECATED)
  args = cli.parse(fv, argv, prog='python -m ovseg_jax.evaluate', doc=__doc__, required=('output',),
                   one_of=[('checkpoint', 'predictions')], eval_settings=True)
  _check_args(args)
  return args


def _check_args(args) -> None:
  """The flag combinations cli.parse cannot express; each problem is one `error:` line (exit 2)."""
  if args.suite is not None and args.dataset is not None:
    cli.error('give --dataset (one benchmark) or --suite (the table), not both')
  if args.suite is None:
    if args.dataset is None:
      cli.error('give --dataset and --data_dir (one benchmark), or --suite and --data_root (the paper table)')
    if args.data_dir is None:
      cli.error('--data_dir is required with --dataset (python -m ovseg_jax.evaluate --help lists the flags)')
    if args.data_root is not None:
      cli.error('--data_root is for --suite; --dataset reads --data_dir')
  else:
    if args.data_root is None:
      cli.error('--data_root is required with --suite (the folder holding VOCdevkit/, ade/, cityscapes/, ...)')
    for flag in ('data_dir', 'class_names'):
      if getattr(args, flag) is not None:
        cli.error(f'--{flag} applies to one --dataset, not to --suite')
    args.suite = parse_suite(args.suite)
  if args.max_images is not None and args.max_images <= 0:
    cli.error(f'--max_images must be a positive number of images; got {args.max_images}')
  problem = eval_settings_problem(args.eval, '--eval.')
  if problem:
    cli.error(problem)


def parse_suite(text: str) -> list:
  """'all' or 'voc, ade20k' -> benchmark names in the paper table's order; an unknown name is a usage error."""
  names = [n.strip().lower() for n in text.split(',') if n.strip()]
  if names == ['all']:
    return list(eval_datasets.SUITE)
  unknown = [n for n in names if n not in eval_datasets.SUITE]
  if unknown or not names:
    cli.error(f'--suite={text!r}: unknown benchmark {unknown[0]!r}; give all or a comma list of '
              f'{",".join(eval_datasets.SUITE)}' if unknown else '--suite is empty; give all or a comma list')
  return [n for n in eval_datasets.SUITE if n in names]


def eval_settings_problem(settings, prefix: str = 'eval setting ') -> str | None:
  """One line naming the first unusable eval setting (a window or stride of 0, a stride past the window)."""
  for key in POSITIVE_SETTINGS:
    if key in settings and not int(settings[key]) > 0:
      return f'{prefix}{key}={settings[key]}: must be a positive whole number'
  if 'window' in settings and 'stride' in settings and int(settings['stride']) > int(settings['window']):
    return (f'{prefix}stride={settings["stride"]} is larger than {prefix}window={settings["window"]}: the '
            'windows would leave pixels unscored (the stride must not exceed the window)')
  return None


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


def _say(message: str) -> None:
  """One line on stderr that does not break a running progress bar."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  tqdm.write(message, file=sys.stderr)


def _progress(total: int, desc: str):
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=total, desc=desc, unit='img', file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------------------
# The model: loaded once, set up per benchmark.
# ------------------------------------------------------------------------------------------------------------

class Model:
  """A checkpoint loaded once; `configure(ds)` sets the eval settings one benchmark is scored with."""

  def __init__(self, directory: str, eval_overrides: dict):
    from ovseg_jax import checkpoint  # pylint: disable=g-import-not-at-top  (Orbax, JAX: only with a model)
    from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
    self._inference = inference
    self.directory = os.path.abspath(directory)
    self.user = dict(eval_overrides)
    self.segmenter = inference.Segmenter.from_checkpoint(directory, **self.user)
    self.meta = checkpoint.load_meta(directory)
    self.saved = dict(self.meta.get('eval') or {})

  def settings(self, ds):
    """defaults < the checkpoint's saved eval block < the benchmark's protocol < --eval.KEY=VALUE."""
    cfg = self._inference.default_eval_config(**{**self.saved, **ds.protocol, **self.user})
    problem = eval_settings_problem(cfg)
    if problem:
      raise errors.UsageError(f'{ds.name}: {problem}')
    return cfg

  def configure(self, ds):
    self.segmenter.eval_config = cfg = self.settings(ds)
    return cfg

  def protocol_note(self, ds) -> str | None:
    """A line when the benchmark's protocol replaces eval settings the checkpoint was exported with."""
    changed = [f'{k}={v} (checkpoint: {self.saved[k]})' for k, v in ds.protocol.items()
               if k in self.saved and k not in self.user and self.saved[k] != v]
    if not changed:
      return None
    return (f'note: the benchmark protocol (docs/evaluation.md) sets {", ".join(changed)}; '
            '--eval.KEY=VALUE keeps the checkpoint\'s')

  def selection_warning(self, ds) -> str | None:
    """The checkpoint was selected on the split being scored (meta.json `selection`, written by training)."""
    sel = self.meta.get('selection')
    if isinstance(sel, str):
      name, path = (sel, None) if sel in eval_datasets.DATASETS else (None, sel)
    elif isinstance(sel, dict):
      name = next((sel[k] for k in ('dataset', 'benchmark', 'split', 'name') if isinstance(sel.get(k), str)),
                  None)
      path = next((sel[k] for k in ('data_dir', 'path', 'root') if isinstance(sel.get(k), str)), None)
    else:
      return None
    benchmarks = eval_datasets.BENCHMARKS
    same_path = bool(path) and os.path.realpath(path) == os.path.realpath(ds.root)
    # VOC20 scores VOC's images, Context59 Context's, COCO-Stuff COCO-Object's: a selection on one covers both.
    same_images = name in benchmarks and ds.name in benchmarks and benchmarks[name].split == benchmarks[ds.name].split
    if not (same_path or same_images):
      return None
    return (f'warning: {ds.name}: the checkpoint was selected on the images this benchmark scores (meta.json '
            f'selection: {json.dumps(sel)}), so its {ds.title} score is not a held-out result')


# ------------------------------------------------------------------------------------------------------------
# Scoring one dataset.
# ------------------------------------------------------------------------------------------------------------

def _reason(kind: str, e: Exception) -> str:
  """'image too_large', 'label unreadable', ... from an images.ImageError (or any read error)."""
  return f'{kind} {getattr(e, "reason", "unreadable")}'


def _check_not_overwriting(ds, save_dir: str) -> None:
  """--save_predictions must not write over the dataset's own files (a label folder, say)."""
  own = {os.path.realpath(p) for s in ds.samples for p in (s.image_path, s.label_path)}
  for s in ds.samples:
    target = os.path.join(save_dir, s.name + '.png')
    if os.path.realpath(target) in own:
      raise errors.UsageError(f'--save_predictions {save_dir} would overwrite {target}, a file of the {ds.name} '
                              'dataset; give another folder')


def score_dataset(ds, *, model: Model | None = None, predictions: str | None = None,
                  save_dir: str | None = None, background_threshold: float | None = None, bar=None,
                  source: str = '') -> dict:
  """Scores every sample of `ds` with the model or the saved predictions -> the JSON-able results.

  Images that cannot be read are skipped and counted by reason (with those `load_dataset` left out);
  prediction problems (missing file, wrong size, class out of range) are errors naming the file.
  """
  start = time.time()
  eval_cfg, threshold = None, None
  if model is not None:
    eval_cfg = model.configure(ds)
    if ds.with_background:
      threshold = float(background_threshold if background_threshold is not None else eval_cfg.bg_threshold)
  num_classes = len(ds.class_names)
  metric = metrics_lib.SegmentationMetric(num_classes)
  skipped = {why: len(paths) for why, paths in ds.skipped.items()}
  first_skip = {why: paths[0] for why, paths in ds.skipped.items()}
  oor = {'pixels': 0, 'images': 0, 'values': set(), 'first_file': None}
  for sample in ds.samples:
    problem = None
    try:
      gt = eval_datasets.read_labels(sample)
    except (OSError, ValueError) as e:
      problem = (_reason('label', e), str(e))
    if problem is None and model is not None:
      try:
        image = eval_datasets.read_image(sample.image_path)
      except (OSError, ValueError) as e:
        problem = (_reason('image', e), str(e))
      else:
        if image.shape[:2] != gt.shape:
          problem = ('image and label sizes differ', f'{sample.image_path} is {image.shape[0]}x{image.shape[1]} '
                     f'but {sample.label_path} is {gt.shape[0]}x{gt.shape[1]}')
    if problem is not None:
      skipped[problem[0]] = skipped.get(problem[0], 0) + 1
      first_skip.setdefault(problem[0], problem[1])
      if bar is not None:
        bar.update(1)
      continue
    if model is not None:
      pred, _ = model.segmenter.segment(image, ds.foreground_names, background=ds.with_background,
                                        background_threshold=threshold)
      where = f'the prediction for {sample.name}'
    else:
      where = os.path.join(predictions, sample.name + '.png')
      if not os.path.exists(where):
        raise FileNotFoundError(f'expected {where} (a label PNG named after the image file\'s stem)')
      pred = eval_datasets.read_label_png(where)
    if pred.shape != gt.shape:
      raise ValueError(f'{where} is {pred.shape[0]}x{pred.shape[1]} but {sample.label_path} is '
                       f'{gt.shape[0]}x{gt.shape[1]}')
    if pred.size and (pred.min() < 0 or pred.max() >= num_classes):
      raise ValueError(f'{where} holds class {int(pred.max())}, outside the {num_classes} classes of '
                       f'{ds.name} (0..{num_classes - 1})')
    bad = (gt != metrics_lib.IGNORE_LABEL) & ((gt < 0) | (gt >= num_classes))
    if bad.any():
      oor['pixels'] += int(bad.sum())
      oor['images'] += 1
      oor['values'].update(int(v) for v in np.unique(gt[bad])[:8])
      oor['first_file'] = oor['first_file'] or sample.label_path
    if save_dir:
      eval_datasets.write_label_png(os.path.join(save_dir, sample.name + '.png'), pred)
    metric.update(pred, gt)
    if bar is not None:
      bar.update(1)

  total = len(ds.samples) + sum(len(p) for p in ds.skipped.values())
  if skipped:
    parts = ', '.join(f'{n} {why} (first: {first_skip[why]})' for why, n in sorted(skipped.items()))
    _say(f'warning: {ds.name}: skipped {sum(skipped.values())} of {total} images: {parts}')
  if oor['pixels']:
    no_class = '; -1: a stored value with no class' if -1 in oor['values'] else ''
    _say(f'warning: {ds.name}: {oor["images"]} label files hold {oor["pixels"]} pixels with values outside '
         f'0..{num_classes - 1} and not {metrics_lib.IGNORE_LABEL} (first: {oor["first_file"]}; values '
         f'{sorted(oor["values"])}{no_class}); they count in the predicted class\'s area, as mmseg counts '
         'them: check the label encoding')
  if metric.num_images == 0:
    raise ValueError(f'{ds.name}: no image could be scored ({sum(skipped.values())} skipped; first: '
                     f'{next(iter(first_skip.values()))})')
  s = metric.compute()
  return {
      'dataset': ds.name,
      'benchmark': ds.title,
      'data_dir': ds.root,
      'source': source,
      'num_images': metric.num_images,
      'skipped_images': dict(sorted(skipped.items())),
      'num_classes': num_classes,
      'units': 'percent',
      'mIoU': _pct(s['mIoU']), 'aAcc': _pct(s['aAcc']), 'mAcc': _pct(s['mAcc']),
      'per_class': {name: {'IoU': _pct(i), 'Acc': _pct(a), 'gt_pixels': int(g), 'pred_pixels': int(p)}
                    for name, i, a, g, p in zip(ds.class_names, s['IoU'], s['Acc'], s['area_gt'],
                                                s['area_pred'])},
      'out_of_range_labels': {**oor, 'values': sorted(oor['values'])},
      'background_threshold': threshold,
      'protocol': ds.protocol or None,
      'eval_config': eval_cfg.to_dict() if eval_cfg is not None else None,
      'warnings': list(ds.warnings),
      'seconds': round(time.time() - start, 2),
      '_scores': s,
  }


def _announce(ds, model: Model | None, background_threshold) -> None:
  """The dataset's one-line notes before scoring: repeated lines, class-name files, protocol, selection."""
  for w in ds.warnings:
    _say(f'warning: {w}')
  if background_threshold is not None and not ds.with_background:
    _say(f'note: --background_threshold is not used: {ds.name} has no background class')
  if model is not None:
    for line in (model.protocol_note(ds), model.selection_warning(ds)):
      if line:
        _say(line)


def evaluate(args) -> dict:
  """Runs the one benchmark described by parsed `args`; returns the JSON-able results."""
  ds = eval_datasets.load_dataset(args.dataset, args.data_dir, args.class_names, args.max_images)
  if args.save_predictions:
    _check_not_overwriting(ds, args.save_predictions)
  model = None
  if args.checkpoint:
    model = Model(args.checkpoint, args.eval)
    model.settings(ds)   # an unusable setting fails before any image is read
  elif not os.path.isdir(args.predictions):
    raise FileNotFoundError(f'expected a folder of predicted label PNGs at {args.predictions}')
  _announce(ds, model, args.background_threshold)
  bar = _progress(len(ds.samples), f'evaluate {ds.name}')
  try:
    r = score_dataset(ds, model=model, predictions=args.predictions, save_dir=args.save_predictions,
                      background_threshold=args.background_threshold, bar=bar,
                      source=os.path.abspath(args.checkpoint or args.predictions))
  finally:
    bar.close()
  print(format_table(ds.class_names, r.pop('_scores')))
  if model is not None and model.selection_warning(ds):
    r['selected_on_this_split'] = True
  return r


# ------------------------------------------------------------------------------------------------------------
# The suite: every benchmark under --data_root, one table.
# ------------------------------------------------------------------------------------------------------------

def _model_name(args) -> str:
  return args.model_name or os.path.basename(os.path.normpath(args.checkpoint or args.predictions))


def run_suite(args) -> dict:
  """Evaluates the benchmarks `args.suite` found under `args.data_root` -> the paper table (JSON-able).

  Absent benchmarks are skipped with one line each; one progress bar (with ETA) runs over the images of all
  benchmarks found. A benchmark that fails while scoring is reported and left out of the table
  (`failed`), and main() then exits with code 1.
  """
  start = time.time()
  root = os.path.abspath(args.data_root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'expected a folder at {root} (--data_root)')
  status = {name: {'status': 'not requested'} for name in eval_datasets.SUITE}
  found = []
  for name in args.suite:
    title = eval_datasets.BENCHMARKS[name].title
    folder, looked = eval_datasets.find_benchmark(name, root)
    reason, ds = None, None
    if folder is None:
      reason = 'not found (looked for ' + ', '.join(os.path.relpath(p, root) for p in looked) + f' under {root})'
    else:
      try:
        ds = eval_datasets.load_dataset(name, folder, max_images=args.max_images)
      except (OSError, ValueError) as e:
        reason = str(e)
    if ds is not None and args.predictions and not os.path.isdir(os.path.join(args.predictions, name)):
      reason = f'no predictions folder {os.path.join(args.predictions, name)}'
    elif ds is not None:
      found.append(ds)
    if reason:
      status[name] = {'status': 'skipped', 'reason': reason}
      _say(f'skip {name} ({title}): {reason}')
  if not found:
    raise errors.UsageError(f'no benchmark of --suite found under {root}; docs/evaluation.md gives the '
                            'expected folders (VOCdevkit/VOC2012, VOCdevkit/VOC2010, coco_stuff164k, '
                            'cityscapes, ade/ADEChallengeData2016)')
  if args.save_predictions:
    for ds in found:
      _check_not_overwriting(ds, os.path.join(args.save_predictions, ds.name))
  model = None
  if args.checkpoint:
    model = Model(args.checkpoint, args.eval)
    for ds in found:
      model.settings(ds)   # an unusable setting fails before any image is read
  elif not os.path.isdir(args.predictions):
    raise FileNotFoundError(f'expected a folder of predicted label PNGs at {args.predictions}')

  source = os.path.abspath(args.checkpoint or args.predictions)
  details, notes = {}, set()
  total = sum(len(ds.samples) for ds in found)
  bar = _progress(total, 'suite')
  try:
    for i, ds in enumerate(found):
      bar.set_description(f'suite {i + 1}/{len(found)} {ds.name}')
      for w in ds.warnings:
        _say(f'warning: {w}')
      if model is not None:
        note, sel = model.protocol_note(ds), model.selection_warning(ds)
        if note and note not in notes:
          notes.add(note)
          _say(note)
        if sel:
          _say(sel)
      done = bar.n
      try:
        r = score_dataset(
            ds, model=model,
            predictions=os.path.join(args.predictions, ds.name) if args.predictions else None,
            save_dir=os.path.join(args.save_predictions, ds.name) if args.save_predictions else None,
            background_threshold=args.background_threshold, bar=bar, source=source)
      except (OSError, ValueError) as e:
        bar.update(done + len(ds.samples) - bar.n)
        status[ds.name] = {'status': 'failed', 'reason': str(e)}
        _say(f'error: {ds.name} ({ds.title}) failed: {e}')
        continue
      r.pop('_scores')
      if model is not None and model.selection_warning(ds):
        r['selected_on_this_split'] = True
      details[ds.name] = r
      status[ds.name] = {'status': 'evaluated', 'num_images': r['num_images'], 'data_dir': ds.root}
      _say(f'{ds.name} ({ds.title}): mIoU {r["mIoU"]} over {r["num_images"]} images')
  finally:
    bar.close()
  _say(f'suite: {len(details)} of {len(args.suite)} benchmarks scored, {bar.n} images in '
       f'{time.time() - start:.1f} s')
  table = paper_table(_model_name(args), details, status)
  table.update(source=source, data_root=root, eval_overrides=dict(args.eval),
               background_threshold=args.background_threshold, max_images=args.max_images,
               seconds=round(time.time() - start, 2), details=details)
  return table


def paper_table(model_name: str, details: dict, status: dict) -> dict:
  """The table of a paper: one row (the model), the eight benchmarks in the field's order, and the average.

  Cells are mIoU in percent (None: not evaluated); Avg is the mean over the evaluated benchmarks.
  """
  titles = [eval_datasets.BENCHMARKS[n].title for n in eval_datasets.SUITE]
  row = {'model': model_name}
  for name, title in zip(eval_datasets.SUITE, titles):
    row[title] = details[name]['mIoU'] if name in details else None
  evaluated = [t for t in titles if row[t] is not None]
  row['Avg'] = round(float(np.mean([row[t] for t in evaluated])), 4) if evaluated else None
  return {
      'title': TABLE_TITLE,
      'protocol': 'docs/evaluation.md',
      'columns': ['model', *titles, 'Avg'],
      'rows': [row],
      'average_over': evaluated,
      'benchmarks': {eval_datasets.BENCHMARKS[n].title: {'dataset': n, **status[n]} for n in eval_datasets.SUITE},
  }


def format_markdown(table: dict) -> str:
  """The paper table as markdown (one decimal, as papers print it; '-' = not evaluated) and a note line."""
  cols = table['columns']
  cell = lambda v: '-' if v is None else (f'{v:.1f}' if isinstance(v, (int, float)) else str(v))
  lines = ['| ' + ' | '.join('Model' if c == 'model' else c for c in cols) + ' |',
           '|' + '|'.join([':--'] + ['--:'] * (len(cols) - 1)) + '|']
  for row in table['rows']:
    lines.append('| ' + ' | '.join(cell(row[c]) for c in cols) + ' |')
  n_all = len(cols) - 2
  over = table['average_over']
  note = (f'{table["title"]}; protocol: {table["protocol"]}. Avg over '
          + ('all 8 benchmarks.' if len(over) == n_all else f'{len(over)} of {n_all}: {", ".join(over)}.'))
  missing = [f'{t} ({b["status"]})' for t, b in table['benchmarks'].items() if b['status'] != 'evaluated']
  if missing:
    note += ' Not evaluated: ' + ', '.join(missing) + ' (the JSON says why).'
  return '\n'.join(lines) + '\n\n' + note + '\n'


def _markdown_path(output: str) -> str:
  base, ext = os.path.splitext(output)
  return (base if ext.lower() == '.json' else output) + '.md'


def _write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1, default=list)


@cli.entry_point
def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    results = run_suite(args) if args.suite else evaluate(args)
  except (OSError, ValueError) as e:   # FileNotFoundError, UsageError, images.ImageError, PermissionError, ...
    print(f'error: {e}', file=sys.stderr)
    return 2
  _write_json(args.output, results)
  if not args.suite:
    print(f'{results["dataset"]}: mIoU {results["mIoU"]} over {results["num_images"]} images -> {args.output}')
    return 0
  md = format_markdown(results)
  with open(_markdown_path(args.output), 'w') as f:
    f.write(md)
  print(md)
  print(f'wrote {args.output} and {_markdown_path(args.output)}')
  failed = [b['dataset'] for b in results['benchmarks'].values() if b['status'] == 'failed']
  if failed:
    print(f'error: {len(failed)} benchmark(s) failed ({", ".join(failed)}); the table holds the others',
          file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
