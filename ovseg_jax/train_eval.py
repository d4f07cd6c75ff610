"""Zero-shot evaluation during training (`config.eval_during_training`), and keeping the best checkpoint.

Every `every_steps` steps and at the last step (of runs at least `every_steps` long), the trainer hands the train state to `InLoopEval.run`. It
segments the validation split with the online model (the params and BN statistics `export` writes), the run's
`config.eval` settings and, for a named benchmark, its protocol (as `evaluate` scores an exported checkpoint,
so the two numbers agree). It returns {'eval/mIoU', 'eval/aAcc', 'eval/mAcc', 'eval/seconds'} in percent
for metrics.jsonl and TensorBoard.

With `keep_best`, a new best `metric` writes WORKDIR/best/: an inference checkpoint in export's format whose
meta.json also holds `selection` = {dataset, data_dir, split, num_images, metric, value, step}. `evaluate`
warns when it scores a checkpoint on the split it was selected on. A resumed run reads the best value so far
from WORKDIR/best/meta.json. Selecting on a benchmark's own split is refused (`check_config`). The trainer
gathers the state on every process; process 0 evaluates and writes.
"""

import math
import time

import jax
import numpy as np

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import errors
from ovseg_jax import eval_datasets
from ovseg_jax import fileio
from ovseg_jax import metrics as metrics_lib

METRICS = ('mIoU', 'aAcc', 'mAcc')
BEST_DIR = 'best'


def check_config(cfg) -> None:
  """Raises a UsageError for an `eval_during_training` block that cannot run or would select on a report."""
  if cfg.every_steps < 0:
    raise errors.UsageError(f'eval_during_training.every_steps={cfg.every_steps}: expected >= 0 (0: off)')
  if cfg.every_steps == 0:
    return
  if cfg.metric not in METRICS:
    raise errors.UsageError(f'eval_during_training.metric={cfg.metric!r}: expected one of {METRICS}')
  if cfg.dataset not in eval_datasets.DATASETS:
    raise errors.UsageError(f'eval_during_training.dataset={cfg.dataset!r}: expected one of '
                            f'{eval_datasets.DATASETS}')
  if not cfg.data_dir:
    raise errors.UsageError('eval_during_training.every_steps > 0 needs eval_during_training.data_dir (the '
                            'validation split, e.g. a VOC-layout folder; 0 turns it off)')
  if cfg.keep_best and cfg.dataset != 'folder':
    raise errors.UsageError(
        f'eval_during_training.keep_best=True on dataset={cfg.dataset!r} would select the checkpoint on the '
        f'{cfg.dataset} val split, which the benchmark tables report; select on a folder of images they do not '
        "report instead (dataset='folder', a VOC-layout data_dir), or set keep_best=False")


def _host_copy(tree):
  """The global values of (possibly sharded, multi-process) arrays as NumPy (a collective: every process)."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


class InLoopEval:
  """The in-loop evaluation of one run. `due(step)` says when; `run(step, state)` evaluates (and keeps)."""

  def __init__(self, config, workdir: str, total_steps: int):
    self.cfg = config.eval_during_training
    check_config(self.cfg)
    self.config, self.workdir, self.total_steps = config, workdir, total_steps
    self.every = int(self.cfg.every_steps)
    # A run shorter than one interval never evaluates (and never reads the split): short test and debug runs
    # of a config that has the block on need no validation folder.
    self.active = 0 < self.every <= total_steps
    self.ds, self.best = None, -math.inf
    if not self.active:
      return
    self.ds = eval_datasets.load_dataset(self.cfg.dataset, self.cfg.data_dir,
                                         max_images=int(self.cfg.max_images) or None)
    self.best_dir = fileio.join(workdir, BEST_DIR)
    if self.cfg.keep_best:
      value = ckpt_lib.load_meta(self.best_dir).get('selection', {}).get('value') if fileio.isdir(
          self.best_dir) else None
      self.best = float(value) if value is not None else -math.inf

  def due(self, step: int) -> bool:
    return self.active and (step % self.every == 0 or step == self.total_steps)

  def selection(self, step: int, value: float) -> dict:
    """What meta.json records about the split the checkpoint was selected on."""
    return {'dataset': self.ds.name, 'data_dir': self.ds.root, 'split': 'val',
            'num_images': len(self.ds.samples), 'metric': self.cfg.metric, 'value': value, 'step': step}

  def evaluate(self, variables) -> dict:
    """Scores `variables` on the split -> metrics_lib scores (fractions) and the seconds it took."""
    from ovseg_jax import inference  # pylint: disable=g-import-not-at-top  (the trainer loads it only if on)
    start = time.perf_counter()
    settings = inference.default_eval_config(**{**self.config.eval.to_dict(), **self.ds.protocol})
    segmenter = inference.Segmenter(self.config.model, variables, settings)
    metric = metrics_lib.SegmentationMetric(len(self.ds.class_names))
    for sample in self.ds.samples:
      pred, _ = segmenter.segment(eval_datasets.read_image(sample.image_path), self.ds.foreground_names,
                                  background=self.ds.with_background)
      metric.update(pred, eval_datasets.read_labels(sample))
    return dict(metric.compute(), seconds=time.perf_counter() - start)

  def run(self, step: int, state: dict) -> tuple[dict, str]:
    """Evaluates the online model of `state` -> ({'eval/...': value}, a console line). Call it on every
    process: the state is gathered collectively, process 0 evaluates, and every process takes part in the
    write of WORKDIR/best/ (Orbax synchronises the processes of a save)."""
    variables = _host_copy({'params': state['params'], 'batch_stats': state['batch_stats']})
    keys = [f'eval/{k}' for k in METRICS] + ['eval/seconds']
    values = np.zeros(len(keys), np.float64)
    if jax.process_index() == 0:
      s = self.evaluate(variables)
      values = np.array([100.0 * float(s[k]) for k in METRICS] + [float(s['seconds'])])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      values = np.asarray(multihost_utils.broadcast_one_to_all(values))
    out = {k: float(v) for k, v in zip(keys, values)}
    value = out[f'eval/{self.cfg.metric}']
    line = (f'eval step {step} on {self.ds.name} {self.ds.root} ({len(self.ds.samples)} images, '
            f'{out["eval/seconds"]:.1f}s): mIoU {out["eval/mIoU"]:.2f} aAcc {out["eval/aAcc"]:.2f} '
            f'mAcc {out["eval/mAcc"]:.2f}')
    if self.cfg.keep_best and math.isfinite(value) and value > self.best:
      self.best = value
      meta = {'source': fileio.abspath(self.workdir), 'step': int(step),
              'exporter': 'ovseg_jax.train (eval_during_training.keep_best)',
              'stage': self.config.stage, 'recipe': self.config.recipe, 'eval': self.config.eval.to_dict(),
              'selection': self.selection(int(step), value)}
      ckpt_lib.save_inference(self.best_dir, self.config.model, variables, meta)
      line += f'; best {self.cfg.metric} so far -> {self.best_dir}'
    return out, line
