"""Train-step benchmark: throughput and MFU on this machine, and AOT per-device memory on fake meshes.

  python -m bench.train_step --config=configs/vits.py --batch_size=8
      one JSON line: img/s, median step seconds after warm-up, model GFLOPs per step (XLA cost analysis of
      the compiled step), and MFU against a float32 matmul peak measured in the same run; `--reference` adds
      a plain linen ViT-S/16 forward + backward at the same batch (bench/plain_vit.py) against that peak.
  python -m bench.train_step --config=configs/vitb.py --memory --devices=64 --batch_size=2048
      one JSON line per mesh (replicated = data parallel, fsdp = all devices on the 'fsdp' axis): per-device
      bytes of the compiled step from `jit(...).lower(abstract).compile().memory_analysis()`; nothing is
      materialised (the state and batch are ShapeDtypeStructs carrying their shardings).

The step is the trainer's (`train_step.jit_train_step`: all losses of the config's stage, EMA teacher,
AdamW), fed by the in-memory batch source. `--devices` fakes that many CPU devices (set before JAX starts).
"""

import json
import os
import sys
import time

from absl import flags

from ovseg_jax import cli  # absl flags only: JAX is not imported yet (--devices must come first)


def _parse():
  fv = flags.FlagValues()
  flags.DEFINE_string('config', 'configs/vits.py', 'configs/X.py[:variant]', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'global batch', flag_values=fv)
  flags.DEFINE_integer('steps', 3, 'timed steps after 1 warm-up step', flag_values=fv)
  flags.DEFINE_bool('memory', False, 'AOT memory per device instead of timing', flag_values=fv)
  flags.DEFINE_integer('devices', 1, 'fake CPU devices', flag_values=fv)
  flags.DEFINE_integer('matmul_n', 2048, 'size of the peak-measuring matmul', flag_values=fv)
  flags.DEFINE_string('meshes', 'replicated,fsdp', 'memory mode: which meshes', flag_values=fv)
  flags.DEFINE_bool('reference', False, 'also time a plain linen ViT-S/16 forward+backward at the same batch '
                    '(bench/plain_vit.py)', flag_values=fv)
  return cli.parse(fv, None, prog='python -m bench.train_step', doc=__doc__)


ARGS = _parse()
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={ARGS.devices}').strip()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top

from bench import plain_vit  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import optim  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import sharding  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import tokenizer as tokenizer_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import train_monitor  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import train_step as ts  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax.convert.__main__ import load_config  # noqa: E402  pylint: disable=g-import-not-at-top
from tests import train_data  # noqa: E402  pylint: disable=g-import-not-at-top


def _config(mesh):
  config = load_config(ARGS.config)
  config.unlock()
  config.train.global_batch_size = ARGS.batch_size
  config.mesh = mesh
  config.lock()
  return config


def _setup(config, mesh):
  model = ts.make_model(config)
  total = 1000
  tx, schedule = optim.make_optimizer(config.optim, total_steps=total, warmup_steps=10,
                                      global_batch=config.train.global_batch_size)
  init = lambda r: ts.init_state(config, model, tx, r)  # noqa: E731
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.tree_shardings(abstract, mesh, config.sharding)
  step = ts.jit_train_step(config, model, tx, schedule, total, mesh, shardings)
  return init, abstract, shardings, step


def _abstract_batch(config, mesh):
  b, s, t = config.train.global_batch_size, config.data.image_size, config.model.text.max_length
  bs = sharding.batch_sharding(mesh)
  img = jax.ShapeDtypeStruct((b, s, s, 3), np.float32, sharding=bs)
  ids = jax.ShapeDtypeStruct((b, t), np.int32, sharding=bs)
  return {k: (img if k in ('image', 'cross_image') else ids) for k in ts.BATCH_KEYS}


def memory() -> None:
  """Per-device memory of the compiled step, replicated vs FSDP, from the AOT memory analysis."""
  meshes = {'replicated': (('data', -1), ('fsdp', 1)), 'fsdp': (('data', 1), ('fsdp', -1))}
  for name in ARGS.meshes.split(','):
    axes = meshes[name]
    config = _config(axes)
    mesh = sharding.make_mesh(axes)
    _, abstract, shardings, step = _setup(config, mesh)
    rng = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                               sharding=sharding.replicated(mesh))
    t0 = time.perf_counter()
    compiled = step.lower(sharding.with_shardings(abstract, shardings), _abstract_batch(config, mesh),
                          rng).compile()
    mem = compiled.memory_analysis()
    state_bytes = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                      for x in jax.tree.leaves(abstract))
    peak = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes + mem.temp_size_in_bytes
    print(json.dumps(dict(
        bench='train_step_memory', config=ARGS.config, mesh=name, devices=jax.device_count(),
        global_batch=ARGS.batch_size, state_gib_total=round(state_bytes / 2 ** 30, 3),
        argument_gib_per_device=round(mem.argument_size_in_bytes / 2 ** 30, 3),
        temp_gib_per_device=round(mem.temp_size_in_bytes / 2 ** 30, 3),
        peak_gib_per_device=round(peak / 2 ** 30, 3), compile_s=round(time.perf_counter() - t0, 1))),
          flush=True)


def speed() -> None:
  """Median step time after a warm-up step, FLOPs from the compiled step, MFU vs a measured matmul peak."""
  config = _config((('data', -1), ('fsdp', 1)))
  mesh = sharding.make_mesh(config.mesh)
  init, _, shardings, step = _setup(config, mesh)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  tok = tokenizer_lib.get_tokenizer(max_length=config.model.text.max_length)
  it = train_data.in_memory_batches(config, tok)
  batches = [sharding.host_batch_to_global(next(it), mesh) for _ in range(2)]
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step.lower(state, batches[0], rng).compile()
  compile_s = time.perf_counter() - t0
  flops = train_monitor.compiled_flops(compiled)
  state, m = compiled(state, batches[0], rng)
  jax.block_until_ready(m)
  times = []
  for i in range(ARGS.steps):
    t = time.perf_counter()
    state, m = compiled(state, batches[i % 2], rng)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  ref = plain_vit.time_fwd_bwd(ARGS.batch_size, ARGS.steps) if ARGS.reference else None
  peak = train_monitor.measure_matmul_peak(ARGS.matmul_n)
  sec = float(np.median(times))
  extra = {} if ref is None else plain_vit.fields(ref, peak, prefix='plain_vit_s16_')
  print(json.dumps(dict(
      bench='train_step', config=ARGS.config, stage=config.stage, batch_size=ARGS.batch_size,
      devices=jax.device_count(), img_per_s=round(ARGS.batch_size / sec, 3), step_s=round(sec, 4),
      step_s_all=[round(x, 4) for x in times], gflops_per_step=round(flops / 1e9, 2),
      matmul_peak_gflops=round(peak / 1e9, 1), mfu=round(flops / sec / peak, 4),
      compile_s=round(compile_s, 1), loss=float(m['loss']), **extra)), flush=True)


if __name__ == '__main__':
  sys.exit(memory() if ARGS.memory else speed())
