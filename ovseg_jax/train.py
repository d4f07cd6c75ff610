r"""Trains OVSegmentor (paper Sec. 3.2, 4.1; the authors' recipe: docs/paper_vs_authors.md Q18, Q19).

  python -m ovseg_jax.train --config=configs/vitb.py --workdir=gs://bucket/run
  python -m ovseg_jax.train --config=configs/vitb.py:stage=2 --workdir=DIR2 --config.train.init_from=DIR1
  python -m ovseg_jax.train --config=configs/tiny.py --workdir=runs/tiny --config.train.total_steps=100

Reads top to bottom: workdir & logging, mesh, the resume check, input, model & optimizer, sharded state
(restore / init / init_from), the compiled update step, the loop (progress, metrics, checkpoints, NaN stop,
SIGTERM, Ctrl-C).

Resume: re-running the command goes on from the newest checkpoint in WORKDIR/checkpoints.
- What may change: checkpoint.RESUME_MAY_CHANGE lists the keys. They cover the run's length
  (train.total_steps / total_epochs: the lr schedule follows the new length), log / checkpoint intervals and
  `keep_checkpoints`, data.data_dir / num_workers / read_threads, mesh / sharding / distributed (another slice
  or host count), memory switches that compute the same values (model.remat, loss.contrast_chunk,
  loss.matcher), the init_* keys (read at step 0 only) and eval settings.
- What is refused: any other change (model.*, seed, optim.*, loss weights, the data recipe, the batch size).
  It is refused before anything is written, in one line naming each key with both values
  (`model.vision.width: 128 -> 256`). The reference is the config saved in the checkpoint's meta.
- After a successful restore: config.json is rewritten with the config the run goes on with, and each
  applied change is appended to config_changes.jsonl.
- Unreadable checkpoints: a step that does not read (a truncated file, ...) is skipped for the newest one that
  does, with a warning naming it. Its folder is moved to checkpoints_unreadable/<step> and never deleted.

WORKDIR: config.json (the resolved config), checkpoints/<step>/{state, data_iter, meta} (Orbax, async, the
last `keep_checkpoints`), metrics.jsonl (one row per step: a resume drops the rows logged after its
checkpoint) and tb/ (TensorBoard events via tensorboardX), on process 0. Every file outside Orbax goes
through fileio.py, so WORKDIR and init_from may be gs:// (pip install gcsfs first).
Console: the trainer's own lines (setup, progress with ETA) on stdout; absl / Orbax logging shows warnings
and errors only unless --verbosity (-v) is given (--verbosity=0: Orbax's INFO lines too).
Input: always the real pipeline (data/pipeline.py); only the Python API `train(..., make_batches=)` takes
another source (tests and benchmarks use tests/train_data.py).
Non-finite loss / gradient: the step is a no-op on device (train_step.py); the host checks the per-step flags
at every log and checkpoint step (no per-step sync) and stops with the first bad step number before any save,
so the last checkpoint on disk is the last good one. SIGTERM: save the current step, wait, exit 0.
Ctrl-C (one process): the same save, then one line ('interrupted (Ctrl-C) at step N: saved step N to DIR')
and exit status 130. A second Ctrl-C, or Ctrl-C before the loop, stops at once, without a save, and also
prints one line (with the newest checkpoint on disk). Usage errors (UsageError and the like): one `error:`
line, exit status 1.
Metric files, throughput, ETA and MFU are measured and written by train_monitor.py.
"""

import os
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
from ovseg_jax import optim
from ovseg_jax import param_tree
from ovseg_jax import sharding as sharding_lib
from ovseg_jax import text_buckets
from ovseg_jax import train_eval
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
    self.flops_sum, self.flops_steps = 0.0, 0   # FLOPs of the timed steps (variants may differ: text buckets)

  def add(self, step: int, metrics: dict, flops: float | None = None) -> None:
    self.pending.append((step, metrics))
    self.flops_sum += self.flops if flops is None else flops
    self.flops_steps += 1

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
    flops = self.flops_sum / self.flops_steps if self.flops_steps else self.flops
    self.restart(step, self.flops)
    self.last = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
    self.last.update(train_monitor.throughput(seconds, steps, self.global_batch, flops, self.peak))
    self.writer.write(step, self.last)
    if jax.process_index() == 0:
      say(train_monitor.progress_line(step, self.total_steps, self.last))


class Interrupted(KeyboardInterrupt):
  """Ctrl-C in the loop: the step it arrived in was finished and saved; the message says which and where."""


class StopFlag:
  """Asks the loop to stop after its current step: `.raised` names the signal ('SIGTERM'; 'SIGINT' = Ctrl-C),
  None until one arrives; `restore()` puts the previous handlers back.

  A second Ctrl-C stops at once (KeyboardInterrupt, no save). `sigint=False` (several processes: a Ctrl-C
  reaches one of them, whose save alone would wait for the others forever) leaves Ctrl-C to Python, and so
  does a process started with SIGINT ignored (`cmd &` in a script). Outside the main thread (an embedding
  program owns signals) no handler is installed: no preemption save.
  """

  def __init__(self, *, sigint: bool):
    self.raised = None
    self.previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,):
      try:
        if sig == signal.SIGINT and signal.getsignal(sig) == signal.SIG_IGN:
          continue
        self.previous[sig] = signal.signal(sig, self._on_signal)
      except ValueError:
        pass

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if signum == signal.SIGINT:
      if self.raised == 'SIGINT':
        raise KeyboardInterrupt
      # os.write: a print here could re-enter a print the loop is in the middle of.
      os.write(1, b'Ctrl-C: stopping after this step, which is saved (Ctrl-C again: stop now, no save)\n')
    self.raised = signal.Signals(signum).name

  def restore(self) -> None:
    for sig, handler in self.previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------------------
def make_train_iterator(config, mesh, *, start_state):
  """The real input pipeline (data/pipeline.py): the rows of each global batch this process's devices hold,
  so the global batch is the same for any number of processes."""
  try:
    from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.UsageError(f'the input pipeline ovseg_jax.data.pipeline is not importable: {e}') from e
  rows = sharding_lib.process_batch_rows(mesh, config.train.global_batch_size)
  return pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), host_rows=rows,
                                      start_state=start_state)


def train(config: ml_collections.ConfigDict, workdir: str, *, make_batches=None) -> dict:
  """Trains (or resumes training) in `workdir` up to the configured length. -> the last logged metrics.

  make_batches(start_state) -> iterator of host batches with `.get_state()`; default: the real pipeline.
  Tests and benchmarks pass `tests/train_data.in_memory_batches`.
  """
  # ---------------------------------------------------------------- workdir, logging, distributed, mesh
  sharding_lib.maybe_initialize_distributed(config)
  ckpt_lib.make_workdir(workdir)   # a file, or a remote workdir without its filesystem package: one line
  mesh = sharding_lib.make_mesh(config.mesh)
  gbs = config.train.global_batch_size
  sharding_lib.check_batch_divisible(gbs, mesh)
  say('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ---------------------------------------------------------------- checkpoints; a resume is checked first
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir),
                                    save_every=config.train.checkpoint_every_steps,
                                    keep=config.train.keep_checkpoints, config=config)
  try:   # before anything is written: a resume may change only ckpt_lib.RESUME_MAY_CHANGE keys
    changes = ckpt_lib.check_resume(config, workdir, ckpt)
  except BaseException:
    ckpt.close()
    raise
  if changes is None:   # a fresh run
    ckpt_lib.write_config(config, workdir)
  elif changes:
    say('resuming with changed settings: %s', ', '.join(changes))
  resume_step = ckpt.latest_step()

  # ---------------------------------------------------------------- input (resumed at its saved position)
  def open_input(data_state):
    if make_batches is not None:
      return make_batches(data_state)
    return make_train_iterator(config, mesh, start_state=data_state)

  data_state, unreadable = None, []   # unreadable: newer steps skipped by the fallback (kept on disk)
  if resume_step is not None:
    resume_step, data_state, unreadable = ckpt.restore_newest(ckpt.restore_data_state)
  batches = open_input(data_state)
  steps_per_epoch = max(int(getattr(batches, 'num_examples', gbs)) // gbs, 1)
  warmup_steps, total_steps = optim.warmup_and_total_steps(config, steps_per_epoch)
  if resume_step is not None and resume_step >= total_steps:
    ckpt.close()
    print(f'{workdir} is already trained to step {resume_step} of {total_steps}', flush=True)
    return dict(step=resume_step)
  # The validation split of config.eval_during_training is read now: a missing folder fails before compiling.
  in_loop = train_eval.InLoopEval(config, workdir, total_steps)

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
    step, (state, data_state, _), more = ckpt.restore_newest(lambda s: ckpt.restore(target, s), resume_step)
    if step != resume_step:   # the newer steps do not read: the input goes back to this step's position too
      getattr(batches, 'close', lambda: None)()
      batches, resume_step = open_input(data_state), step
    if unreadable + more:
      say('moved the unreadable checkpoint step(s) %s to %s (kept for you to inspect; nothing was deleted)',
          ', '.join(map(str, unreadable + more)), ckpt.set_aside(unreadable + more))
    ckpt_lib.record_resume(config, workdir, resume_step, changes)   # config.json: what the run goes on with
    say('resumed from %s at step %d', ckpt.directory, resume_step)
  else:
    state, shardings = sharding_lib.create_sharded_state(init_fn, mesh, config.sharding, init_rng)
    state = apply_init(state, config)
  n_params = step_lib.param_count(state['params'])
  say('params: %.2fM; per-device state %.1f MiB', n_params / 1e6,
               sharding_lib.per_device_bytes(state) / 2 ** 20)

  # ---------------------------------------------------------------- the compiled update step
  # Two compiled variants when the paper_single lambda starts at 0: without the mask branch before
  # `mask_start`, with it from there on (the second is compiled when first needed). With text buckets
  # (data.text_buckets, text_buckets.py) each bucket length is one more variant, compiled when first met.
  mask_start = step_lib.mask_phase_start(config, total_steps)

  def global_batch(host_batch):   # the texts cut to the global batch's bucket (the same on every host)
    return sharding_lib.host_batch_to_global(text_buckets.bucket_batch(host_batch, config)[0], mesh)

  first = next(batches)
  first_state = batches.get_state()
  first_global = global_batch(first)
  peak = train_monitor.machine_peak_flops(config)
  compiled_steps = {}  # (mask_branch, text length) -> (compiled step, its FLOPs)

  def compiled_step(mask_branch: bool, batch):
    key = (mask_branch, int(batch['text_ids'].shape[1]))
    if key not in compiled_steps:
      t0 = time.perf_counter()
      fn = step_lib.jit_train_step(config, model, tx, schedule, total_steps, mesh, shardings,
                                   mask_branch=mask_branch)
      compiled = fn.lower(state, batch, step_rng).compile()
      flops = train_monitor.compiled_flops(compiled)
      what = 'the step' if mask_start in (0, total_steps) else (
          f'the step with the mask branch (steps >= {mask_start})' if mask_branch else
          f'the step without the mask branch (lambda = 0 before step {mask_start})')
      if text_buckets.enabled(config):
        what += f' for texts of {key[1]} tokens'
      say('compiled %s in %.1fs: %.2f GFLOP per step; peak %.1f GFLOP/s', what, time.perf_counter() - t0,
          flops / 1e9, peak / 1e9)
      compiled_steps[key] = (compiled, flops)
    return compiled_steps[key]

  step = int(jax.device_get(state['step']))
  compiled, flops = compiled_step(step >= mask_start, first_global)

  # ---------------------------------------------------------------- loop
  stop = StopFlag(sigint=jax.process_count() == 1)
  writer = train_monitor.MetricWriter(workdir, start_step=step)   # drops rows after `step` of a resumed run
  progress = Progress(writer, ckpt, step=step, total_steps=total_steps, global_batch=gbs,
                      log_every=config.train.log_every_steps, flops=flops, peak=peak)

  def evaluate(step: int, state: dict) -> None:
    """Zero-shot eval (+ WORKDIR/best/) on every process; a failure is one line, not the end of the run."""
    try:
      scores, line = in_loop.run(step, state)
    except Exception as e:  # pylint: disable=broad-except  (an unreadable image must not stop training)
      say('eval at step %d failed, training goes on: %s: %s', step, type(e).__name__,
          (str(e).splitlines() or [''])[0])
      return
    writer.write(step, scores)
    if line:
      say(line)
    progress.restart(step, progress.flops)   # the next throughput line times train steps only

  def save(step: int, state: dict, data_iter_state, force: bool = False) -> None:
    meta = dict(rng=np.asarray(jax.random.key_data(step_rng)).tolist(), time=time.time(),
                total_steps=total_steps)
    if ckpt.save(step, state, data_iter_state, meta, force=force):
      writer.sync()

  try:
    batch, data_iter_state = first_global, first_state
    while step < total_steps:
      key = (step >= mask_start, int(batch['text_ids'].shape[1]))
      if key not in compiled_steps:   # a new variant (mask branch on, a new text bucket): untimed compile
        progress.check(step)   # MFU of the steps so far uses the FLOPs of their variants
        compiled_step(key[0], batch)
        progress.restart(step, progress.flops)
      compiled, flops = compiled_steps[key]
      state, metrics = compiled(state, batch, step_rng)
      step += 1
      progress.add(step, metrics, flops)
      is_ckpt = step % config.train.checkpoint_every_steps == 0
      if is_ckpt or step % config.train.log_every_steps == 0 or step == total_steps:
        progress.check(step, force_log=step == total_steps)
      if is_ckpt:
        save(step, state, data_iter_state)
      if in_loop.due(step):
        evaluate(step, state)
      # One host's SIGTERM must not start a save the others skip: multi-host uses the preemption service.
      if (stop.raised if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)):
        progress.check(step, force_log=True)
        if ckpt.latest_step() != step:
          save(step, state, data_iter_state, force=True)
        ckpt.wait_until_finished()
        if stop.raised == 'SIGINT':
          raise Interrupted(f'interrupted (Ctrl-C) at step {step}: saved step {step} to {ckpt.directory}')
        say('preempted (SIGTERM): saved step %d to %s, exiting', step, ckpt.directory)
        break
      if step < total_steps:
        batch = global_batch(next(batches))
        data_iter_state = batches.get_state()
    else:
      progress.check(step, force_log=True)
      if ckpt.latest_step() != step:
        save(step, state, data_iter_state, force=True)
  finally:
    ckpt.close()
    writer.close()
    stop.restore()
  return dict(progress.last, step=step)


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------
def interrupt_message(e: KeyboardInterrupt, workdir: str) -> str:
  """The one line a Ctrl-C prints: what was saved, and where."""
  if isinstance(e, Interrupted):   # in the loop: the step was finished and saved
    return str(e)
  steps = ckpt_lib.saved_steps(workdir)   # before the loop, a second Ctrl-C, or several processes
  return (f'interrupted (Ctrl-C) before a save; the newest checkpoint is step {steps[-1]} in '
          f'{ckpt_lib.train_checkpoint_dir(workdir)}' if steps else 'interrupted (Ctrl-C); no checkpoint was saved')


def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    print('error: --config and --workdir are required: python -m ovseg_jax.train --config=configs/X.py[:variant] '
          '--workdir=DIR [--config.KEY=VALUE ...]', file=sys.stderr)
    return 2
  quiet_library_logging()
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt as e:   # Ctrl-C: one line and 130 (128 + SIGINT), as a shell reports it
    print(interrupt_message(e, _WORKDIR.value), file=sys.stderr)
    return 130
  except (errors.UsageError, TrainingDiverged, FileNotFoundError, ValueError) as e:  # expected: one line, no trace
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 1
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
    lines = [line for line in str(e).splitlines() if line.strip()] or [repr(e)]
    if 'Error whilst parsing config file' in lines[0]:   # the config file raised: its own last line says why
      spec = next((a for a in argv[1:] if a.startswith('--config=')), '--config')
      print(f'error: {spec}: {lines[-1]}', file=sys.stderr)
      sys.exit(2)
    bad = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    why = lines[0]
    if why.strip('"\'') and ' ' not in why:   # ml_collections reports an unknown key as just its (quoted) name
      why = f'unknown key {why.strip(chr(34) + chr(39))}'

    print(f'error: bad config override in {bad}: {why} (every key is listed in configs/common.py)',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
