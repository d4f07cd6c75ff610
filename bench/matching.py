"""Hungarian matching inside jit: 'scipy' (pure_callback, and per-device via shard_map) vs 'dp' (on device).

    python -m bench.matching [--runs 50] [--batch 256] [--sizes 4,8]

256 cost matrices per call, batch-sharded over 8 fake CPU devices (as in the sharded train step). Each
method is jitted, warmed up (compile + 3 calls), then timed `--runs` times with block_until_ready; the median
is reported. Prints a markdown table and one JSON line.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# The plain 'scipy' callback under a sharded jit makes XLA gather to one device and log an "Involuntary full
# rematerialization" warning on every compile; that gather is part of what is measured, the log line is noise.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import functools  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from ovseg_jax import cli  # noqa: E402
from ovseg_jax import matching  # noqa: E402


def _median_ms(fn, x, runs: int) -> float:
  for _ in range(3):
    fn(x).block_until_ready()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn(x).block_until_ready()
    times.append((time.perf_counter() - t) * 1e3)
  return statistics.median(times)


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_integer('runs', 50, 'timed calls per method', flag_values=fv)
  flags.DEFINE_integer('batch', 256, 'cost matrices per call', flag_values=fv)
  flags.DEFINE_string('sizes', '4,8', 'comma-separated K (K x K cost matrices)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.matching', doc=__doc__)

  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = jax.NamedSharding(mesh, jax.P('data'))
  methods = {
      'scipy (pure_callback)': functools.partial(matching.assign, method='scipy'),
      'scipy (shard_map, per device)': functools.partial(matching.assign_sharded, mesh=mesh, batch_axes='data'),
      'dp (on device)': functools.partial(matching.assign, method='dp'),
  }
  sizes = [int(s) for s in args.sizes.split(',')]
  rng = np.random.default_rng(0)
  results = {}
  for k in sizes:
    x = jax.device_put(rng.normal(size=(args.batch, k, k)).astype(np.float32), sharding)
    ref = None
    for name, fn in methods.items():
      f = jax.jit(fn)
      cols = np.asarray(f(x))
      cost = np.asarray(x, np.float64)
      total = np.take_along_axis(cost, cols[..., None], -1).sum()
      ref = total if ref is None else ref
      if abs(total - ref) > 1e-3:
        raise AssertionError(f'{name} at K={k} is not optimal: summed cost {total} vs {ref}')
      results.setdefault(name, {})[k] = _median_ms(f, x, args.runs)

  print(f'\nHungarian matching inside jit, {args.batch} cost matrices per call, batch-sharded over '
        f'{jax.device_count()} {jax.devices()[0].platform.upper()} devices, median of {args.runs} runs (ms), '
        f'{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}\n')
  print('| method | ' + ' | '.join(f'{k}x{k}' for k in sizes) + ' |')
  print('|---|' + '---|' * len(sizes))
  for name, by_k in results.items():
    print(f'| {name} | ' + ' | '.join(f'{by_k[k]:.3f}' for k in sizes) + ' |')
  fastest = {k: min(results, key=lambda n: results[n][k]) for k in sizes}
  print(json.dumps({'bench': 'matching', 'batch': args.batch, 'devices': jax.device_count(), 'runs': args.runs,
                    'cores': os.cpu_count(), 'load_average': round(os.getloadavg()[0], 2),
                    'median_ms': {n: {str(k): round(v, 4) for k, v in r.items()} for n, r in results.items()},
                    'fastest': {str(k): v for k, v in fastest.items()}}))


if __name__ == '__main__':
  sys.exit(main())
