"""The performance table: our code vs the authors' PyTorch figures on this CPU, next to a measured peak.

    python -m bench.perf [--parts window,slide,train,mfu,mask] [--runs 5] [--config.model.dtype=bfloat16 ...]

One run prints, each next to the float32 matmul peak measured around its own calls (the CPU is shared, so
every timed call gets its own peak and its MFU is taken against that one):
  window  vitb `encode_decode` of one 448 x 448 window, 21 VOC classes (`Segmenter.window_logits`, batch 1)
  slide   vitb `Segmenter.segment` of a 448 x 673 image (3 windows), resize + softmax included
  train   vitb stage-2 train step (contrast + entity + mask loss, EMA teacher), 224 px, batch 8 and 4
  mfu     vits train step at 224, batch 8, stage 1 (the bench.train_step contract) and stage 2
  mask    vits stage-2 step with the matching + mask loss on vs off (same forward otherwise), alternated

Everything is the real code: `train_step.jit_train_step` on a 1-device mesh (random init, the in-memory
batch source) and `inference.Segmenter` with random init weights. fp32 unless `--config.model.dtype=...`.
Times are the median of `--runs` calls after one warm-up call (which compiles). MFU = model FLOPs / time /
peak, with model FLOPs from the analytic count (bench/flops.py) and the peak sampled right before and after
each call (`timed`); XLA's compiled cost analysis (all ops, incl. elementwise) is printed beside it.

"mask off" replaces `losses.mask_consistency_loss` inside the step by a function that returns 0 and
aux arrays of the same shapes, so the teacher forward, the entity text pass and every BN statistic still run:
the difference is exactly the mask logits + upsampling + matching cost + Hungarian + Dice (+ their backward).
"""

import contextlib
import json
import os
import statistics
import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bench import flops as flops_lib
from configs import vitb as vitb_config
from configs import vits as vits_config
from ovseg_jax import cli
from ovseg_jax import eval_datasets
from ovseg_jax import inference
from ovseg_jax import optim
from ovseg_jax import sharding
from ovseg_jax import tokenizer as tokenizer_lib
from ovseg_jax import train_step as ts
from tests import train_data

CONFIGS = {'vits': vits_config, 'vitb': vitb_config}
AUTHORS_S = {'window': 1.08, 'slide': 3.3, 'train_b8': 8.6, 'train_b4': 4.5}
TARGETS = {'window': 0.54, 'slide': 1.7, 'train_b8': 4.3, 'mfu_fraction': 0.60, 'mask_overhead': 0.10}


# ------------------------------------------------------------------------------------------------ timing

def matmul_peak(n: int = 2048, reps: int = 3) -> float:
  """FLOP/s of a jitted float32 [n, n] @ [n, n] (median of `reps`)."""
  f, a = _peak_fn(n)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n ** 3 / statistics.median(times)


_PEAK = {}


def _peak_fn(n: int):
  """(jitted matmul, its [n, n] input), compiled once per n."""
  if n not in _PEAK:
    f = jax.jit(lambda x: x @ x)
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32))
    f(a).block_until_ready()
    _PEAK[n] = (f, a)
  return _PEAK[n]


def timed(fn, runs: int, flop: float) -> dict:
  """fn() once (warm-up), then `runs` timed calls, each between two matmul-peak samples.

  The CPU is shared, so the load changes from call to call: each call's MFU is its FLOP rate over the mean
  of the peaks measured right before and right after it, and the reported MFU is the median of those.
  """
  fn()
  times, peaks, mfus = [], [], []
  before = matmul_peak()
  for _ in range(runs):
    t = time.perf_counter()
    fn()
    dt = time.perf_counter() - t
    after = matmul_peak()
    peak = 0.5 * (before + after)
    times.append(dt)
    peaks.append(peak)
    mfus.append(flop / dt / peak)
    before = after
  return dict(s=round(statistics.median(times), 3), times=[round(x, 3) for x in times],
              peak_gflops=round(statistics.median(peaks) / 1e9, 1), mfu=round(statistics.median(mfus), 3))


def apply_overrides(c: ml_collections.ConfigDict, overrides) -> None:
  """'model.dtype=bfloat16' style overrides (value parsed as the type of the current value)."""
  for item in overrides or ():
    key, value = item.split('=', 1)
    node = c
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    old = node[leaf]
    if isinstance(old, bool):
      node[leaf] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(old, (int, float)):
      node[leaf] = type(old)(value)
    else:
      node[leaf] = value


# ------------------------------------------------------------------------------------------------ training

def train_config(name: str, stage: int, batch: int, overrides=()) -> ml_collections.ConfigDict:
  c = CONFIGS[name].get_config(f'stage={stage}')
  c.unlock()
  c.train.global_batch_size = batch
  c.train.total_steps = 1000
  c.optim.warmup_steps = 10
  c.mesh = (('data', 1), ('fsdp', 1))
  apply_overrides(c, overrides)
  c.lock()
  return c


@contextlib.contextmanager
def mask_loss_off():
  """Inside: the step computes no mask loss (0, zero aux of the official shapes); everything else runs."""
  real = ts.losses.mask_consistency_loss

  def zero(online_q, teacher_q, teacher_k, grid, group_logits, **kw):
    del teacher_q, kw
    b, k = group_logits.shape
    l = teacher_k.shape[1]
    z = jnp.zeros((b, k, l), jnp.float32)
    aux = dict(cols=jnp.zeros((b, k), jnp.int32), detached=jnp.zeros((b, k), bool),
               dice=jnp.zeros((b,), jnp.float32), cost=jnp.zeros((b, k, k), jnp.float32),
               online_logits=z, teacher_logits=z)
    return 0.0 * jnp.sum(online_q[:, :0]), aux

  ts.losses.mask_consistency_loss = zero
  try:
    yield
  finally:
    ts.losses.mask_consistency_loss = real


def train_runner(c: ml_collections.ConfigDict, mask_off: bool = False):
  """-> (step() that runs one blocking step, info dict with compile time and XLA FLOPs)."""
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  model = ts.make_model(c)
  total = c.train.total_steps
  tx, sched = optim.make_optimizer(c.optim, total_steps=total, warmup_steps=c.optim.warmup_steps,
                                   global_batch=c.train.global_batch_size)
  state, shardings = sharding.create_sharded_state(lambda r: ts.init_state(c, model, tx, r), mesh,
                                                   c.sharding, jax.random.key(0))
  jitted = ts.jit_train_step(c, model, tx, sched, total, mesh, shardings)
  tok = tokenizer_lib.get_tokenizer(max_length=c.model.text.max_length)
  batch = train_data.make_batch(tok, c.train.global_batch_size, c.data.image_size, c.model.text.max_length,
                                seed=0)
  batch = sharding.host_batch_to_global(batch, mesh)
  rng = jax.random.key(1)
  t = time.perf_counter()
  with mask_loss_off() if mask_off else contextlib.nullcontext():
    compiled = jitted.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  holder = {'state': state}

  def step():
    holder['state'], metrics = compiled(holder['state'], batch, rng)
    jax.block_until_ready(metrics)
    return metrics

  info = dict(compile_s=round(compile_s, 1), xla_gflop=round(float(cost.get('flops', 0.0)) / 1e9, 1))
  return step, info


def time_train(name: str, stage: int, batch: int, runs: int, overrides=()) -> dict:
  c = train_config(name, stage, batch, overrides)
  step, info = train_runner(c)
  model_flop = flops_lib.train_step_per_image(c)['total'] * batch
  r = timed(step, runs, model_flop)
  metrics = jax.device_get(step())
  return dict(model=name, stage=stage, batch=batch, step_s=r['s'], times=r['times'],
              img_per_s=round(batch / r['s'], 2), model_gflop=round(model_flop / 1e9, 1),
              peak_gflops=r['peak_gflops'], mfu=r['mfu'],
              xla_mfu=round(r['mfu'] * info['xla_gflop'] * 1e9 / model_flop, 3),
              loss=round(float(metrics['loss']), 4), finite=bool(metrics['finite']), **info)


def mask_overhead(name: str, batch: int, runs: int, overrides=()) -> dict:
  """Stage-2 step with the matching + mask loss on vs off, calls alternated (on, off, on, off, ...)."""
  c = train_config(name, 2, batch, overrides)
  on, on_info = train_runner(c)
  off, off_info = train_runner(c, mask_off=True)
  on()
  off()
  t_on, t_off = [], []
  for _ in range(runs):
    for fn, acc in ((on, t_on), (off, t_off)):
      t = time.perf_counter()
      fn()
      acc.append(time.perf_counter() - t)
  ratios = [a / b - 1.0 for a, b in zip(t_on, t_off)]
  return dict(model=name, batch=batch, on_s=round(statistics.median(t_on), 3),
              off_s=round(statistics.median(t_off), 3), overhead=round(statistics.median(ratios), 3),
              pair_overheads=[round(x, 3) for x in ratios], on_xla_gflop=on_info['xla_gflop'],
              off_xla_gflop=off_info['xla_gflop'])


def ab_train(name: str, stage: int, batch: int, runs: int, base=(), variant=()) -> dict:
  """A/B of two configs of the same step (base overrides vs base + variant overrides), calls alternated."""
  a, a_info = train_runner(train_config(name, stage, batch, base))
  b, b_info = train_runner(train_config(name, stage, batch, tuple(base) + tuple(variant)))
  a()
  b()
  t_a, t_b = [], []
  for _ in range(runs):
    for fn, acc in ((a, t_a), (b, t_b)):
      t = time.perf_counter()
      fn()
      acc.append(time.perf_counter() - t)
  ratios = [y / x for x, y in zip(t_a, t_b)]
  return dict(model=name, stage=stage, batch=batch, base=list(base), variant=list(variant),
              base_s=round(statistics.median(t_a), 3), variant_s=round(statistics.median(t_b), 3),
              variant_over_base=round(statistics.median(ratios), 3), pair_ratios=[round(x, 3) for x in ratios],
              base_compile_s=a_info['compile_s'], variant_compile_s=b_info['compile_s'],
              base_xla_gflop=a_info['xla_gflop'], variant_xla_gflop=b_info['xla_gflop'])


# ------------------------------------------------------------------------------------------------ inference

def segmenter(name: str, overrides=(), window_batch: int | None = None):
  from ovseg_jax.models.ovsegmentor import OVSegmentor  # pylint: disable=g-import-not-at-top
  c = CONFIGS[name].get_config()
  c.unlock()
  apply_overrides(c, overrides)
  mc = c.model
  model = OVSegmentor(config=ml_collections.FrozenConfigDict(mc))
  ids = jnp.ones((1, 8), jnp.int32)
  variables = jax.jit(lambda k: model.init({'params': k, 'dropout': k, 'gumbel': k},
                                           jnp.zeros((1, mc.vision.img_size, mc.vision.img_size, 3)), ids,
                                           ids, train=False))(jax.random.PRNGKey(0))
  ev = inference.default_eval_config(window_batch=window_batch)
  return inference.Segmenter(mc, variables, ev), mc


def time_inference(name: str, runs: int, overrides=(), window_batch: int | None = None) -> dict:
  seg, mc = segmenter(name, overrides, window_batch)
  names = list(eval_datasets.VOC_CLASSES[1:])
  emb = seg.text_embedding(names)
  rng = np.random.default_rng(0)
  crop = rng.standard_normal((1, 448, 448, 3)).astype(np.float32)
  image = rng.integers(0, 256, (448, 673, 3), dtype=np.uint8)
  n_win = inference.num_windows(448, 673, seg.eval_config)
  wf = flops_lib.inference_window(mc, 448, len(names) + 1)
  w = timed(lambda: seg.window_logits(crop, emb), runs, wf)
  sl = timed(lambda: seg.segment(image, names), runs, n_win * wf)
  return dict(model=name, window_s=w['s'], window_times=w['times'], window_mfu=w['mfu'],
              peak_gflops_window=w['peak_gflops'], slide_s=sl['s'], slide_times=sl['times'],
              slide_windows=int(n_win), window_batch=int(seg.eval_config.window_batch), slide_mfu=sl['mfu'],
              peak_gflops_slide=sl['peak_gflops'], window_model_gflop=round(wf / 1e9, 1))


# ------------------------------------------------------------------------------------------------ main

@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('parts', 'window,slide,train,mfu,mask', 'comma-separated parts of the table', flag_values=fv)
  flags.DEFINE_integer('runs', 5, 'timed calls after one warm-up call', flag_values=fv)
  flags.DEFINE_integer('window_batch', None, 'eval.window_batch (default: config)', flag_values=fv)
  flags.DEFINE_multi_string('ab', [], 'A/B instead of the table: --ab vits:1:8 --variant model.remat=full '
                            '(alternated calls)', flag_values=fv)
  flags.DEFINE_multi_string('variant', [], 'KEY=VALUE of the A/B\'s variant side', flag_values=fv)
  # --config.KEY=VALUE (e.g. --config.model.dtype=bfloat16) overrides the benchmarked configs; --set KEY=VALUE
  # is its deprecated spelling.
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), {'--set': '--config.'})
  argv, overrides = cli.pop_overrides(argv, '--config.')
  args = cli.parse(fv, argv, prog='python -m bench.perf', doc=__doc__)
  args.set = overrides
  if args.ab:
    for spec in args.ab:
      name, stage, batch = spec.split(':')
      r = ab_train(name, int(stage), int(batch), args.runs, args.set, args.variant)
      r['load_average'] = round(os.getloadavg()[0], 2)
      print(json.dumps({'ab': r}), flush=True)
    return 0
  parts = set(args.parts.split(','))
  load = [os.getloadavg()[0]]
  out = {'bench': 'perf', 'runs': args.runs, 'cores': os.cpu_count(), 'overrides': args.set,
         'authors_s': AUTHORS_S, 'targets': TARGETS}
  if parts & {'window', 'slide'}:
    r = time_inference('vitb', args.runs, args.set, args.window_batch)
    out['inference_vitb'] = r
    print(json.dumps({'inference_vitb': r}), flush=True)
  if 'train' in parts:
    for b in (8, 4):
      r = time_train('vitb', 2, b, args.runs, args.set)
      out[f'train_vitb_stage2_b{b}'] = r
      print(json.dumps({f'train_vitb_stage2_b{b}': r}), flush=True)
  if 'mfu' in parts:
    for stage in (1, 2):
      r = time_train('vits', stage, 8, args.runs, args.set)
      out[f'train_vits_stage{stage}_b8'] = r
      print(json.dumps({f'train_vits_stage{stage}_b8': r}), flush=True)
  if 'mask' in parts:
    r = mask_overhead('vits', 8, args.runs, args.set)
    out['mask_overhead_vits_stage2_b8'] = r
    print(json.dumps({'mask_overhead_vits_stage2_b8': r}), flush=True)
  load.append(os.getloadavg()[0])
  out['load_average_start_end'] = [round(x, 2) for x in load]
  print(json.dumps(out))
  print(table(out))
  return 0


def table(out: dict) -> str:
  """The markdown rows of the table in bench/RESULTS.md "Performance"."""
  rows = ['| measure | authors (torch, this CPU) | target | ours | peak GFLOP/s (same run) | MFU |',
          '|---|---|---|---|---|---|']
  inf = out.get('inference_vitb')
  if inf:
    rows.append(f'| vitb 448 window, 21 classes | 1.08 s | <= 0.54 s | {inf["window_s"]} s | '
                f'{inf["peak_gflops_window"]} | {inf["window_mfu"]:.0%} |')
    rows.append(f'| vitb slide 448x673 ({inf["slide_windows"]} windows, window_batch {inf["window_batch"]}) | '
                f'3.3 s | <= 1.7 s | {inf["slide_s"]} s | {inf["peak_gflops_slide"]} | {inf["slide_mfu"]:.0%} |')
  for b, authors in ((8, '8.6 s'), (4, '4.5 s')):
    r = out.get(f'train_vitb_stage2_b{b}')
    if r:
      rows.append(f'| vitb stage-2 step, batch {b} | {authors} | {"<= 4.3 s" if b == 8 else "-"} | '
                  f'{r["step_s"]} s | {r["peak_gflops"]} | {r["mfu"]:.0%} (XLA count {r["xla_mfu"]:.0%}) |')
  for stage in (1, 2):
    r = out.get(f'train_vits_stage{stage}_b8')
    if r:
      rows.append(f'| vits stage-{stage} step, batch 8 | - | MFU >= 60% | {r["step_s"]} s | '
                  f'{r["peak_gflops"]} | {r["mfu"]:.0%} (XLA count {r["xla_mfu"]:.0%}) |')
  m = out.get('mask_overhead_vits_stage2_b8')
  if m:
    rows.append(f'| vits stage-2 matching + mask loss overhead (on/off alternated) | - | <= 10% | '
                f'{m["on_s"]} s on / {m["off_s"]} s off: {m["overhead"]:+.1%} | - | - |')
  return '\n'.join(rows)


if __name__ == '__main__':
  sys.exit(main())
