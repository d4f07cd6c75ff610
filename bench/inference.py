"""Zero-shot segmentation latency on this CPU: per 448 window, per VOC-size image, batched-window throughput.

    python -m bench.inference [--models vits,vitb] [--runs 5] [--batches 1,2,4] [--append bench/RESULTS.md]

Random weights from the model init (shapes first with `jax.eval_shape`, so the parameter memory is known
before anything is allocated), fp32, the 21 VOC names with "a photo of a {}.". Every number is the median of
`--runs` timed calls after one warm-up call (which compiles). Timed:
  * window:  one 448 x 448 window through `Segmenter.window_logits` (encode_image + Eq. 1), batch 1
  * VOC:     `Segmenter.segment` on a 500 x 375 image (-> 448 x 597, 2 windows), resize + softmax included
  * slide:   `Segmenter.segment` on a 673 x 448-like image (300 x 451 -> 448 x 673, 3 windows), the
             authors' reported case
  * batched: windows/s when `--batches` windows go through one call
The authors' figures on this CPU (torch, vitb, 21 classes): 1.08 s per 448 window, 3.3 s for the 3-window
448 x 673 slide.
"""

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

from configs import vitb as vitb_config
from configs import vits as vits_config
from ovseg_jax import cli
from ovseg_jax import eval_datasets
from ovseg_jax import inference

CONFIGS = {'vits': vits_config, 'vitb': vitb_config}
AUTHORS = {'window_s': 1.08, 'slide_448x673_s': 3.3}


def _median_s(fn, runs: int, cpu: list | None = None) -> float:
  """Median wall seconds of `runs` calls after a warm-up; appends the median process CPU seconds to `cpu`.

  CPU seconds (all threads) are a load-independent companion of wall time on a shared machine: on an idle
  machine with n cores the wall time lies between cpu / n and cpu.
  """
  fn()  # warm-up (compile)
  times, cpus = [], []
  for _ in range(runs):
    t, c = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - t)
    cpus.append(time.process_time() - c)
  if cpu is not None:
    cpu.append(statistics.median(cpus))
  return statistics.median(times)


def build(name: str, seed: int = 0):
  """(model_config, variables, parameter count, parameter MiB) with random init weights."""
  from ovseg_jax.models.ovsegmentor import OVSegmentor  # pylint: disable=g-import-not-at-top
  mc = CONFIGS[name].get_config().model
  model = OVSegmentor(config=ml_collections.FrozenConfigDict(mc))
  size = mc.vision.img_size
  ids = jnp.ones((1, 8), jnp.int32)
  def init(key):
    return model.init({'params': key, 'dropout': key, 'gumbel': key}, jnp.zeros((1, size, size, 3)), ids, ids,
                      train=False)
  shapes = jax.eval_shape(init, jax.random.PRNGKey(seed))
  leaves = jax.tree.leaves(shapes)
  count = sum(int(np.prod(x.shape)) for x in leaves)
  mib = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in leaves) / 2**20
  variables = jax.jit(init)(jax.random.PRNGKey(seed))
  return mc, variables, count, mib


def bench_model(name: str, runs: int, batches) -> dict:
  mc, variables, count, mib = build(name)
  rng = np.random.default_rng(0)
  names = list(eval_datasets.VOC_CLASSES[1:])
  out = {'model': name, 'params_M': round(count / 1e6, 1), 'params_MiB': round(mib, 1)}
  seg = inference.Segmenter(mc, variables, inference.default_eval_config(window_batch=max(batches)))
  t = time.perf_counter()
  emb = seg.text_embedding(names)
  out['text_embedding_21_s'] = round(time.perf_counter() - t, 2)  # compile + run, once per vocabulary
  crop = rng.normal(size=(1, 448, 448, 3)).astype(np.float32)
  cpu = []
  out['window_s'] = _median_s(lambda: seg.window_logits(crop, emb), runs, cpu)
  voc = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  out['voc_500x375_s'] = _median_s(lambda: seg.segment(voc, names), runs, cpu)
  chelsea_like = rng.integers(0, 256, (300, 451, 3), dtype=np.uint8)
  out['slide_448x673_s'] = _median_s(lambda: seg.segment(chelsea_like, names), runs, cpu)
  out['cpu_s'] = dict(zip(('window', 'voc_500x375', 'slide_448x673'), (round(c, 3) for c in cpu)))
  out['windows_per_s'] = {}
  for b in batches:
    crops = rng.normal(size=(b, 448, 448, 3)).astype(np.float32)
    out['windows_per_s'][b] = round(b / _median_s(lambda: seg.window_logits(crops, emb), runs), 3)
  for k in ('window_s', 'voc_500x375_s', 'slide_448x673_s'):
    out[k] = round(out[k], 3)
  return out


def to_markdown(results, args, load) -> str:
  bs = [int(b) for b in args.batches.split(',')]
  lines = [
      '', '## Inference', '',
      f'Command: `.venv/bin/python -m bench.inference --models {args.models} --runs {args.runs} '
      f'--batches {args.batches}`. fp32, random init weights, 21 VOC classes, median of {args.runs} timed calls '
      f'after a warm-up call. Machine: {os.cpu_count()} shared cores, load average {load[0]:.1f} / '
      f'{load[1]:.1f} at the start / end of the run (other jobs were running), so absolute times are '
      'upper bounds. The authors\' torch figures on this CPU: vitb 1.08 s per 448 window, 3.3 s for the '
      '448 x 673 slide (3 windows).', '',
      'Wall seconds, with the process CPU seconds (all threads) in parentheses: on an idle machine the wall '
      'time would lie between CPU / cores (all cores busy) and the CPU time (one core).', '',
      '| model | params | 448 window (s) | VOC 500x375, 2 windows (s) | 448x673 slide, 3 windows (s) | '
      + ' | '.join(f'windows/s @ batch {b}' for b in bs) + ' |',
      '|---|---|---|---|---|' + '---|' * len(bs),
  ]
  for r in results:
    c = r['cpu_s']
    lines.append(f'| {r["model"]} | {r["params_M"]} M | {r["window_s"]} ({c["window"]}) | '
                 f'{r["voc_500x375_s"]} ({c["voc_500x375"]}) | {r["slide_448x673_s"]} ({c["slide_448x673"]}) | '
                 + ' | '.join(str(r['windows_per_s'][b]) for b in bs) + ' |')
  lines += ['', '`' + json.dumps({'bench': 'inference', 'load_average': [round(x, 2) for x in load],
                                   'authors': AUTHORS, 'results': results}) + '`', '']
  return '\n'.join(lines)


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('models', 'vits,vitb', 'comma-separated configs (configs/<name>.py)', flag_values=fv)
  flags.DEFINE_integer('runs', 5, 'timed calls after one warm-up call', flag_values=fv)
  flags.DEFINE_string('batches', '1,2,4', 'windows per call for the batched throughput', flag_values=fv)
  flags.DEFINE_string('append', None, 'markdown file to append the results section to', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.inference', doc=__doc__)
  load0 = os.getloadavg()[0]
  results = []
  for name in args.models.split(','):
    if name not in CONFIGS:
      print(f'error: unknown model {name!r}; expected one of {sorted(CONFIGS)}', file=sys.stderr)
      return 2
    r = bench_model(name, args.runs, [int(b) for b in args.batches.split(',')])
    print(json.dumps(r), flush=True)
    results.append(r)
  md = to_markdown(results, args, (load0, os.getloadavg()[0]))
  print(md)
  if args.append:
    with open(args.append, 'a') as f:
      f.write(md)
  return 0


if __name__ == '__main__':
  sys.exit(main())
