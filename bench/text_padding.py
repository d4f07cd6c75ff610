"""Stage-1 train step with the authors' fixed 77-token text padding vs bucketed padding, side by side.

  python -m bench.text_padding --config=configs/vitb.py --batch_size=8 [--captions FILE]

Batches of `--batch_size` captions from FILE (one per line; default tests/fixtures/cc_style_captions.txt,
CC-style web captions), each with its masked question and prompted answer (data/entities.py, 'official'
mode, as the pipeline makes them) and the cross-entity prompt, tokenised to model.text.max_length (fixed) or
cut to the smallest of `--buckets` holding the batch's longest text (ovseg_jax/text_buckets.py). Images are
random. Both steps are the trainer's (`train_step.jit_train_step`, the config's losses, AdamW); every
variant is compiled before timing. The machine may be shared: the two are timed alternately (fixed,
bucketed, fixed, ... over the batches) and the medians are compared, which cancels slow load drift; the
load average is printed. The last line is one JSON object with step_s_77, step_s_dynamic, speedup and
mean_tokens (the mean bucket length the bucketed step padded to).
"""

import json
import os
import sys
import time

from absl import flags
import numpy as np

from ovseg_jax import cli

_DEFAULT_CAPTIONS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'tests',
                                 'fixtures', 'cc_style_captions.txt')


def _parse():
  fv = flags.FlagValues()
  flags.DEFINE_string('config', 'configs/vitb.py', 'configs/X.py[:variant] (stage 1 is timed)', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'global batch', flag_values=fv)
  flags.DEFINE_string('captions', _DEFAULT_CAPTIONS, 'text file, one caption per line', flag_values=fv)
  flags.DEFINE_string('buckets', '16,24,32,48,64,77', 'bucket lengths of the bucketed step', flag_values=fv)
  flags.DEFINE_integer('pairs', 4, 'timed (fixed, bucketed) pairs after one warm-up step each', flag_values=fv)
  return cli.parse(fv, None, prog='python -m bench.text_padding', doc=__doc__)


ARGS = _parse()

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from ovseg_jax import optim  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import sharding  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import text_buckets  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import tokenizer as tokenizer_lib  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import train_monitor  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax import train_step as ts  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax.convert.__main__ import load_config  # noqa: E402  pylint: disable=g-import-not-at-top
from ovseg_jax.data import entities as entities_lib  # noqa: E402  pylint: disable=g-import-not-at-top


def _config(buckets):
  config = load_config(ARGS.config)
  config.unlock()
  config.stage = 1
  config.train.global_batch_size = ARGS.batch_size
  config.data.text_buckets = tuple(buckets)
  config.lock()
  return config


def read_captions(path: str) -> list[str]:
  with open(path, encoding='utf-8') as f:
    caps = [line.strip() for line in f if line.strip()]
  if not caps:
    cli.error(f'--captions={path}: no caption')
  return caps


def make_batches(config, captions, rng) -> list[dict]:
  """ceil(len(captions) / B) host batches of the pipeline's four texts, padded to model.text.max_length."""
  b, s = ARGS.batch_size, config.data.image_size
  tok = tokenizer_lib.get_tokenizer(max_length=config.model.text.max_length)
  ex = entities_lib.get_extractor(entities_lib.dataset_vocabulary(config.data.dataset), 'official')
  out = []
  for start in range(0, len(captions), b):
    caps = [captions[(start + i) % len(captions)] for i in range(b)]
    texts = [[], [], [], []]
    for cap in caps:
      question, ents = ex.mask(cap)
      texts[0].append(cap)
      texts[1].append(question)
      texts[2].append(ex.answer(ents, int(rng.integers(len(entities_lib.TEMPLATE_PREFIXES)))))
      texts[3].append(config.data.prompt_template.format(ents[0] if ents else 'thing'))
    batch = {'image': rng.standard_normal((b, s, s, 3), dtype=np.float32),
             'cross_image': rng.standard_normal((b, s, s, 3), dtype=np.float32)}
    for (ids_key, mask_key), t in zip(text_buckets.TEXT_KEYS, texts):
      batch[ids_key], batch[mask_key] = tok(t)
    out.append(batch)
  return out


def main() -> int:
  load0 = os.getloadavg()
  fixed = _config((int(_config(()).model.text.max_length),))
  dynamic = _config(int(x) for x in ARGS.buckets.split(','))
  captions = read_captions(ARGS.captions)
  mesh = sharding.make_mesh(fixed.mesh)
  model = ts.make_model(fixed)
  tx, schedule = optim.make_optimizer(fixed.optim, total_steps=1000, warmup_steps=10,
                                      global_batch=ARGS.batch_size)
  init = lambda r: ts.init_state(fixed, model, tx, r)  # noqa: E731
  shardings = sharding.tree_shardings(jax.eval_shape(init, jax.random.key(0)), mesh, fixed.sharding)
  state = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  rng = jax.random.key(1)
  host = make_batches(fixed, captions, np.random.default_rng(0))
  runs = {'fixed': [], 'dynamic': []}
  for b in host:
    runs['fixed'].append(sharding.host_batch_to_global(b, mesh))
    runs['dynamic'].append(sharding.host_batch_to_global(text_buckets.bucket_batch(b, dynamic)[0], mesh))
  steps, flops, compile_s = {}, {}, {}
  for name, config in (('fixed', fixed), ('dynamic', dynamic)):
    fn = ts.jit_train_step(config, model, tx, schedule, 1000, mesh, shardings)
    for batch in runs[name]:
      key = (name, int(batch['text_ids'].shape[1]))
      if key not in steps:
        t0 = time.perf_counter()
        steps[key] = fn.lower(state, batch, rng).compile()
        compile_s[f'{name}_{key[1]}'] = round(time.perf_counter() - t0, 1)
        flops[key] = train_monitor.compiled_flops(steps[key])

  def run(name, i):
    nonlocal state
    batch = runs[name][i % len(runs[name])]
    t = time.perf_counter()
    state, m = steps[(name, int(batch['text_ids'].shape[1]))](state, batch, rng)
    jax.block_until_ready(m)
    return time.perf_counter() - t, float(m['loss'])

  run('fixed', 0)   # warm-up (first-call allocations) of both
  run('dynamic', 0)
  times = {'fixed': [], 'dynamic': []}
  for i in range(ARGS.pairs):   # alternate: slow load drift hits both alike
    for name in ('fixed', 'dynamic') if i % 2 == 0 else ('dynamic', 'fixed'):
      times[name].append(run(name, i)[0])
      print(f'pair {i} {name:7s} {times[name][-1]:.3f} s', flush=True)
  lengths = [int(b['text_ids'].shape[1]) for b in runs['dynamic']]
  used = [lengths[i % len(lengths)] for i in range(ARGS.pairs)]
  real = np.concatenate([np.sum(b['text_mask'], 1) for b in host])
  sec77, secd = float(np.median(times['fixed'])), float(np.median(times['dynamic']))
  gf = lambda name, n: round(flops[(name, n)] / 1e9, 1)  # noqa: E731
  print(json.dumps(dict(
      bench='text_padding', config=ARGS.config, stage=1, batch_size=ARGS.batch_size, captions=ARGS.captions,
      num_captions=len(captions), buckets=list(text_buckets.buckets(dynamic)),
      caption_tokens_mean=round(float(np.mean(real)), 2), caption_tokens_max=int(np.max(real)),
      bucket_per_batch=lengths, gflops_per_step_77=gf('fixed', int(fixed.model.text.max_length)),
      gflops_per_step_dynamic={n: gf('dynamic', n) for n in sorted(set(lengths))},
      step_s_77_all=[round(x, 3) for x in times['fixed']],
      step_s_dynamic_all=[round(x, 3) for x in times['dynamic']], compile_s=compile_s,
      load_before=[round(x, 2) for x in load0], load_after=[round(x, 2) for x in os.getloadavg()],
      devices=jax.device_count(), step_s_77=round(sec77, 4), step_s_dynamic=round(secd, 4),
      speedup=round(sec77 / secd, 3), mean_tokens=round(float(np.mean(used)), 2))), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
