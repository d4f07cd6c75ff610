"""What the trainer records about itself: metric files, throughput, ETA and MFU (big_vision keeps its metric
writer and Chrono in `utils`).

    writer = MetricWriter(workdir, start_step=step) # WORKDIR/metrics.jsonl + WORKDIR/tb, process 0 only
    peak = machine_peak_flops(config)               # FLOP/s of all devices: the MFU denominator
    flops = compiled_flops(step.lower(...).compile())
    speed = throughput(seconds, steps, global_batch, flops, peak)   # step_seconds, img/s, MFU
    line = progress_line(step, total_steps, {**metrics, **speed})

MFU = XLA cost-analysis FLOPs of the compiled step / step time / peak (config.train.peak_tflops_per_device,
else a float32 matmul measured at start-up).
"""

import json
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax import fileio


class MetricWriter:
  """TensorBoard event files (tensorboardX, no TensorFlow) + WORKDIR/metrics.jsonl, on process 0 only.

  Local workdir: each record is appended to metrics.jsonl and flushed; events are written to WORKDIR/tb.
  Remote workdir (object stores cannot append): the records are kept in memory after the file's existing
  ones (a resumed run continues it) and the whole metrics.jsonl is rewritten; events are written to a local
  temporary folder and copied to WORKDIR/tb. Both are uploaded by `sync()`: on the first record, then at
  most every `sync_seconds`, at every checkpoint (train loop) and at close().

  `start_step`: the step the run starts from (0, or the resumed checkpoint's; the trainer passes it). The
  file's rows after it were logged by the run that came before, past its last checkpoint, and are logged
  again now: they are dropped (and TensorBoard's are purged), so each step has one row. So is a torn last
  line of a killed writer. None: the file is continued as it is.
  """

  def __init__(self, workdir: str, sync_seconds: float = 60.0, start_step: int | None = None):
    self.active = jax.process_index() == 0
    self.remote = fileio.is_remote(workdir)
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self.jsonl_path = fileio.join(workdir, 'metrics.jsonl')
    self.tb_dir = fileio.join(workdir, 'tb')
    old = fileio.read_text(self.jsonl_path) if fileio.exists(self.jsonl_path) else ''
    if start_step is None:
      kept = [line + '\n' for line in old.splitlines() if line.strip()]
    else:
      kept = rows_up_to(old, start_step)
    # purge_step: TensorBoard hides the earlier files' events from this step on
    purge = {'purge_step': start_step + 1} if old and start_step is not None else {}
    if self.remote:
      self.sync_seconds = sync_seconds
      self.local_tb = tempfile.mkdtemp(prefix='ovseg_tb_')
      self.tb = SummaryWriter(self.local_tb, **purge)
      self.lines = kept
      self.dirty, self.last_sync = len(kept) != len(old.splitlines()), float('-inf')
    else:
      self.tb = SummaryWriter(self.tb_dir, **purge)
      if start_step is not None and ''.join(kept) != old:   # rewritten whole: a kill leaves either file
        tmp = self.jsonl_path + '.tmp'
        fileio.write_text(tmp, ''.join(kept))
        os.replace(tmp, self.jsonl_path)
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


def rows_up_to(text: str, step: int) -> list[str]:
  """The metrics.jsonl lines (each with its newline) whose `step` is at most `step`; lines that do not parse
  (a torn write) are dropped."""
  kept = []
  for line in text.splitlines():
    try:
      row = json.loads(line)
    except ValueError:
      continue
    if isinstance(row, dict) and isinstance(row.get('step'), int) and row['step'] > step:
      continue
    kept.append(line + '\n')
  return kept


# ----------------------------------------------------------------------------------------------------------
# MFU: FLOPs of the compiled step and the peak FLOP/s of the machine.
# ----------------------------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------------------------
# Progress: throughput, ETA and the console line.
# ----------------------------------------------------------------------------------------------------------
def throughput(seconds: float, steps: int, global_batch: int, flops: float, peak: float) -> dict[str, float]:
  """`steps` steps in `seconds` -> step_seconds, img_per_s, img_per_s_per_device, mfu (empty if no time)."""
  if steps <= 0 or seconds <= 0:
    return {}
  sec = seconds / steps
  return dict(step_seconds=sec, img_per_s=global_batch / sec,
              img_per_s_per_device=global_batch / sec / jax.device_count(), mfu=flops / sec / peak)


def fmt_eta(seconds: float) -> str:
  """Seconds -> '1h02m03s'."""
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s'


def progress_line(step: int, total_steps: int, m: dict[str, float]) -> str:
  """The console line of a log step: losses and lr, then speed, ETA and MFU when `m` has `throughput`'s."""
  line = (f'step {step}/{total_steps} | loss {m["loss"]:.4f} (contrast {m["loss_contrast"]:.4f} '
          f'entity {m["loss_entity"]:.4f} mask {m["loss_mask"]:.4f}) | lr {m["lr"]:.2e}')
  if 'loss_group_match' in m:
    line += (f' | match {m["loss_group_match"]:.4f} acc {m["group_match_acc"]:.2f} '
             f'bg {m["group_match_bg_acc"]:.2f}')
  if 'groups_used' in m:   # group_health: a collapse shows here long before an evaluation does
    line += (f' | groups {m["groups_used"]:.2f} cos tok {m["token_cosine"]:.2f} q {m["query_cosine"]:.2f} '
             f'H {m["assign_entropy"]:.2f}')
  if 'step_seconds' in m:
    line += (f' | {m["img_per_s"]:.1f} img/s ({m["img_per_s_per_device"]:.2f}/dev) | '
             f'ETA {fmt_eta((total_steps - step) * m["step_seconds"])} | MFU {100 * m["mfu"]:.1f}%')
  return line
