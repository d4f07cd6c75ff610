r"""Trains OVSegmentor (paper Sec. 3.2, 4.1; the authors' recipe: docs/paper_vs_authors.md Q18, Q19).

  python -m ovseg_jax.train --config=configs/vitb.py --workdir=gs://bucket/run
  python -m ovseg_jax.train --config=configs/vitb.py:stage=2 --workdir=DIR2 --config.train.init_from=DIR1
  python -m ovseg_jax.train --config=configs/tiny.py --workdir=runs/tiny --config.train.total_steps=100

Reads top to bottom: workdir & logging, mesh, input, model & optimizer, sharded state (restore / init /
init_from), the compiled update step, the loop (progress, metrics, checkpoints, NaN stop, SIGTERM).
Re-running the same command resumes from the latest checkpoint in WORKDIR/checkpoints.

WORKDIR: config.json (the resolved config), checkpoints/<step>/{state, data_iter, meta} (Orbax, async, the
last `keep_checkpoints`), metrics.jsonl and tb/ (TensorBoard events via tensorboardX), on process 0. Every
file outside Orbax goes through fileio.py, so WORKDIR and init_from may be gs:// (pip install gcsfs first).
Console: the trainer's own lines (setup, progress with ETA) on stdout; absl / Orbax logging shows warnings
and errors only unless --verbosity (-v) is given (--verbosity=0: Orbax's INFO lines too).
Input: always the real pipeline (data/pipeline.py); only the Python API `train(..., make_batches=)` takes
another source (tests and benchmarks use tests/train_data.py).
Non-finite loss / gradient: the step is a no-op on device (train_step.py); the host checks the per-step flags
at every log and checkpoint step (no per-step sync) and stops with the first bad step number before any save,
so the last checkpoint on disk is the last good one. SIGTERM: save the current step, wait, exit 0.
Metric files, throughput, ETA and MFU are measured and written by train_monitor.py.
"""

import signal
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax import fileio
from ovseg_jax import optim
from ovseg_jax import param_tree
from ovseg_jax import sharding as sharding_lib
from ovseg_jax import train_monitor
from ovseg_jax import train_step as step_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/X.py[:variant]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (local or gs://): config, checkpoints, metrics.')


class TrainingDiverged(Exception):
  """A non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers: console, init_from.
# ----------------------------------------------------------------------------------------------------------
def say(msg: str, *args) -> None:
  """A trainer line for the user: stdout on process 0, or absl INFO when that is shown (--verbosity)."""
  if logging.level_info():
    logging.info(msg, *args)
  elif jax.process_index() == 0:
    print(msg % args if args else msg, flush=True)


logging.ABSLLogger.register_frame_to_skip(__file__, 'say')   # absl records the caller's line, not say's


def quiet_library_logging() -> None:
  """absl / Orbax / JAX logging at WARNING unless --verbosity (-v) was given on the command line."""
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


def apply_init(state: dict, config: ml_collections.ConfigDict) -> dict:
  """init_from / init_bert into a freshly initialised state; stage 2: teacher <- visual encoder.

  An init source may be partial (DINO: the img_encoder only); every array it holds must fit the model
  (checkpoint.merge_params lists all that do not).
  """
  teacher = None
  for key in ('init_from', 'init_bert'):
    path = config.train[key]
    if not path:
      continue
    params, batch_stats, t = ckpt_lib.read_init(path)
    state['params'] = ckpt_lib.merge_params(state['params'], params, path, allow_missing=True)
    say('%s: placed %d of %d parameter arrays from %s', key, len(param_tree.named_leaves(params)),
        len(param_tree.named_leaves(state['params'])), path)
    if batch_stats:
      state['batch_stats'] = ckpt_lib.merge_params(state['batch_stats'], batch_stats, path, allow_missing=True)
      say('%s: placed %d BN statistics from %s', key, len(param_tree.named_leaves(batch_stats)), path)
    teacher = t if t is not None else teacher
  if step_lib.uses_teacher(config) and (config.train.init_from or config.train.init_bert):
    if teacher is None or config.train.init_teacher_from_student:
      teacher = jax.tree.map(np.asarray, state['params']['img_encoder'])   # official stage-2 init
    # Fresh device buffers (not aliases of params): the step donates the state leaf by leaf.
    state['ema'] = ckpt_lib.merge_params(state['ema'], teacher, 'teacher')
  return state


# ----------------------------------------------------------------------------------------------------------
# The loop's bookkeeping: progress logs with the NaN stop, and the SIGTERM flag.
# ----------------------------------------------------------------------------------------------------------
class Progress:
  """Device metrics of each step wait here (no per-step host sync) until a log or checkpoint step. There
  they are fetched and checked for a non-finite loss or gradient; on log steps they are averaged over the
  steps since the last check, timed (throughput, ETA, MFU) and written (metrics.jsonl, TensorBoard, console).
  """

  def __init__(self, writer: train_monitor.MetricWriter, ckpt: ckpt_lib.TrainCheckpointer, *, step: int,
               total_steps: int, global_batch: int, log_every: int, flops: float, peak: float):
    self.writer, self.ckpt = writer, ckpt
    self.total_steps, self.global_batch, self.log_every = total_steps, global_batch, log_every
    self.peak = peak
    self.pending: list[tuple[int, dict]] = []   # (step, device metrics) since the last check
    self.last: dict[str, float] = {}             # the last logged metrics
    self.restart(step, flops)

  def restart(self, step: int, flops: float) -> None:
    """Times the steps from `step` on (after a compile), which run a step variant of `flops` FLOPs."""
    self.t0, self.step0, self.flops = time.perf_counter(), step, flops

  def add(self, step: int, metrics: dict) -> None:
    self.pending.append((step, metrics))

  def check(self, step: int, *, force_log: bool = False) -> None:
    """Raises TrainingDiverged at the first pending non-finite step; logs on log steps (or `force_log`)."""
    if not self.pending:
      return
    host = jax.device_get(self.pending)
    for s, m in host:
      if m['finite'] < 1.0:
        self.ckpt.wait_until_finished()
        raise TrainingDiverged(f'non-finite loss or gradient at step {s} (loss={m["loss"]}, grad_norm='
                               f'{m["grad_norm"]}); stopped, the last good checkpoint is step '
                               f'{self.ckpt.latest_step()} in {self.ckpt.directory}')
    self.pending = []
    if not force_log and step % self.log_every:
      return
    seconds, steps = time.perf_counter() - self.t0, step - self.step0
    self.t0, self.step0 = time.perf_counter(), step
    self.last = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
    self.last.update(train_monitor.throughput(seconds, steps, self.global_batch, self.flops, self.peak))
    self.writer.write(step, self.last)
    if jax.process_index() == 0:
      say(train_monitor.progress_line(step, self.total_steps, self.last))


class SigtermFlag:
  """`.raised` turns True when SIGTERM arrives, until `restore()` puts the previous handler back.

  Outside the main thread (an embedding program owns signals) no handler is installed: no preemption save.
  """

  def __init__(self):
    self.raised = False
    try:
      self.previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:
      self.previous = None

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self.raised = True

  def restore(self) -> None:
    if self.previous is not None:
      signal.signal(signal.SIGTERM, self.previous)


# ----------------------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------------------
def make_train_iterator(config, *, start_state):
  """The real input pipeline (data/pipeline.py), this process's slice."""
  try:
    from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UsageError(f'the input pipeline ovseg_jax.data.pipeline is not importable: {e}') from e
  return pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), start_state=start_state)


def train(config: ml_collections.ConfigDict, workdir: str, *, make_batches=None) -> dict:
  """Trains (or resumes training) in `workdir` up to the configured length. -> the last logged metrics.

  make_batches(start_state) -> iterator of host batches with `.get_state()`; default: the real pipeline.
  Tests and benchmarks pass `tests/train_data.in_memory_batches`.
  """
  # ---------------------------------------------------------------- workdir, logging, distributed, mesh
  sharding_lib.maybe_initialize_distributed(config)
  fileio.makedirs(workdir)   # also: a remote workdir without its filesystem package stops here, in one line
  ckpt_lib.write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  gbs = config.train.global_batch_size
  sharding_lib.check_batch_divisible(gbs, mesh)
  say('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ---------------------------------------------------------------- checkpoints (before input: data state)
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir),
                                    save_every=config.train.checkpoint_every_steps,
                                    keep=config.train.keep_checkpoints,
                                    config_digest=ckpt_lib.config_digest(config))
  resume_step = ckpt.latest_step()

  # ---------------------------------------------------------------- input (resumed at its saved position)
  data_state = ckpt.restore_data_state(resume_step) if resume_step is not None else None
  if make_batches is not None:
    batches = make_batches(data_state)
  else:
    batches = make_train_iterator(config, start_state=data_state)
  steps_per_epoch = max(int(getattr(batches, 'num_examples', gbs)) // gbs, 1)
  warmup_steps, total_steps = optim.warmup_and_total_steps(config, steps_per_epoch)
  if resume_step is not None and resume_step >= total_steps:
    ckpt.close()
    print(f'{workdir} is already trained to step {resume_step} of {total_steps}', flush=True)
    return dict(step=resume_step)

  # ---------------------------------------------------------------- model and optimizer
  model = step_lib.make_model(config)
  tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps, warmup_steps=warmup_steps,
                                      global_batch=gbs)
  rng = jax.random.key(config.seed)
  init_rng, step_rng = jax.random.split(rng)

  def init_fn(r):
    return step_lib.init_state(config, model, tx, r)

  # ---------------------------------------------------------------- sharded state: restore | init (+init_from)
  if resume_step is not None:
    target, shardings = sharding_lib.abstract_state(init_fn, mesh, config.sharding, init_rng)
    state, _, _ = ckpt.restore(target, resume_step)
    say('resumed from %s at step %d', ckpt.directory, resume_step)
  else:
    state, shardings = sharding_lib.create_sharded_state(init_fn, mesh, config.sharding, init_rng)
    state = apply_init(state, config)
  n_params = step_lib.param_count(state['params'])
  say('params: %.2fM; per-device state %.1f MiB', n_params / 1e6,
               sharding_lib.per_device_bytes(state) / 2 ** 20)

  # ---------------------------------------------------------------- the compiled update step
  # Two compiled variants when the paper_single lambda starts at 0: without the mask branch before
  # `mask_start`, with it from there on (the second is compiled when first needed).
  mask_start = step_lib.mask_phase_start(config, total_steps)
  first = next(batches)
  first_state = batches.get_state()
  first_global = sharding_lib.host_batch_to_global(first, mesh)
  peak = train_monitor.machine_peak_flops(config)
  compiled_steps = {}  # mask_branch -> (compiled step, its FLOPs)

  def compiled_step(mask_branch: bool):
    if mask_branch not in compiled_steps:
      t0 = time.perf_counter()
      fn = step_lib.jit_train_step(config, model, tx, schedule, total_steps, mesh, shardings,
                                   mask_branch=mask_branch)
      compiled = fn.lower(state, first_global, step_rng).compile()
      flops = train_monitor.compiled_flops(compiled)
      what = 'the step' if mask_start in (0, total_steps) else (
          f'the step with the mask branch (steps >= {mask_start})' if mask_branch else
          f'the step without the mask branch (lambda = 0 before step {mask_start})')
      say('compiled %s in %.1fs: %.2f GFLOP per step; peak %.1f GFLOP/s', what, time.perf_counter() - t0,
          flops / 1e9, peak / 1e9)
      compiled_steps[mask_branch] = (compiled, flops)
    return compiled_steps[mask_branch]

  step = int(jax.device_get(state['step']))
  compiled, flops = compiled_step(step >= mask_start)

  # ---------------------------------------------------------------- loop
  sigterm = SigtermFlag()
  writer = train_monitor.MetricWriter(workdir)
  progress = Progress(writer, ckpt, step=step, total_steps=total_steps, global_batch=gbs,
                      log_every=config.train.log_every_steps, flops=flops, peak=peak)

  def save(step: int, state: dict, data_iter_state, force: bool = False) -> None:
    meta = dict(rng=np.asarray(jax.random.key_data(step_rng)).tolist(), time=time.time(),
                total_steps=total_steps)
    if ckpt.save(step, state, data_iter_state, meta, force=force):
      writer.sync()

  try:
    batch, data_iter_state = first_global, first_state
    while step < total_steps:
      if step == mask_start and mask_start > 0:
        progress.check(step)   # MFU of the steps so far uses the FLOPs of their variant
        compiled, flops = compiled_step(True)
        progress.restart(step, flops)
      state, metrics = compiled(state, batch, step_rng)
      step += 1
      progress.add(step, metrics)
      is_ckpt = step % config.train.checkpoint_every_steps == 0
      if is_ckpt or step % config.train.log_every_steps == 0 or step == total_steps:
        progress.check(step, force_log=step == total_steps)
      if is_ckpt:
        save(step, state, data_iter_state)
      # One host's SIGTERM must not start a save the others skip: multi-host uses the preemption service.
      if (sigterm.raised if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)):
        progress.check(step, force_log=True)
        if ckpt.latest_step() != step:
          save(step, state, data_iter_state, force=True)
        ckpt.wait_until_finished()
        say('preempted (SIGTERM): saved step %d to %s, exiting', step, ckpt.directory)
        break
      if step < total_steps:
        batch = sharding_lib.host_batch_to_global(next(batches), mesh)
        data_iter_state = batches.get_state()
    else:
      progress.check(step, force_log=True)
      if ckpt.latest_step() != step:
        save(step, state, data_iter_state, force=True)
  finally:
    ckpt.close()
    writer.close()
    sigterm.restore()
  return dict(progress.last, step=step)


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------
def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    print('error: --config and --workdir are required: python -m ovseg_jax.train --config=configs/X.py[:variant] '
          '--workdir=DIR [--config.KEY=VALUE ...]', file=sys.stderr)
    return 2
  quiet_library_logging()
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (errors.UsageError, TrainingDiverged, FileNotFoundError, ValueError) as e:  # expected: one line, no trace
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(1)
  return 0


def parse_flags(argv):
  """absl flag parsing (the global FLAGS: config_flags' `--config`, absl logging's `-v`); `--help` lists the
  trainer's flags (exit 0); a bad flag or `--config.*` override (unknown key, wrong type) is one line, no
  traceback (exit 2)."""
  if any(a in ('--help', '-h') for a in argv[1:]):
    print(cli.help_text(flags.FLAGS, 'python -m ovseg_jax.train', __doc__, names=('config', 'workdir')))
    sys.exit(0)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    name = getattr(e, 'flagname', None) or str(e).removeprefix('flag ').lstrip('-')
    if isinstance(e, flags.Error) and not name.startswith('config'):  # not about --config, e.g. --workdri
      print(f'error: {cli.flag_error_message(e)}', file=sys.stderr)
      sys.exit(2)
    bad = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    why = (str(e).splitlines() or [repr(e)])[0]
    if why.strip('"\'') and ' ' not in why:   # ml_collections reports an unknown key as just its (quoted) name
      why = f'unknown key {why.strip(chr(34) + chr(39))}'

    print(f'error: bad config override in {bad}: {why} (every key is listed in configs/common.py)',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
