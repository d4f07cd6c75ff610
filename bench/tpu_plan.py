"""TPU-pod plan for vitb, on paper: compiled FLOPs and per-chip memory from ahead-of-time compilation.

    python -m bench.tpu_plan [--devices 64] [--global_batch 2048] [--variants s1:none,s2:none,s1:full,s2:full]
                             [--cpu_mfu 0.5]

Sets XLA_FLAGS=--xla_force_host_platform_device_count=N for its own process (before JAX starts), builds the
vitb train state *abstractly* (jax.eval_shape), shards it with the project's FSDP rules on a mesh
data=1 x fsdp=N, lowers the real jitted step (`train_step.jit_train_step`) on ShapeDtypeStructs that carry
the shardings and compiles it: nothing is materialised. The step traces the model with its activation
batch-sharding constraints on (`jit_train_step`: abstract mesh + logical rule 'batch' -> ('data', 'fsdp')).
Per variant (stage 1|2, model.remat) it prints
  * FLOPs per image from XLA's cost analysis of the partitioned program (per-device FLOPs x N / batch),
    next to the analytic matmul count of bench/flops.py;
  * per-device memory from `compiled.memory_analysis()`: arguments (state shard + batch shard), temporaries
    (activations, gradients, optimizer scratch), outputs not aliased to donated inputs.
The memory figures are the CPU backend's buffer assignment for the same partitioned program; a TPU compile
differs in layout padding and fusion, so they are an estimate of the TPU number, not a measurement of it.

Then the chip-hours of the authors' schedule on CC4M (4.3 M pairs): 30 epochs of stage 1 + 10 of stage 2
(= the paper's 40 epochs), at the given MFUs, on TPU v4 (275 TFLOP/s bf16 peak per chip) and v5e (197).
"""

import os
import sys

if __name__ == '__main__':
  _n = 64
  for _i, _a in enumerate(sys.argv):
    if _a.startswith('--devices'):
      _n = int(_a.split('=', 1)[1] if '=' in _a else sys.argv[_i + 1])
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' --xla_force_host_platform_device_count={_n}').strip()

import json  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402

from bench import flops as flops_lib  # noqa: E402
from ovseg_jax import cli  # noqa: E402

CC4M_PAIRS = 4.3e6
EPOCHS = {1: 30, 2: 10}  # the authors' two-stage recipe = the paper's 40 epochs
CHIPS = {'TPU v4': 275e12, 'TPU v5e': 197e12}  # bf16 dense peak per chip
AUTHORS = {'stage1_epoch_h': 0.5, 'stage1_gpus': 16, 'stage2_epoch_h': 1.5, 'stage2_gpus': 8}


def compile_variant(stage: int, remat: str, devices: int, global_batch: int, dtype: str = 'float32') -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import vitb  # pylint: disable=g-import-not-at-top
  from ovseg_jax import optim  # pylint: disable=g-import-not-at-top
  from ovseg_jax import sharding  # pylint: disable=g-import-not-at-top
  from ovseg_jax import train_step as ts  # pylint: disable=g-import-not-at-top

  if jax.device_count() < devices:
    raise SystemExit(f'only {jax.device_count()} devices; run as `python -m bench.tpu_plan` so that XLA_FLAGS '
                     'is set before JAX starts')
  c = vitb.get_config(f'stage={stage}')
  c.unlock()
  c.train.global_batch_size = global_batch
  c.train.total_steps = 10_000
  c.optim.warmup_steps = 100
  c.model.remat = remat
  c.model.dtype = dtype
  c.mesh = (('data', 1), ('fsdp', devices))
  c.lock()
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:devices])
  model = ts.make_model(c)
  tx, sched = optim.make_optimizer(c.optim, total_steps=c.train.total_steps, warmup_steps=100,
                                   global_batch=global_batch)
  abstract = jax.eval_shape(lambda r: ts.init_state(c, model, tx, r), jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh, c.sharding)
  state = sharding.with_shardings(abstract, shardings)
  size, t = c.data.image_size, c.model.text.max_length
  bsh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((global_batch, size, size, 3), jnp.float32, sharding=bsh)
           for k in ('image', 'cross_image')}
  for k in ts.BATCH_KEYS:
    if k not in batch:
      batch[k] = jax.ShapeDtypeStruct((global_batch, t), jnp.int32, sharding=bsh)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=sharding.replicated(mesh))
  jitted = ts.jit_train_step(c, model, tx, sched, c.train.total_steps, mesh, shardings)
  t0 = time.perf_counter()
  lowered = jitted.lower(state, batch, rng)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gib = 2.0 ** 30
  arg, out, tmp, alias = (mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes,
                          mem.alias_size_in_bytes)
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
  analytic = flops_lib.train_step_per_image(c)['total']
  xla_per_image = float(cost.get('flops', 0.0)) * devices / global_batch
  return dict(stage=stage, remat=remat, dtype=dtype, devices=devices, global_batch=global_batch,
              per_device_batch=global_batch // devices, compile_s=round(compile_s, 1),
              state_gib_total=round(state_bytes / gib, 2),
              arguments_gib=round(arg / gib, 2), temp_gib=round(tmp / gib, 2),
              output_not_aliased_gib=round((out - alias) / gib, 2),
              peak_gib_per_device=round((arg + tmp + out - alias) / gib, 2),
              xla_gflop_per_image=round(xla_per_image / 1e9, 1),
              analytic_gflop_per_image=round(analytic / 1e9, 1),
              xla_over_analytic=round(xla_per_image / analytic, 3))


def chip_hours(gflop_per_image: dict, mfus: dict) -> list[dict]:
  """Chip-hours of the two-stage CC4M schedule. gflop_per_image: {stage: GFLOP}; mfus: {label: fraction}."""
  total = sum(EPOCHS[s] * CC4M_PAIRS * gflop_per_image[s] * 1e9 for s in (1, 2))
  rows = []
  for chip, peak in CHIPS.items():
    for label, mfu in mfus.items():
      hours = total / (peak * mfu) / 3600.0
      img_s = {s: peak * mfu / (gflop_per_image[s] * 1e9) for s in (1, 2)}
      rows.append(dict(chip=chip, mfu_label=label, mfu=round(mfu, 3), chip_hours=round(hours, 1),
                       img_per_s_per_chip_stage1=round(img_s[1], 1), img_per_s_per_chip_stage2=round(img_s[2], 1),
                       wall_h_on_64_chips=round(hours / 64, 2)))
  return rows


def authors_a100_hours() -> float:
  a = AUTHORS
  return EPOCHS[1] * a['stage1_epoch_h'] * a['stage1_gpus'] + EPOCHS[2] * a['stage2_epoch_h'] * a['stage2_gpus']


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_integer('devices', 64, 'fake CPU devices = chips of the planned slice', flag_values=fv)
  flags.DEFINE_integer('global_batch', 2048, 'global batch size', flag_values=fv)
  flags.DEFINE_string('variants', 's1:none,s2:none,s1:full,s2:full', 'stage:remat,...', flag_values=fv)
  flags.DEFINE_string('dtype', 'float32', 'config.model.dtype', flag_values=fv)
  flags.DEFINE_float('cpu_mfu', 0.0, 'the MFU bench.perf measured (0: skip)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.tpu_plan', doc=__doc__)
  results = []
  for v in filter(None, args.variants.split(',')):
    stage, remat = v.split(':')
    r = compile_variant(int(stage[1:]), remat, args.devices, args.global_batch, args.dtype)
    print(json.dumps(r), flush=True)
    results.append(r)
  flops = {}
  for r in results:
    flops.setdefault(r['stage'], r['xla_gflop_per_image'])
  if set(flops) != {1, 2}:  # analytic count for a stage that was not compiled
    from configs import vitb  # pylint: disable=g-import-not-at-top
    for s in (1, 2):
      flops.setdefault(s, round(flops_lib.train_step_per_image(vitb.get_config(f'stage={s}'))['total'] / 1e9, 1))
  mfus = {'50%': 0.5}
  if args.cpu_mfu > 0:
    mfus = {'CPU-measured': args.cpu_mfu, **mfus}
  plan = dict(gflop_per_image=flops, epochs=EPOCHS, pairs=CC4M_PAIRS, authors_a100_hours=authors_a100_hours(),
              rows=chip_hours(flops, mfus))
  print(json.dumps(plan), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
