"""Input pipeline throughput, before -> after in one run: the work one grain worker does per training example
at 224 px, builder records/s, and the whole grain iterator.

  python -m bench.input_pipeline [--num_images 256 --size 224 --examples 200 --batch 32]

Source images are real photos (scikit-image's sample images: astronaut, coffee, chelsea, rocket, ...)
cropped and resized to a longer side of 512 px and saved as JPEG quality 90, i.e. what img2dataset writes
for CC12M; captions are CC12M-like sentences naming 1-3 entities.

Two paths per recipe, interleaved in one run:
  before  the workers normalise to float32 on the host (and fill the stage-1 erasing box there), and every
          example decodes + augments its cross-image partner and tokenizes four texts (`HostNormalize`
          below is that old host work, kept only in this benchmark);
  after   the workers emit uint8 (normalised and erased on the device: ovseg_jax/device_images.py), and a
          stage-1 run reads no partner (data/pipeline.py `needs_cross_image`): one image, three texts.
Rates are per CPU-second of this process (`*_per_cpu_s`), which stays meaningful on a shared machine (the
wall-clock rates drop when other jobs use the cores; the load average is printed). `*_batch_mib`: bytes of
one per-host batch of --batch examples, what crosses worker -> main process -> device.
Prints a table and, last, one JSON line.
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


def _transform(config, *, deit: bool, cross_image: bool):
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  path = pipeline.dataset_path(config)
  meta = pipeline.tfds_builder.read_meta(path)
  return pipeline.ExampleTransform(path=path, split='train', image_size=config.data.image_size,
                                   crop_scale=config.data.crop_scale, deit_aug=deit,
                                   entity_mode=config.data.entity_mode, vocab=meta['vocab'],
                                   max_length=config.model.text.max_length, cross_image=cross_image)


class HostNormalize:
  """The workers' job before uint8 batches (the "before" path, kept only here): normalise every image to
  float32 on the host and fill its erase box with N(0, 1) there (from a pre-drawn buffer: the box's normals
  are already drawn once by augment.erase_box, as they were by the old host-side erasing)."""

  def __init__(self, size: int):
    self.noise = np.random.default_rng(0).standard_normal((size, size, 3), dtype=np.float32)

  def __call__(self, out: dict) -> dict:
    from ovseg_jax.data import augment  # pylint: disable=g-import-not-at-top
    for k in ('image', 'cross_image'):
      if k in out:
        x = augment.normalize(out[k])
        box = out.pop(f'{k}_erase_box', None)
        if box is not None and box[2]:
          t, l, h, w = (int(v) for v in box)
          x[t:t + h, l:l + w] = self.noise[:h, :w]
        out[k] = x
    return out


def batch_bytes(example: dict, batch: int) -> int:
  """Bytes of a per-host batch of `batch` such examples (what crosses worker -> main process -> device)."""
  return batch * sum(np.asarray(v).nbytes for k, v in example.items() if not k.startswith('_'))


def bench_transform(config, n: int, *, deit: bool, cross_image: bool, host_normalize: bool, batch: int):
  """Per-process cost of one grain worker's job for n examples: read + decode + augment (1 or 2 images) +
  tokenize (3 or 4 texts) (+ host normalisation on the "before" path). -> dict of rates and bytes."""
  tr = _transform(config, deit=deit, cross_image=cross_image)
  post = HostNormalize(config.data.image_size) if host_normalize else (lambda out: out)
  rng = np.random.default_rng(0)
  tr(0, rng)  # opens the source and tokenizer
  count = len(tr._source)  # pylint: disable=protected-access
  images_per_example = 2 if cross_image else 1
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(n):
    out = post(tr(i % count, rng))
    assert '_bad' not in out
  dt, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {'n': n, 'cpu': cpu, 'wall': dt, 'batch_bytes': batch_bytes(out, batch),
          'images_per_example': images_per_example}


def bench_components(config, n: int, *, deit: bool):
  """ms per image of decode + augment (uint8 out), and ms of host normalisation (the "before" path)."""
  from ovseg_jax.data import augment  # pylint: disable=g-import-not-at-top
  tr = _transform(config, deit=deit, cross_image=False)
  rng = np.random.default_rng(0)
  tr(0, rng)
  count = len(tr._source)  # pylint: disable=protected-access
  data = [tr._source[i]['image'] for i in range(min(count, 64))]  # pylint: disable=protected-access
  t0 = time.process_time()
  outs = [augment.train_image(data[i % len(data)], rng, config.data.image_size, deit=deit,
                              crop_scale=config.data.crop_scale)[0] for i in range(n)]
  img_dt = (time.process_time() - t0) / n
  t0 = time.process_time()
  for x in outs:
    augment.normalize(x)
  norm_dt = (time.process_time() - t0) / n
  caps = [tr._read(i % count)[1] for i in range(64)]  # pylint: disable=protected-access
  t0 = time.process_time()
  for i in range(n):
    tr._tok([caps[i % 64]] * 4)  # pylint: disable=protected-access
  tok_dt = (time.process_time() - t0) / n
  return img_dt, norm_dt, tok_dt


def bench_iterator(config, batches: int, host_normalize: bool):
  """The whole grain iterator in this process (num_workers=0: its read threads, counted in process_time)."""
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  post = HostNormalize(config.data.image_size) if host_normalize else None
  t0 = time.time()
  it = pipeline.make_train_iterator(config, process_index=0, process_count=1)
  next(it)
  startup = time.time() - t0
  t0, c0 = time.time(), time.process_time()
  for _ in range(batches):
    b = next(it)
    if post is not None:   # the old workers' normalisation, per example
      rows = [post({k: v[i] for k, v in b.items()}) for i in range(it.per_host_batch)]
      b = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  dt, cpu = time.time() - t0, time.process_time() - c0
  it.close()
  n = batches * it.per_host_batch
  return n / cpu, n / dt, startup, sum(v.nbytes for v in b.values())


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_integer('num_images', 256, 'source images written', flag_values=fv)
  flags.DEFINE_integer('size', 224, 'training image size', flag_values=fv)
  flags.DEFINE_integer('examples', 200, 'examples timed per transform measurement', flag_values=fv)
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
           'source_longer_side': 512, 'batch': a.batch,
           'builder_records_per_s_1proc': round(b1, 1), 'builder_records_per_s_2proc': round(b2, 1),
           'kept': rep['counts']['kept']}
    # before: float32 normalised on the host, the partner always decoded; after: uint8, normalised (and the
    # stage-1 box erased) on the device, stage 1 without the partner. Interleaved, so load drifts hit both.
    paths = {  # name: (deit, partner, host normalisation)
        'stage1_before': (True, True, True), 'stage1_after': (True, False, False),
        'stage2_before': (False, True, True), 'stage2_after': (False, True, False)}
    runs = {name: [] for name in paths}
    for stage in (1, 2):   # before, after, after, before: a drift in load or a warm cache favours neither
      for which in ('before', 'after', 'after', 'before'):
        name = f'stage{stage}_{which}'
        deit, partner, host = paths[name]
        runs[name].append(bench_transform(c, a.examples, deit=deit, cross_image=partner, host_normalize=host,
                                          batch=a.batch))
    for name, rs in runs.items():
      n, cpu, wall = (sum(r[k] for r in rs) for k in ('n', 'cpu', 'wall'))
      res[f'{name}_examples_per_cpu_s'] = round(n / cpu, 1)
      res[f'{name}_images_per_cpu_s'] = round(rs[0]['images_per_example'] * n / cpu, 1)
      res[f'{name}_examples_per_s_wall'] = round(n / wall, 1)
      res[f'{name}_batch_mib'] = round(rs[0]['batch_bytes'] / 2 ** 20, 2)
    for stage in (1, 2):
      res[f'stage{stage}_examples_per_cpu_s_speedup'] = round(
          res[f'stage{stage}_after_examples_per_cpu_s'] / res[f'stage{stage}_before_examples_per_cpu_s'], 2)
      res[f'stage{stage}_batch_bytes_ratio'] = round(
          res[f'stage{stage}_before_batch_mib'] / res[f'stage{stage}_after_batch_mib'], 2)
    for name, deit in (('stage2', False), ('stage1_deit', True)):
      img_dt, norm_dt, tok_dt = bench_components(c, a.examples, deit=deit)
      res[f'{name}_cpu_ms_per_image_decode_augment'] = round(img_dt * 1e3, 2)
      res[f'{name}_cpu_ms_per_image_host_normalize'] = round(norm_dt * 1e3, 2)
      res['cpu_ms_per_example_tokenize_4_texts'] = round(tok_dt * 1e3, 2)
    # the whole grain iterator, stage-1 recipe: before = the partner decoded (a stage-2 run's pipeline) +
    # host normalisation; after = the stage-1 pipeline as the trainer gets it
    c.data.num_workers = 0
    c.data.deit_aug = True
    for name, stage, host in (('before', 2, True), ('after', 1, False)):
      c.stage = stage
      ex_cpu, ex_wall, startup, nbytes = bench_iterator(c, max(4, a.examples // a.batch), host)
      res[f'stage1_iterator_{name}_examples_per_cpu_s'] = round(ex_cpu, 1)
      res[f'stage1_iterator_{name}_examples_per_s_wall'] = round(ex_wall, 1)
      res[f'stage1_iterator_{name}_batch_mib'] = round(nbytes / 2 ** 20, 2)
    res['stage1_iterator_examples_per_cpu_s_speedup'] = round(
        res['stage1_iterator_after_examples_per_cpu_s'] / res['stage1_iterator_before_examples_per_cpu_s'], 2)
    res['load_avg_1min_at_end'] = round(os.getloadavg()[0], 1)
  width = max(len(k) for k in res)
  for k, v in res.items():
    print(f'{k:{width}}  {v}')
  print(json.dumps(res))
  return 0


if __name__ == '__main__':
  sys.exit(main())
