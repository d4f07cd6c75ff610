"""The embedded synthetic caption dataset: coloured shapes on textured backgrounds, captions, masks.

  python -m ovseg_jax.data.synthetic --output runs/data --split train --num_images 4000 --seed 0 --format tfds
  python -m ovseg_jax.data.synthetic --output runs/voc_val --split val --num_images 200 --seed 1 --format voc

Each image (a side drawn from [--min_size, --max_size], default 64-128 px) holds 1-3 objects of distinct
classes SHAPES = circle, square, triangle, star, cross, ring, each in one of COLOURS = red, green, blue,
yellow, purple, orange, with a random size (circumradius 24-38 % of the short side), position and rotation,
on a stripes / noise / gradient / checks background of low saturation. A class is its outline and its own
surface pattern (PATTERNS: plain, stripes, dots, checks, grid, speckle, in a darker shade of the object's
colour), the way a zebra is its outline and its stripes: a from-scratch tiny ViT learns patterns from
captions in minutes, outlines alone not (bench/RESULTS.md "End to end"). The caption names every object among distractor
words, from a grammar whose spatial relations are true ("a small star to the left of a blue ring"); the
colour (--colour_prob) and the background (--background_prob) are named only sometimes, sizes are
attributes, the entity set is the six class names (`entities.SYNTHETIC`).

Held-out split ("unseen combinations"): split 'train' never contains
  * the (shape, colour) pairs of HELD_OUT_COLOURS (each shape loses one colour, each colour one shape):
    circle-purple, square-orange, triangle-red, star-green, cross-blue, ring-yellow;
  * the co-occurrences HELD_OUT_PAIRS (both shapes in one image): circle+star, square+cross, triangle+ring.
Every other split ('val', 'test', ...) draws images in which at least one object is a held-out
(shape, colour) pair and, when the image holds two or more objects, half of the time a held-out
co-occurrence too. Sizes, positions, rotations and textures are fresh continuous draws per image, and the
per-image random stream depends on (seed, split, index), so different seeds give disjoint images.

--format tfds writes through the CC4M builder's shard workers (`shard_writer.run_build`, dataset name
`synthetic_captions`), so training reads it through the real pipeline. --format voc writes
JPEGImages/, SegmentationClass/ (palette PNGs: 0 background, 1..6 = SHAPES order, 255 = a one-pixel
ignore band just outside each object, where JPEG bleeds its colour), ImageSets/Segmentation/<split>.txt,
class_names.txt (background first) and captions.txt.
"""

import io
import math
import os
import sys
import time

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import shard_writer

SHAPES = entities_lib.SHAPES
COLOURS = ('red', 'green', 'blue', 'yellow', 'purple', 'orange')
_RGB = {'red': (215, 35, 35), 'green': (35, 165, 50), 'blue': (35, 70, 215), 'yellow': (235, 215, 35),
        'purple': (135, 45, 175), 'orange': (245, 135, 25)}
HELD_OUT_COLOURS = {'circle': 'purple', 'square': 'orange', 'triangle': 'red', 'star': 'green',
                    'cross': 'blue', 'ring': 'yellow'}
HELD_OUT_PAIRS = (('circle', 'star'), ('square', 'cross'), ('triangle', 'ring'))
BACKGROUNDS = ('striped', 'noisy', 'gradient', 'checkered')
IGNORE = 255
R_MIN, R_MAX = 0.24, 0.38   # object circumradius, as a fraction of the image's short side
PATTERN_PERIOD = 0.11       # pattern period, as a fraction of the image's short side (~7 px at 64 px)
PATTERN_SHADE = 0.3         # brightness factor of the pattern's dark parts
# Caption style: how often an object's colour / the background is named. Rare, so that matching captions to
# images needs the object classes: with every colour named, the contrastive loss fell to ~0.8 on colours and
# backgrounds alone while the shape classes stayed unlearned (bench/RESULTS.md "End to end").
COLOUR_PROB, BACKGROUND_PROB = 0.25, 0.2
DATASET_NAME = 'synthetic_captions'

_BG_PHRASES = {
    'striped': ('on a striped background', 'over stripes', 'against a striped pattern'),
    'noisy': ('on a noisy background', 'over a grainy texture', 'against a speckled backdrop'),
    'gradient': ('on a gradient background', 'over a smooth gradient', 'against a shaded backdrop'),
    'checkered': ('on a checkered background', 'over a checkerboard', 'against a tiled pattern'),
}
_OPENERS = ('', '', 'a picture of ', 'an image showing ', 'there is ', 'this drawing has ', 'a photo of ',
            'we can see ', 'a simple scene with ')
_SIZE_WORDS = {'small': ('small', 'tiny', 'little'), 'medium': ('', 'medium'),
               'large': ('large', 'big', 'huge')}
_EXTRA_ADJ = ('', '', '', 'bright ', 'flat ', 'shiny ', 'plain ')


def _pair_ok(shapes) -> bool:
  s = set(shapes)
  return not any(a in s and b in s for a, b in HELD_OUT_PAIRS)


def sample_layout(rng: np.random.Generator, split: str, size: int):
  """Objects [(shape, colour, cx, cy, r, angle)] for one image, respecting the split's combination rule."""
  heldout_split = split != 'train'
  for _ in range(100):
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    shapes = list(rng.choice(SHAPES, size=n, replace=False))
    colours = [str(rng.choice(COLOURS)) for _ in shapes]
    if not heldout_split:
      colours = [c if c != HELD_OUT_COLOURS[s] else str(rng.choice(
          [x for x in COLOURS if x != HELD_OUT_COLOURS[s]])) for s, c in zip(shapes, colours)]
      if not _pair_ok(shapes):
        continue
    else:
      if n >= 2 and rng.random() < 0.5:
        a, b = HELD_OUT_PAIRS[int(rng.integers(len(HELD_OUT_PAIRS)))]
        shapes[:2] = [a, b]
        if n == 3 and shapes[2] in (a, b):
          shapes[2] = str(rng.choice([s for s in SHAPES if s not in (a, b)]))
      j = int(rng.integers(n))
      colours[j] = HELD_OUT_COLOURS[shapes[j]]
    break
  objs = []
  for s, c in zip(shapes, colours):
    for _ in range(30):
      r = float(rng.uniform(R_MIN, R_MAX)) * size
      cx, cy = (float(v) for v in rng.uniform(r * 0.8, size - r * 0.8, size=2))
      if all(math.hypot(cx - o[2], cy - o[3]) > 0.75 * (r + o[4]) for o in objs):
        break
    objs.append((str(s), c, cx, cy, r, float(rng.uniform(0, 2 * math.pi))))
  return objs


def _polygon_mask(xs, ys, verts) -> np.ndarray:
  """Even-odd point-in-polygon for pixel centres, vectorised over pixels. verts [V, 2] (x, y)."""
  inside = np.zeros(xs.shape, bool)
  x0, y0 = verts[-1]
  for x1, y1 in verts:
    cond = (y1 > ys) != (y0 > ys)
    with np.errstate(divide='ignore', invalid='ignore'):
      xint = (x0 - x1) * (ys - y1) / (y0 - y1) + x1
    inside ^= cond & (xs < xint)
    x0, y0 = x1, y1
  return inside


def _regular(n, r, angle, cx, cy, radii=None):
  t = angle + np.arange(n) * 2 * np.pi / n
  rr = np.full(n, r) if radii is None else np.asarray(radii)
  return np.stack([cx + rr * np.cos(t), cy + rr * np.sin(t)], -1)


def shape_mask(shape: str, cx, cy, r, angle, xs, ys) -> np.ndarray:
  """Boolean [H, W] mask of one shape (r = circumscribed radius)."""
  if shape == 'circle':
    return (xs - cx) ** 2 + (ys - cy) ** 2 <= (0.85 * r) ** 2
  if shape == 'ring':
    d2 = (xs - cx) ** 2 + (ys - cy) ** 2
    return (d2 <= (0.95 * r) ** 2) & (d2 >= (0.45 * r) ** 2)
  if shape == 'square':
    return _polygon_mask(xs, ys, _regular(4, r, angle, cx, cy))
  if shape == 'triangle':
    return _polygon_mask(xs, ys, _regular(3, r, angle, cx, cy))
  if shape == 'star':
    return _polygon_mask(xs, ys, _regular(10, r, angle, cx, cy, radii=[r, 0.42 * r] * 5))
  if shape == 'cross':
    a, b = r * 0.95, r * 0.32
    base = np.array([(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b),
                     (-a, b), (-b, b), (-b, a)])
    c, s = math.cos(angle), math.sin(angle)
    verts = base @ np.array([[c, s], [-s, c]]) + np.array([cx, cy])
    return _polygon_mask(xs, ys, verts)
  raise ValueError(f'unknown shape {shape!r}')


# Each object class has a surface pattern of its own (the way a zebra has stripes): a from-scratch tiny ViT
# cannot learn outline shapes from captions in a few CPU minutes (a supervised probe of the same encoder stays
# at chance after 600 steps), but a class-specific texture is visible inside every 8x8 patch. The pattern is
# drawn in a darker shade of the object's own colour, so colour stays a free attribute.
PATTERNS = {'circle': 'plain', 'square': 'stripes', 'triangle': 'dots', 'star': 'checks', 'cross': 'grid',
            'ring': 'speckle'}


def pattern_mask(kind: str, xs, ys, cx, cy, angle, period, rng) -> np.ndarray:
  """Boolean [H, W]: where the object's pattern darkens it (object-centred, rotated with the object)."""
  c, s = math.cos(angle), math.sin(angle)
  u = ((xs - cx) * c + (ys - cy) * s) / period
  v = (-(xs - cx) * s + (ys - cy) * c) / period
  if kind == 'plain':
    return np.zeros(xs.shape, bool)
  if kind == 'stripes':
    return (np.floor(u) % 2) == 1
  if kind == 'checks':
    return ((np.floor(u) + np.floor(v)) % 2) == 1
  if kind == 'dots':
    return (u - np.round(u)) ** 2 + (v - np.round(v)) ** 2 < 0.28 ** 2 * 2
  if kind == 'grid':
    return (np.abs(u - np.round(u)) < 0.18) | (np.abs(v - np.round(v)) < 0.18)
  if kind == 'speckle':
    return rng.random(xs.shape) < 0.3
  raise ValueError(f'unknown pattern {kind!r}')


def background(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
  """float32 [H, W, 3] in 0-255, low saturation so the named colours stay the salient objects."""
  def muted():
    grey = rng.uniform(70, 200)
    return grey + rng.uniform(-35, 35, size=3)
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
  c1, c2 = muted(), muted()
  if kind == 'striped':
    t = rng.uniform(0, np.pi)
    period = rng.uniform(6, 18)
    u = (xs * np.cos(t) + ys * np.sin(t)) / period
    a = (np.floor(u) % 2)[..., None]
  elif kind == 'checkered':
    period = rng.uniform(6, 16)
    t = rng.uniform(0, np.pi / 2)
    u = (xs * np.cos(t) + ys * np.sin(t)) / period
    v = (-xs * np.sin(t) + ys * np.cos(t)) / period
    a = ((np.floor(u) + np.floor(v)) % 2)[..., None]
  elif kind == 'gradient':
    t = rng.uniform(0, 2 * np.pi)
    u = xs * np.cos(t) + ys * np.sin(t)
    a = ((u - u.min()) / max(float(np.ptp(u)), 1e-6))[..., None]
  elif kind == 'noisy':
    cells = int(rng.integers(4, 12))
    low = rng.random((cells, cells)).astype(np.float32)
    a = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                   np.float32)[..., None] / 255.0
  else:
    raise ValueError(f'unknown background {kind!r}')
  img = c1 * (1 - a) + c2 * a
  img = img + rng.normal(0, 6, size=(h, w, 1)).astype(np.float32)
  return img.astype(np.float32)


def render(objs, bg_kind: str, size: tuple, rng: np.random.Generator):
  """-> (uint8 image [H, W, 3], uint8 label [H, W] with 0 / 1..6 / 255 on borders)."""
  h, w = size
  img = background(rng, bg_kind, h, w)
  label = np.zeros((h, w), np.uint8)
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  edge = np.zeros((h, w), bool)
  for shape, colour, cx, cy, r, angle in objs:
    m = shape_mask(shape, cx, cy, r, angle, xs, ys)
    base = np.asarray(_RGB[colour], np.float32) + rng.uniform(-18, 18, size=3)
    shade = 1.0 + 0.12 * ((xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)) / max(r, 1.0)
    period = max(3.0, PATTERN_PERIOD * min(h, w))
    dark = pattern_mask(PATTERNS[shape], xs, ys, cx, cy, angle, period, rng)
    shade = shade * np.where(dark, PATTERN_SHADE, 1.0)
    img[m] = np.clip(base[None, :] * shade[m][:, None], 0, 255)
    label[m] = SHAPES.index(shape) + 1
    edge[m] = False
    # the ignore band: pixels just outside the object (4-neighbours), where JPEG bleeds its colour;
    # every object pixel keeps its label
    grow = np.zeros_like(m)
    grow[:-1] |= m[1:]
    grow[1:] |= m[:-1]
    grow[:, :-1] |= m[:, 1:]
    grow[:, 1:] |= m[:, :-1]
    edge |= grow & ~m
  label[edge] = IGNORE
  img += rng.normal(0, 3, size=img.shape).astype(np.float32)
  return np.clip(img, 0, 255).astype(np.uint8), label


def _relation(a, b, rng) -> str:
  dx, dy = b[2] - a[2], b[3] - a[3]
  if abs(dx) >= abs(dy) * 1.5:
    return 'to the left of' if dx > 0 else 'to the right of'
  if abs(dy) >= abs(dx) * 1.5:
    return 'above' if dy > 0 else 'below'
  return str(rng.choice(['next to', 'near', 'beside']))


def caption(objs, bg_kind: str, size: int, rng: np.random.Generator, colour_prob: float = COLOUR_PROB,
            background_prob: float = BACKGROUND_PROB) -> str:
  """Grammar: [opener] NP {relation|'and'} NP ... [background phrase]; NP = a [size] [adj] [colour] shape.

  colour_prob: probability that an object's colour is named; background_prob: that of the background phrase.
  """
  def np_(o):
    rel = o[4] / size
    bucket = 'small' if rel < 0.19 else 'large' if rel > 0.24 else 'medium'
    size_word = str(rng.choice(_SIZE_WORDS[bucket])) if rng.random() < 0.6 else ''
    adj = str(rng.choice(_EXTRA_ADJ)).strip()
    words = [size_word, adj, o[1] if rng.random() < colour_prob else '', o[0]]
    text = ' '.join(w for w in words if w)
    return ('an ' if text[0] in 'aeiou' else 'a ') + text
  parts = [np_(objs[0])]
  for prev, o in zip(objs, objs[1:]):
    link = _relation(prev, o, rng) if rng.random() < 0.6 else 'and'
    parts.append(f'{link} {np_(o)}')
  text = str(rng.choice(_OPENERS)) + ' '.join(parts)
  if rng.random() < background_prob:
    text += ' ' + str(rng.choice(_BG_PHRASES[bg_kind]))
  return text


def make_example(seed: int, split: str, index: int, min_size: int = 64, max_size: int = 128, *,
                 colour_prob: float = COLOUR_PROB, background_prob: float = BACKGROUND_PROB):
  """-> dict(image uint8 [H,W,3], label uint8 [H,W], caption str, objects list). Deterministic."""
  split_id = int.from_bytes(split.encode()[:8].ljust(8, b'\0'), 'little')
  rng = np.random.default_rng([seed, split_id, index])
  side = int(rng.integers(min_size, max_size + 1))
  aspect = float(rng.uniform(0.8, 1.25))
  h, w = (side, max(min_size, int(side * aspect))) if rng.random() < 0.5 else \
      (max(min_size, int(side * aspect)), side)
  objs = sample_layout(rng, split, min(h, w))
  # layout was sampled in a min(h, w) square: spread it over the full canvas
  sx, sy = w / min(h, w), h / min(h, w)
  objs = [(s, c, cx * sx, cy * sy, r, a) for s, c, cx, cy, r, a in objs]
  bg = str(rng.choice(BACKGROUNDS))
  image, label = render(objs, bg, (h, w), rng)
  text = caption(objs, bg, min(h, w), rng, colour_prob, background_prob)
  return {'image': image, 'label': label, 'caption': text, 'objects': objs, 'background': bg}


def _jpeg(image: np.ndarray, quality: int = 92) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, 'JPEG', quality=quality)
  return out.getvalue()


def iter_raw_records(task: shard_writer.Task):
  """The shard writer's reader: synthetic images [task.start, task.start + task.count) as RawRecords."""
  split, seed, min_size, max_size, colour_prob, background_prob = task.args
  for i in range(task.start, task.start + task.count):
    ex = make_example(seed, split, i, min_size, max_size, colour_prob=colour_prob,
                      background_prob=background_prob)
    yield shard_writer.RawRecord(f'{split}-{i:07d}', _jpeg(ex['image']), ex['caption'])


def voc_palette() -> list:
  """The PASCAL VOC colour map (index -> RGB), flattened for PIL's putpalette."""
  pal = []
  for i in range(256):
    r = g = b = 0
    c = i
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal += [r, g, b]
  return pal


def write_voc(output: str, split: str, num_images: int, seed: int, min_size: int, max_size: int,
              log=sys.stderr) -> None:
  """VOC-layout labelled split (see the module docstring)."""
  for d in ('JPEGImages', 'SegmentationClass', os.path.join('ImageSets', 'Segmentation')):
    os.makedirs(os.path.join(output, d), exist_ok=True)
  pal = voc_palette()
  ids, caps, t0 = [], [], time.time()
  for i in range(num_images):
    ex = make_example(seed, split, i, min_size, max_size)
    name = f'{split}_{i:06d}'
    with open(os.path.join(output, 'JPEGImages', name + '.jpg'), 'wb') as f:
      f.write(_jpeg(ex['image']))
    lab = Image.fromarray(ex['label'], mode='P')
    lab.putpalette(pal)
    lab.save(os.path.join(output, 'SegmentationClass', name + '.png'))
    ids.append(name)
    caps.append(f'{name}\t{ex["caption"]}')
    if (i + 1) % 200 == 0 or i + 1 == num_images:
      el = time.time() - t0
      print(f'\r[{i + 1}/{num_images}] images, ETA {el / (i + 1) * (num_images - i - 1):.0f}s ', end='',
            file=log, flush=True)
  print(file=log)
  with open(os.path.join(output, 'ImageSets', 'Segmentation', f'{split}.txt'), 'w') as f:
    f.write('\n'.join(ids) + '\n')
  with open(os.path.join(output, 'class_names.txt'), 'w') as f:
    f.write('\n'.join(('background',) + SHAPES) + '\n')
  with open(os.path.join(output, 'captions.txt'), 'w') as f:
    f.write('\n'.join(caps) + '\n')


def write_tfds(output: str, split: str, num_images: int, seed: int, min_size: int, max_size: int, *,
               colour_prob: float = COLOUR_PROB, background_prob: float = BACKGROUND_PROB, num_workers: int = 1,
               shard_size: int = 1000, overwrite: bool = False, log=sys.stderr) -> dict:
  """Writes the split through the CC4M builder path (dataset `synthetic_captions`). Returns the report."""
  tasks = [shard_writer.Task(i, 'synthetic', f'synthetic:{split}', start, min(shard_size, num_images - start),
                             (split, seed, min_size, max_size, colour_prob, background_prob))
           for i, start in enumerate(range(0, num_images, shard_size))]
  opts = shard_writer.Options(max_side=max(512, max_size), min_side=min(64, min_size), vocab='synthetic',
                              entity_mode='fixed')
  return shard_writer.run_build(tasks, iter_raw_records, output=output, name=DATASET_NAME, split=split,
                                opts=opts, num_workers=num_workers, overwrite=overwrite, log=log)


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('output', None, 'tfds data_dir (tfds) or the VOC root (voc)', flag_values=fv)
  flags.DEFINE_string('split', 'train', 'split name', flag_values=fv)
  flags.DEFINE_integer('num_images', None, 'images to write', flag_values=fv)
  flags.DEFINE_integer('seed', 0, 'the images are a function of (seed, split, index)', flag_values=fv)
  flags.DEFINE_enum('format', 'tfds', ['tfds', 'voc'], 'tfds: training data; voc: an evaluation folder',
                    flag_values=fv)
  flags.DEFINE_integer('min_size', 64, 'smallest image side', flag_values=fv)
  flags.DEFINE_integer('max_size', 128, 'largest image side', flag_values=fv)
  flags.DEFINE_float('colour_prob', COLOUR_PROB, 'probability a caption names an object colour', flag_values=fv)
  flags.DEFINE_float('background_prob', BACKGROUND_PROB, 'probability a caption ends with a background phrase',
                     flag_values=fv)
  flags.DEFINE_integer('num_workers', 1, 'worker processes (tfds)', flag_values=fv)
  flags.DEFINE_integer('shard_size', 1000, 'examples per shard (tfds)', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'tfds: rebuild an existing split', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m ovseg_jax.data.synthetic', doc=__doc__,
                required=('output', 'num_images'))
  try:
    if a.num_images <= 0:
      raise errors.UsageError(f'--num_images must be positive, got {a.num_images}')
    if not 32 <= a.min_size <= a.max_size <= 1024:
      raise errors.UsageError(
          f'need 32 <= --min_size ({a.min_size}) <= --max_size ({a.max_size}) <= 1024')
    if a.shard_size <= 0:
      raise errors.UsageError('--shard_size must be positive')
    t0 = time.time()
    if a.format == 'voc':
      write_voc(a.output, a.split, a.num_images, a.seed, a.min_size, a.max_size)
      print(f'wrote {a.num_images} images to {a.output} (VOC layout, {a.split}.txt) '
            f'in {time.time() - t0:.1f}s')
    else:
      report = write_tfds(a.output, a.split, a.num_images, a.seed, a.min_size, a.max_size,
                          colour_prob=a.colour_prob, background_prob=a.background_prob,
                          num_workers=a.num_workers, shard_size=a.shard_size, overwrite=a.overwrite)
      print(shard_writer.format_report(report))
      print(f'dataset: {report["dataset_dir"]} in {time.time() - t0:.1f}s')
  except (errors.UsageError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
