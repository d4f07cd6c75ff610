r"""Segment images with any class names: colour overlay + legend, optional raw scores and label PNGs.

  python -m ovseg_jax.segment --checkpoint DIR --image cat.jpg --classes "cat,dog,potted plant" \
      --output out.png [--background_threshold 0.9] [--save_scores scores.npy] [--save_labels labels.png]
  python -m ovseg_jax.segment --checkpoint DIR --images photos/ --classes "cat,dog" --output out_dir/

Outputs. With one --image, --output / --save_scores / --save_labels are file paths (an existing folder, or a
path with no extension, is a folder). With several images (repeated --image, or --images DIR) they are
folders, and each image writes <stem>.png / <stem>.npy there; when two inputs share a stem (x.jpg, x.png)
both keep their extension (x.jpg.png, x.png.png). --save_scores writes the float32 [C, H, W] softmax scores
before the argmax (background first unless --no_background); --save_labels, palette PNGs of class indices.
Refused with one line before anything is written: an output that would overwrite an input image (e.g.
--output equal to the input file or the --images folder) or another output, inputs with the same file name
in two folders, an output path under a regular file; in --classes an empty name, a name given twice (case
and spacing ignored: the text model is uncased), or 'background' while the background class is on.

Images are read with their EXIF orientation applied (outputs match what an image viewer shows). An image
that cannot be used (not an image, truncated or damaged, a folder, empty, over the pixel budget, smaller
than one patch) is skipped with one line naming it and the reason, and the run goes on to the end line
'segmented N image(s), skipped M (reasons)'. Pixel budget (width x height, read from the header before
decoding): --max_pixels, else $OVSEG_MAX_PIXELS, else 8192x8192 = 67,108,864.
Exit code: 0 when at least one image was segmented, 1 when every image was skipped, 2 for a usage error.
`--eval.KEY=VALUE` overrides one eval setting (e.g. --eval.templates=imagenet80, --eval.window_batch=8).
"""

import collections
import os
import sys

from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax import eval_datasets
from ovseg_jax import images

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm')


def class_colours(num_channels: int, background: bool) -> np.ndarray:
  """uint8 [C, 3]: VOC colours; channel 0 is black when it is the background."""
  pal = eval_datasets.voc_palette(256)
  if num_channels > 256 - (0 if background else 1):
    rng = np.random.default_rng(0)  # beyond the VOC map: fixed random colours
    pal = np.concatenate([pal, rng.integers(0, 256, (num_channels, 3), dtype=np.uint8)])
  return pal[:num_channels] if background else pal[1:num_channels + 1]


def render_overlay(image: np.ndarray, labels: np.ndarray, names, background: bool,
                   opacity: float = 0.5) -> Image.Image:
  """Blends class colours into the image and appends a legend of the classes found (largest first).

  Args:
    image: uint8 [H, W, 3].
    labels: int [H, W] channel index per pixel (0 = background when `background`).
    names: channel names, len C.
  Returns:
    PIL RGB image of height H + legend height.
  """
  colours = class_colours(len(names), background)
  colour_map = colours[labels]
  fg = labels != 0 if background else np.ones(labels.shape, bool)
  out = image.astype(np.float32)
  out[fg] = out[fg] * (1 - opacity) + colour_map[fg].astype(np.float32) * opacity
  out = out.round().clip(0, 255).astype(np.uint8)

  counts = np.bincount(labels.reshape(-1), minlength=len(names))
  found = [c for c in np.argsort(-counts, kind='stable') if counts[c] > 0 and not (background and c == 0)]
  font = ImageFont.load_default(size=14)
  row, pad = 20, 6
  h, w = labels.shape
  legend_h = pad * 2 + row * max(1, len(found))
  canvas = Image.new('RGB', (max(w, 160), h + legend_h), (255, 255, 255))
  canvas.paste(Image.fromarray(out), (0, 0))
  draw = ImageDraw.Draw(canvas)
  if not found:
    draw.text((pad, h + pad), 'no class found (all background)', fill=(0, 0, 0), font=font)
  for i, c in enumerate(found):
    y = h + pad + i * row
    draw.rectangle([pad, y + 2, pad + 14, y + 16], fill=tuple(int(v) for v in colours[c]), outline=(0, 0, 0))
    draw.text((pad + 22, y), f'{names[c]}  {100.0 * counts[c] / labels.size:.1f}%', fill=(0, 0, 0), font=font)
  return canvas


# Old spellings of eval settings, accepted until cli.REMOVED_IN with a deprecation line.
DEPRECATED = {'--set': '--eval.', '--templates': '--eval.templates', '--window_batch': '--eval.window_batch'}


def parse_args(argv=None):
  """Flags -> namespace; `.eval` holds the --eval.KEY=VALUE overrides given (cli.parse)."""
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder (convert official / export)',
                      flag_values=fv)
  flags.DEFINE_multi_string('image', [], 'input image', flag_values=fv)
  flags.DEFINE_string('images', None, 'folder of input images', flag_values=fv)
  flags.DEFINE_string('classes', None, 'comma-separated class names, e.g. "cat,dog,potted plant"', flag_values=fv)
  flags.DEFINE_string('output', None, 'overlay PNG (a folder when there are several images)', flag_values=fv)
  flags.DEFINE_float('background_threshold', None, 'background when the best class score is below it '
                     '(default eval.bg_threshold = 0.95)', flag_values=fv)
  flags.DEFINE_bool('no_background', False, 'no background class: every pixel gets a class', flag_values=fv)
  flags.DEFINE_string('save_scores', None, 'float32 [C, H, W] scores .npy (a folder for several images)',
                      flag_values=fv)
  flags.DEFINE_string('save_labels', None, 'palette label PNG (a folder for several images)', flag_values=fv)
  flags.DEFINE_integer('max_pixels', None, 'pixel budget: images whose header declares more pixels are skipped '
                       f'(default: ${images.ENV_MAX_PIXELS}, else {images.DEFAULT_MAX_PIXELS} = 8192x8192)',
                       flag_values=fv)
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), DEPRECATED)
  return cli.parse(fv, argv, prog='python -m ovseg_jax.segment', doc=__doc__,
                   required=('checkpoint', 'classes', 'output'), one_of=[('image', 'images')], eval_settings=True)


# ------------------------------------------------------------------------------------------------------------
# Checks made before anything is loaded or written.
# ------------------------------------------------------------------------------------------------------------

def parse_classes(text: str, background: bool) -> list:
  """'cat, dog ,potted plant' -> ['cat', 'dog', 'potted plant']; UsageError for an empty or repeated name."""
  names = [c.strip() for c in text.split(',')]
  if not any(names):
    raise errors.UsageError(f'--classes {text!r} names no class')
  seen = {}
  for i, name in enumerate(names):
    if not name:
      raise errors.UsageError(f'--classes {text!r}: class {i + 1} of {len(names)} is empty (a doubled or '
                              'trailing comma?)')
    key = ' '.join(name.split()).casefold()  # the text model is uncased: 'Cat' and 'cat' are one prompt
    if key in seen:
      raise errors.UsageError(f'--classes {text!r}: {seen[key]!r} and {name!r} are the same class (names are '
                              'compared ignoring case and spacing)')
    if background and key == 'background':
      raise errors.UsageError("--classes: 'background' is added as channel 0 by itself (background "
                              'threshold); remove it, or pass --no_background to prompt it as a class')
    seen[key] = name
  return names


def _file_id(path: str):
  """(device, inode) of an existing path, else None: equal ids are one file whatever the spelling (symlinks,
  hard links, case-insensitive file systems)."""
  try:
    st = os.stat(path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _same(a: str, b: str) -> bool:
  ida = _file_id(a)
  return ida is not None and ida == _file_id(b)


def _inputs(args) -> list:
  """The input paths in order, each once. A folder / unreadable file among them is skipped later."""
  paths = list(args.image)
  if args.images:
    if not os.path.exists(args.images):
      raise errors.UsageError(f'--images {args.images}: no such folder')
    if not os.path.isdir(args.images):
      raise errors.UsageError(f'--images {args.images} is a file; give a folder of images (or use --image)')
    paths += sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                    if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise errors.UsageError(f'no image in {args.images} (looked for {", ".join(IMAGE_EXTENSIONS)})'
                            if args.images else 'give at least one --image or an --images folder')
  unique, seen = [], set()
  for p in paths:
    key = os.path.normcase(os.path.realpath(p))
    if key in seen:
      print(f'note: {p} is given twice; it is segmented once', file=sys.stderr)
      continue
    seen.add(key)
    unique.append(p)
  return unique


def output_names(paths) -> dict:
  """{input path: output stem}: the file stem, or the whole file name when another input shares the stem
  (x.jpg, x.png -> 'x.jpg', 'x.png'). Stems are compared ignoring case (case-insensitive file systems)."""
  stems = {p: os.path.splitext(os.path.basename(p))[0] for p in paths}
  count = collections.Counter(s.casefold() for s in stems.values())
  names = {p: stems[p] if count[stems[p].casefold()] == 1 else os.path.basename(p) for p in paths}
  owner = {}
  for p, name in names.items():
    if name.casefold() in owner:
      raise errors.UsageError(f'{owner[name.casefold()]} and {p} would write the same output {name}.png; '
                              'rename one or segment them in separate runs')
    owner[name.casefold()] = p
  return names


_KINDS = (('output', '.png'), ('save_scores', '.npy'), ('save_labels', '.png'))


def _check_folder(folder: str, flag: str) -> None:
  """The nearest existing ancestor of `folder` must be a folder we may write in."""
  p = os.path.abspath(folder)
  while not os.path.lexists(p):
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    raise errors.UsageError(f'--{flag} {folder}: cannot create it, {p} is a file, not a folder')
  if not os.access(p, os.W_OK | os.X_OK):
    raise errors.UsageError(f'--{flag} {folder}: no permission to write in {p}')


def plan_outputs(args, paths: list, many: bool) -> dict:
  """{flag: {input path: absolute output file}} for every output flag given; UsageError, before anything is
  written, for a path that cannot be written or that would overwrite an input or another output."""
  names = output_names(paths) if many else None
  inputs = {i: p for p in reversed(paths) if (i := _file_id(p)) is not None}
  plan, written = {}, {}
  for flag, ext in _KINDS:
    value = getattr(args, flag)
    if value is None:
      continue
    suffix = os.path.splitext(value)[1].lower()
    as_folder = many or os.path.isdir(value) or not suffix
    if many and not os.path.isdir(value) and suffix in IMAGE_EXTENSIONS + ('.npy',):
      raise errors.UsageError(f'with {len(paths)} images --{flag} must be a folder, not {value}')
    if as_folder:
      if os.path.exists(value) and not os.path.isdir(value):
        raise errors.UsageError(f'--{flag} {value} is a file, not a folder' + (
            f' (with {len(paths)} images the outputs go to a folder)' if many else ''))
      _check_folder(value, flag)
      if args.images and os.path.isdir(value) and _same(value, args.images):
        raise errors.UsageError(f'--{flag} {value} is the input folder --images {args.images}: the outputs would '
                                'land among (and could overwrite) the inputs; give another folder')
      stems = names or {paths[0]: os.path.splitext(os.path.basename(paths[0]))[0]}
      targets = {p: os.path.abspath(os.path.join(value, stems[p] + ext)) for p in paths}
    else:
      if flag == 'output' and suffix not in IMAGE_EXTENSIONS:
        raise errors.UsageError(f'--output {value}: give an image file name such as out.png (or a folder)')
      if flag == 'save_labels' and suffix != '.png':
        raise errors.UsageError(f'--save_labels {value}: label maps are palette PNGs; give a .png name')
      target = value if flag != 'save_scores' or suffix == '.npy' else value + '.npy'  # np.save adds .npy
      _check_folder(os.path.dirname(os.path.abspath(target)), flag)
      targets = {paths[0]: os.path.abspath(target)}
    for p, target in targets.items():
      if os.path.isdir(target):
        raise errors.UsageError(f'--{flag}: {target} is a folder; cannot write the output for {p} there')
      q = inputs.get(_file_id(target))
      if q is not None:
        raise errors.UsageError(f'--{flag}: writing {target} would overwrite the input image {q}; '
                                'give another output path')
      key = os.path.normcase(target)
      if key in written:
        raise errors.UsageError(f'--{flag} and --{written[key]} would both write {target}; give distinct paths')
      written[key] = flag
    plan[flag] = targets
  return plan


# ------------------------------------------------------------------------------------------------------------
# The run.
# ------------------------------------------------------------------------------------------------------------

def _write(target: str, save) -> None:
  try:
    os.makedirs(os.path.dirname(target), exist_ok=True)
    save(target)
  except OSError as e:
    raise errors.UsageError(f'cannot write {target}: {e.strerror or e}') from None


def run(args) -> tuple[int, collections.Counter]:
  """Segments every input; returns (done, {reason: skipped count}). One stderr line per skipped image."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  background = not args.no_background
  classes = parse_classes(args.classes, background)
  max_pixels = images.resolve_max_pixels(args.max_pixels)
  paths = _inputs(args)
  many = len(paths) > 1 or bool(args.images)
  plan = plan_outputs(args, paths, many)
  segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **args.eval)
  names = segmenter.class_list(classes, background)
  done, skipped = 0, collections.Counter()
  bar = tqdm(paths, desc='segment', unit='img', file=sys.stderr, disable=not many, dynamic_ncols=True)
  for path in bar:
    try:
      image = images.read_rgb(path, max_pixels=max_pixels, exif_transpose=True)
      segmenter.check_size(*image.shape[:2])
    except images.ImageError as e:
      bar.write(f'skipped {e}', file=sys.stderr)
      skipped[e.reason.replace('_', ' ')] += 1
      continue
    except ValueError as e:  # check_size: smaller than one patch
      bar.write(f'skipped {path}: {e}', file=sys.stderr)
      skipped['too small'] += 1
      continue
    labels, scores = segmenter.segment(image, classes, background, background_threshold=args.background_threshold)
    _write(plan['output'][path], render_overlay(image, labels, names, background).save)
    if 'save_scores' in plan:
      _write(plan['save_scores'][path], lambda t: np.save(t, scores.astype(np.float32)))
    if 'save_labels' in plan:
      _write(plan['save_labels'][path], lambda t: eval_datasets.write_label_png(t, labels))
    found = [names[c] for c in np.unique(labels) if not (background and c == 0)]
    if not many:
      print(f'{path}: {", ".join(found) or "background only"} -> {plan["output"][path]}')
    done += 1
  bar.close()
  return done, skipped


@cli.entry_point
def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    done, skipped = run(args)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  total = sum(skipped.values())
  why = f' ({", ".join(f"{n} {r}" for r, n in sorted(skipped.items()))})' if total else ''
  print(f'segmented {done} image(s), skipped {total}{why}')
  return 0 if done else 1


if __name__ == '__main__':
  sys.exit(main())
