r"""Trains OVSegmentor (paper Sec. 3.2, 4.1; the authors' recipe in official notes §3).

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
Input: always the real pipeline (data/pipeline.py); only the Python API `train_and_evaluate(...,
make_batches=)` takes another source (tests and benchmarks use train_data.in_memory_batches).
Non-finite loss / gradient: the step is a no-op on device (train_step.py); the host checks the per-step flags
at every log and checkpoint step (no per-step sync) and stops with the first bad step number before any save,
so the last checkpoint on disk is the last good one. SIGTERM: save the current step, wait, exit 0.
MFU = XLA cost-analysis FLOPs of the compiled step / step time / peak (config.train.peak_tflops_per_device,
else a float32 matmul measured at start-up).
"""

import json
import os
import shutil
import signal
import sys
import tempfile
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import fileio
from ovseg_jax import optim
from ovseg_jax import sharding as sharding_lib
from ovseg_jax import train_step as step_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'configs/X.py[:variant]', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder (local or gs://): config, checkpoints, metrics.')


class UsageError(Exception):
  """An expected, user-fixable problem: printed as one line, no traceback."""


class TrainingDiverged(Exception):
  """A non-finite loss or gradient norm."""


# ----------------------------------------------------------------------------------------------------------
# Small helpers: console, config file, metric writers, MFU peak, init_from.
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


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config (every default and override) of this run."""
  if jax.process_index() == 0:
    fileio.write_text(fileio.join(workdir, 'config.json'), config.to_json_best_effort(indent=1, sort_keys=True))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = fileio.join(workdir, 'config.json')
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a training workdir: {path} is missing')
  return ml_collections.ConfigDict(json.loads(fileio.read_text(path)))


class MetricWriter:
  """TensorBoard event files (tensorboardX, no TensorFlow) + WORKDIR/metrics.jsonl, on process 0 only.

  Local workdir: each record is appended to metrics.jsonl and flushed; events are written to WORKDIR/tb.
  Remote workdir (object stores cannot append): the records are kept in memory after the file's existing
  ones (a resumed run continues it) and the whole metrics.jsonl is rewritten; events are written to a local
  temporary folder and copied to WORKDIR/tb. Both are uploaded by `sync()`: on the first record, then at
  most every `sync_seconds`, at every checkpoint (train loop) and at close().
  """

  def __init__(self, workdir: str, sync_seconds: float = 60.0):
    self.active = jax.process_index() == 0
    self.remote = fileio.is_remote(workdir)
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.jsonl_path = fileio.join(workdir, 'metrics.jsonl')
    self.tb_dir = fileio.join(workdir, 'tb')
    if self.remote:
      self.sync_seconds = sync_seconds
      self.local_tb = tempfile.mkdtemp(prefix='ovseg_tb_')
      self.tb = SummaryWriter(self.local_tb)
      old = fileio.read_text(self.jsonl_path) if fileio.exists(self.jsonl_path) else ''
      self.lines = [line + '\n' for line in old.splitlines() if line.strip()]
      self.dirty, self.last_sync = False, float('-inf')
    else:
      self.tb = SummaryWriter(self.tb_dir)
      self.jsonl = fileio.open(self.jsonl_path, 'a')

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    line = json.dumps(dict(step=step, **scalars)) + '\n'
    if self.remote:
      self.lines.append(line)
      self.dirty = True
      if time.monotonic() - self.last_sync >= self.sync_seconds:
        self.sync()
    else:
      self.jsonl.write(line)
      self.jsonl.flush()

  def sync(self) -> None:
    """Uploads metrics.jsonl and the TensorBoard event files (remote workdir; local: nothing to do)."""
    if not (self.active and self.remote):
      return
    self.tb.flush()
    if self.dirty:
      fileio.write_text(self.jsonl_path, ''.join(self.lines))
      self.dirty = False
    names = sorted(os.listdir(self.local_tb))
    if names:
      fileio.makedirs(self.tb_dir)
    for name in names:
      fileio.copy(os.path.join(self.local_tb, name), fileio.join(self.tb_dir, name))
    self.last_sync = time.monotonic()

  def close(self) -> None:
    if not self.active:
      return
    self.tb.close()
    if self.remote:
      self.sync()
      shutil.rmtree(self.local_tb, ignore_errors=True)
    else:
      self.jsonl.close()


def measure_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """FLOP/s of a float32 [n, n] @ [n, n] on one device (median of `reps`): the MFU denominator."""
  dev = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / float(np.median(times))


def machine_peak_flops(config) -> float:
  """Peak FLOP/s of all devices together: config.train.peak_tflops_per_device x devices, or measured.

  Fake CPU devices share the host's cores, so on CPU the measured one-device matmul peak is the whole peak.
  """
  if config.train.peak_tflops_per_device > 0:
    return config.train.peak_tflops_per_device * 1e12 * jax.device_count()
  peak = measure_matmul_peak()
  return peak if jax.devices()[0].platform == 'cpu' else peak * jax.device_count()


def compiled_flops(compiled) -> float:
  """FLOPs of one step over all devices (XLA's cost analysis counts one device's partitioned program)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get('flops', 0.0)) * jax.device_count()


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def _read_init(path: str):
  """An init source -> (params partial tree, batch_stats or None, teacher img_encoder params or None).

  Accepts a training workdir (its latest checkpoint), an inference checkpoint (`convert official`,
  `export`; a `teacher/` beside it is the EMA teacher), a `convert dino` folder, or a `convert bert` folder.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  if not fileio.exists(path):
    raise UsageError(f'--config.train.init_from / init_bert: {path} does not exist')
  ckpt_dir = ckpt_lib.train_checkpoint_dir(path)
  if fileio.isdir(ckpt_dir):
    raw = ckpt_lib.TrainCheckpointer(ckpt_dir, save_every=1, keep=0).restore_params()
    return raw['params'], raw.get('batch_stats'), raw.get('ema') or None
  var_dir = fileio.join(path, ckpt_lib.VARIABLES)
  if not fileio.isdir(var_dir):
    raise UsageError(f'{path} is neither a training workdir nor a converted checkpoint (no {var_dir}); '
                     'write one with `python -m ovseg_jax.convert official|dino|bert --src ... --dst DIR`')
  with ocp.StandardCheckpointer() as ckptr:
    variables = jax.tree.map(np.asarray, ckptr.restore(var_dir))
  teacher = None
  teacher_dir = fileio.join(path, 'teacher')
  if fileio.isdir(teacher_dir):
    with ocp.StandardCheckpointer() as ckptr:
      teacher = jax.tree.map(np.asarray, ckptr.restore(teacher_dir))['params']
  params = variables['params']
  if fileio.isfile(fileio.join(path, 'text_config.json')) or 'embeddings' in params:
    params = {'text_encoder': params}   # `convert bert` writes the bare BertModel tree
  return params, variables.get('batch_stats'), teacher


def _place(target: dict, loaded: dict, what: str) -> tuple[dict, int]:
  """Replaces the leaves of `target` found in `loaded` (same path and shape). Any loaded leaf that has no
  place is an error (never silently dropped). -> (new tree, number of leaves placed)."""
  flat_t = dict(optim.named_leaves(target))
  placed = {}
  for name, x in optim.named_leaves(loaded):
    if name not in flat_t:
      raise UsageError(f'{what}: {name} has no place in the model (model config mismatch?)')
    if tuple(np.shape(x)) != tuple(flat_t[name].shape):
      raise UsageError(f'{what}: {name} has shape {np.shape(x)}, the model expects {flat_t[name].shape}')
    placed[name] = x

  def one(path, x):
    name = optim.path_str(path)
    return jax.device_put(np.asarray(placed[name], x.dtype), x.sharding) if name in placed else x
  return jax.tree_util.tree_map_with_path(one, target), len(placed)


def apply_init(state: dict, config: ml_collections.ConfigDict) -> dict:
  """init_from / init_bert into a freshly initialised state; stage 2: teacher <- visual encoder."""
  teacher = None
  for key in ('init_from', 'init_bert'):
    path = config.train[key]
    if not path:
      continue
    params, batch_stats, t = _read_init(path)
    state['params'], n = _place(state['params'], params, path)
    say('%s: placed %d parameter arrays from %s', key, n, path)
    if batch_stats:
      state['batch_stats'], n = _place(state['batch_stats'], batch_stats, path)
      say('%s: placed %d BN statistics from %s', key, n, path)
    teacher = t if t is not None else teacher
  if step_lib.uses_teacher(config) and (config.train.init_from or config.train.init_bert):
    if teacher is None or config.train.init_teacher_from_student:
      teacher = jax.tree.map(np.asarray, state['params']['img_encoder'])   # official stage-2 init
    # Fresh device buffers (not aliases of params): the step donates the state leaf by leaf.
    state['ema'], _ = _place(state['ema'], teacher, 'teacher')
  return state


# ----------------------------------------------------------------------------------------------------------
# The trainer.
# ----------------------------------------------------------------------------------------------------------
def make_train_iterator(config, *, start_state):
  """The real input pipeline (data/pipeline.py), this process's slice."""
  try:
    from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UsageError(f'the input pipeline ovseg_jax.data.pipeline is not importable: {e}') from e
  return pipeline.make_train_iterator(config, process_index=jax.process_index(),
                                      process_count=jax.process_count(), start_state=start_state)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, make_batches=None) -> dict:
  """Runs (or resumes) training in `workdir`. -> the last logged metrics.

  make_batches(start_state) -> iterator of host batches with `.get_state()`; default: the real pipeline.
  Tests and benchmarks pass `train_data.in_memory_batches`.
  """
  # ---------------------------------------------------------------- workdir, logging, distributed, mesh
  sharding_lib.maybe_initialize_distributed(config)
  fileio.makedirs(workdir)   # also: a remote workdir without its filesystem package stops here, in one line
  write_config(config, workdir)
  mesh = sharding_lib.make_mesh(config.mesh)
  gbs = config.train.global_batch_size
  sharding_lib.check_batch_divisible(gbs, mesh)
  say('mesh %s over %d devices (%d processes)', dict(mesh.shape), jax.device_count(),
               jax.process_count())

  # ---------------------------------------------------------------- checkpoints (before input: data state)
  ckpt = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir),
                                    save_every=config.train.checkpoint_every_steps,
                                    keep=config.train.keep_checkpoints)
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
  abstract = jax.eval_shape(init_fn, init_rng)
  shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
  if resume_step is not None:
    state, _, _ = ckpt.restore(sharding_lib.with_shardings(abstract, shardings), resume_step)
    say('resumed from %s at step %d', ckpt.directory, resume_step)
  else:
    state = jax.jit(init_fn, out_shardings=shardings)(init_rng)
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
  peak = machine_peak_flops(config)
  compiled_steps = {}  # mask_branch -> (compiled step, its FLOPs)

  def compiled_step(mask_branch: bool):
    if mask_branch not in compiled_steps:
      t0 = time.perf_counter()
      fn = step_lib.jit_train_step(config, model, tx, schedule, total_steps, mesh, shardings,
                                   mask_branch=mask_branch)
      compiled = fn.lower(state, first_global, step_rng).compile()
      flops = compiled_flops(compiled)
      what = 'the step' if mask_start in (0, total_steps) else (
          f'the step with the mask branch (steps >= {mask_start})' if mask_branch else
          f'the step without the mask branch (lambda = 0 before step {mask_start})')
      say('compiled %s in %.1fs: %.2f GFLOP per step; peak %.1f GFLOP/s', what, time.perf_counter() - t0,
          flops / 1e9, peak / 1e9)
      compiled_steps[mask_branch] = (compiled, flops)
    return compiled_steps[mask_branch]

  compiled, flops = compiled_step(int(jax.device_get(state['step'])) >= mask_start)

  # ---------------------------------------------------------------- preemption
  preempted = {'flag': False}

  def on_sigterm(signum, frame):  # pylint: disable=unused-argument
    preempted['flag'] = True
  try:
    previous_handler = signal.signal(signal.SIGTERM, on_sigterm)
  except ValueError:   # not the main thread (an embedding program owns signals): no preemption save
    previous_handler = None

  # ---------------------------------------------------------------- loop
  writer = MetricWriter(workdir)
  step = int(jax.device_get(state['step']))
  pending: list[tuple[int, dict]] = []   # device metrics since the last check (no per-step host sync)
  last: dict[str, float] = {}
  t_last, step_last = time.perf_counter(), step

  def check_and_log(force_log: bool) -> None:
    nonlocal t_last, step_last, last, pending
    if not pending:
      return
    host = jax.device_get(pending)
    for s, m in host:
      if m['finite'] < 1.0:
        ckpt.wait_until_finished()
        raise TrainingDiverged(f'non-finite loss or gradient at step {s} (loss={m["loss"]}, grad_norm='
                               f'{m["grad_norm"]}); stopped, the last good checkpoint is step '
                               f'{ckpt.latest_step()} in {ckpt.directory}')
    pending = []
    if not force_log and step % config.train.log_every_steps:
      return
    dt, ds = time.perf_counter() - t_last, step - step_last
    t_last, step_last = time.perf_counter(), step
    last = {k: float(np.mean([m[k] for _, m in host])) for k in host[-1][1]}
    if ds > 0 and dt > 0:
      sec = dt / ds
      last.update(step_seconds=sec, img_per_s=gbs / sec, img_per_s_per_device=gbs / sec / jax.device_count(),
                  mfu=flops / sec / peak)
    writer.write(step, last)
    if jax.process_index() == 0:
      line = (f'step {step}/{total_steps} | loss {last["loss"]:.4f} (contrast {last["loss_contrast"]:.4f} '
              f'entity {last["loss_entity"]:.4f} mask {last["loss_mask"]:.4f}) | lr {last["lr"]:.2e}')
      if 'loss_group_entity' in last:  # optional, not in the paper (losses.group_entity_loss)
        line += f' | group entity {last["loss_group_entity"]:.4f} acc {last["group_entity_acc"]:.2f}'
      if 'step_seconds' in last:
        line += (f' | {last["img_per_s"]:.1f} img/s ({last["img_per_s_per_device"]:.2f}/dev) | '
                 f'ETA {_fmt_eta((total_steps - step) * last["step_seconds"])} | MFU {100 * last["mfu"]:.1f}%')
      say(line)

  def save(force: bool = False) -> None:
    meta = dict(rng=np.asarray(jax.random.key_data(step_rng)).tolist(), time=time.time(),
                total_steps=total_steps)
    if ckpt.save(step, state, data_iter_state, meta, force=force):
      writer.sync()

  try:
    batch, data_iter_state = first_global, first_state
    while step < total_steps:
      if step == mask_start and mask_start > 0:
        check_and_log(force_log=False)   # MFU of the steps so far uses the FLOPs of their variant
        compiled, flops = compiled_step(True)
        t_last, step_last = time.perf_counter(), step
      state, metrics = compiled(state, batch, step_rng)
      step += 1
      pending.append((step, metrics))
      is_ckpt = step % config.train.checkpoint_every_steps == 0
      if is_ckpt or step % config.train.log_every_steps == 0 or step == total_steps:
        check_and_log(force_log=step == total_steps)
      if is_ckpt:
        save()
      # One host's SIGTERM must not start a save the others skip: multi-host uses the preemption service.
      if (preempted['flag'] if jax.process_count() == 1 else ckpt.manager.reached_preemption(step)):
        check_and_log(force_log=True)
        if ckpt.latest_step() != step:
          save(force=True)
        ckpt.wait_until_finished()
        say('preempted (SIGTERM): saved step %d to %s, exiting', step, ckpt.directory)
        break
      if step < total_steps:
        batch = sharding_lib.host_batch_to_global(next(batches), mesh)
        data_iter_state = batches.get_state()
    else:
      check_and_log(force_log=True)
      if ckpt.latest_step() != step:
        save(force=True)
  finally:
    ckpt.close()
    writer.close()
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
  return dict(last, step=step)


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------
def main(argv):
  del argv
  if _CONFIG.value is None or not _WORKDIR.value:
    print('usage: python -m ovseg_jax.train --config=configs/X.py[:variant] --workdir=DIR '
          '[--config.key=value ...]', file=sys.stderr)
    return 2
  quiet_library_logging()
  try:
    train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (UsageError, TrainingDiverged, FileNotFoundError, ValueError) as e:  # expected: one line, no trace
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    sys.exit(1)
  return 0


def parse_flags(argv):
  """absl flag parsing; a bad `--config.*` override (unknown key, wrong type) is one line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, TypeError, ValueError) as e:
    bad = ' '.join(a for a in argv[1:] if a.startswith('--config.'))
    why = (str(e).splitlines() or [repr(e)])[0].strip('"\'')
    if why.strip('"\'') and ' ' not in why:   # ml_collections reports an unknown key as just its name
      why = f'unknown key {why.strip(chr(34) + chr(39))}'

    print(f'error: bad config override in {bad}: {why} (every key is listed in configs/common.py)',
          file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
