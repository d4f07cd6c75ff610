"""Input pipeline throughput: builder records/s, and images/s per worker process for decode + augment +
tokenize at 224 px (the work one grain worker does), plus the whole grain iterator.

  python -m bench.input_pipeline [--num_images 256 --size 224 --workers 2]

Source images are real photos (scikit-image's sample images: astronaut, coffee, chelsea, rocket, ...)
cropped and resized to a longer side of 512 px and saved as JPEG quality 90, i.e. what img2dataset writes
for CC12M; captions are CC12M-like sentences naming 1-3 entities. Each training example decodes and
augments two images (the example and its cross-image partner) and tokenizes four texts; "img/s" counts
both images. `*_img_per_cpu_s` divides by the CPU time the process used, which stays meaningful on a
shared machine (the wall-clock rates drop when other jobs use the cores; the load average is printed).
Prints a table and one JSON line.
"""

import json
import os
import sys
import tempfile
import time

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli

_CAPTIONS = (
    'a man riding a horse on the beach at sunset', 'two dogs playing with a ball in the park',
    'a woman holding an umbrella next to a red car', 'a cat sleeping on a sofa near a laptop',
    'children eating pizza and cake at a birthday table', 'a boat on the lake with a house behind it',
    'a cup of coffee and a book on a wooden desk', 'a girl with a backpack waiting for the train',
    'a bird sitting on a bench in the snow', 'a plate with a sandwich, an apple and a banana',
)


def _photos():
  from skimage import data  # pylint: disable=g-import-not-at-top
  out = []
  for name in ('astronaut', 'coffee', 'chelsea', 'rocket', 'motorcycle_left', 'hubble_deep_field',
               'immunohistochemistry', 'retina', 'colorwheel', 'logo'):
    try:
      img = np.asarray(getattr(data, name)())
    except Exception:  # pylint: disable=broad-except  (some samples need a download; skip them)
      continue
    if img.ndim == 2:
      img = np.stack([img] * 3, -1)
    out.append(img[..., :3].astype(np.uint8))
  if not out:
    raise RuntimeError('scikit-image sample photos are not available; pip install scikit-image')
  return out


def make_source(root: str, n: int, seed: int = 0) -> str:
  """n JPEGs (longer side 512) + a TSV of (path, caption). Returns the TSV path."""
  rng = np.random.default_rng(seed)
  photos = _photos()
  os.makedirs(os.path.join(root, 'img'), exist_ok=True)
  lines = ['filepath\tcaption']
  for i in range(n):
    p = photos[i % len(photos)]
    h, w = p.shape[:2]
    ch, cw = int(h * rng.uniform(0.6, 1)), int(w * rng.uniform(0.6, 1))
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    im = Image.fromarray(p[y:y + ch, x:x + cw])
    aspect = rng.choice([4 / 3, 3 / 4, 1.0, 16 / 9])
    size = (512, int(512 / aspect)) if aspect >= 1 else (int(512 * aspect), 512)
    im.resize(size, Image.BICUBIC).save(os.path.join(root, 'img', f'{i:05d}.jpg'), quality=90)
    lines.append(f'img/{i:05d}.jpg\t{_CAPTIONS[i % len(_CAPTIONS)]}')
  path = os.path.join(root, 'pairs.tsv')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return path


def bench_builder(tsv: str, out: str, workers: int, shard_size: int):
  from ovseg_jax.data import build_cc4m  # pylint: disable=g-import-not-at-top
  from ovseg_jax.data import shard_writer  # pylint: disable=g-import-not-at-top
  tasks = build_cc4m.discover_tasks([tsv], shard_size=shard_size)
  t0 = time.time()
  rep = shard_writer.run_build(tasks, build_cc4m.iter_task, output=out, name='cc4m', split='train',
                               opts=shard_writer.Options(), num_workers=workers, overwrite=True,
                               log=open(os.devnull, 'w'))
  dt = time.time() - t0
  return rep['counts']['seen'] / dt, rep


def bench_transform(config, n: int, *, deit: bool):
  """Per-process cost of one grain worker's job: read + decode + augment (x2 images) + tokenize (x4)."""
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = pipeline.dataset_path(config)
  meta = pipeline.tfds_builder.read_meta(path)
  tr = pipeline.ExampleTransform(path=path, split='train', image_size=config.data.image_size,
                                 crop_scale=config.data.crop_scale, deit_aug=deit,
                                 entity_mode=config.data.entity_mode, vocab=meta['vocab'],
                                 max_length=config.model.text.max_length)
  rng = np.random.default_rng(0)
  tr(0, rng)  # opens the source and tokenizer
  count = len(tr._source)  # pylint: disable=protected-access
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(n):
    out = tr(i % count, rng)
    assert '_bad' not in out
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  # the components, for the record
  data = [tr._source[i]['image'] for i in range(min(count, 64))]  # pylint: disable=protected-access
  t0 = time.perf_counter()
  for i in range(n):
    pipeline.augment.train_image(data[i % len(data)], rng, config.data.image_size, deit=deit,
                                 crop_scale=config.data.crop_scale)
  img_dt = (time.perf_counter() - t0) / n
  caps = [tr._read(i % count)[1] for i in range(64)]  # pylint: disable=protected-access
  t0 = time.perf_counter()
  for i in range(n):
    tr._tok([caps[i % 64]] * 4)  # pylint: disable=protected-access
  tok_dt = (time.perf_counter() - t0) / n
  return 2 * n / dt, 2 * n / cpu, img_dt, tok_dt


def bench_iterator(config, batches: int):
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(it)
  startup = time.time() - t0
  t0 = time.time()
  for _ in range(batches):
    next(it)
  dt = time.time() - t0
  it.close()
  return 2 * batches * it.per_host_batch / dt, startup


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_integer('num_images', 256, 'source images written', flag_values=fv)
  flags.DEFINE_integer('size', 224, 'training image size', flag_values=fv)
  flags.DEFINE_integer('examples', 200, 'examples timed per transform measurement', flag_values=fv)
  flags.DEFINE_integer('workers', 2, 'grain worker processes for the iterator run', flag_values=fv)
  flags.DEFINE_integer('batch', 32, 'iterator batch size', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m bench.input_pipeline', doc=__doc__)
  from configs import common  # pylint: disable=g-import-not-at-top
  cpus = os.cpu_count()
  load = os.getloadavg()[0]
  with tempfile.TemporaryDirectory() as tmp:
    tsv = make_source(os.path.join(tmp, 'src'), a.num_images)
    b1, _ = bench_builder(tsv, os.path.join(tmp, 'tfds'), 1, a.num_images // 4)
    b2, rep = bench_builder(tsv, os.path.join(tmp, 'tfds'), 2, a.num_images // 4)
    c = common.base_config()
    c.model = common.model_config(width=768)
    c.data.data_dir = os.path.join(tmp, 'tfds')
    c.data.dataset = 'cc4m'
    c.data.image_size = a.size
    c.data.entity_mode = 'fixed'
    c.train.global_batch_size = a.batch
    res = {'cpus': cpus, 'load_avg_1min_at_start': round(load, 1), 'image_px': a.size,
           'source_longer_side': 512,
           'builder_records_per_s_1proc': round(b1, 1), 'builder_records_per_s_2proc': round(b2, 1),
           'kept': rep['counts']['kept']}
    for name, deit in (('stage2_rrc_flip', False), ('stage1_deit', True)):
      ips, ipcpu, img_dt, tok_dt = bench_transform(c, a.examples, deit=deit)
      res[f'{name}_img_per_s_per_process'] = round(ips, 1)
      res[f'{name}_img_per_cpu_s'] = round(ipcpu, 1)
      res[f'{name}_ms_per_image_decode_augment'] = round(img_dt * 1e3, 2)
      res['ms_per_example_tokenize_4_texts'] = round(tok_dt * 1e3, 2)
    for workers in (0, a.workers):
      c.data.num_workers = workers
      c.data.deit_aug = False
      ips, startup = bench_iterator(c, max(4, a.examples // a.batch))
      res[f'grain_iterator_img_per_s_workers{workers}'] = round(ips, 1)
      res[f'grain_iterator_startup_s_workers{workers}'] = round(startup, 1)
  width = max(len(k) for k in res)
  for k, v in res.items():
    print(f'{k:{width}}  {v}')
  print(json.dumps(res))
  return 0


if __name__ == '__main__':
  sys.exit(main())
