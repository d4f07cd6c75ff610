r"""Segment images with any class names: colour overlay + legend, optional raw scores and label PNGs.

  python -m ovseg_jax.segment --checkpoint DIR --image cat.jpg --classes "cat,dog,potted plant" \
      --output out.png [--background_threshold 0.9] [--save_scores scores.npy] [--save_labels labels.png]
  python -m ovseg_jax.segment --checkpoint DIR --images photos/ --classes "cat,dog" --output out_dir/

With one image, --output / --save_scores / --save_labels are file paths. With several images (repeated
--image, or --images DIR) they are folders, and each image writes <stem>.png / <stem>.npy there.
--save_scores writes the float32 [C, H, W] softmax scores before the argmax (background first unless
--no_background). Unreadable images are reported and skipped; the run ends with a count.
`--eval.KEY=VALUE` overrides one eval setting (e.g. --eval.templates=imagenet80, --eval.window_batch=8).
"""

import os
import sys

from absl import flags
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovseg_jax import cli
from ovseg_jax import eval_datasets

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
  argv = cli.rewrite_deprecated(cli.argv_or_sys(argv), DEPRECATED)
  return cli.parse(fv, argv, prog='python -m ovseg_jax.segment', doc=__doc__,
                   required=('checkpoint', 'classes', 'output'), one_of=[('image', 'images')], eval_settings=True)


def _inputs(args) -> list:
  paths = list(args.image)
  if args.images:
    if not os.path.isdir(args.images):
      raise FileNotFoundError(f'expected a folder of images at {args.images}')
    paths += sorted(os.path.join(args.images, f) for f in os.listdir(args.images)
                    if f.lower().endswith(IMAGE_EXTENSIONS))
  if not paths:
    raise ValueError('give at least one --image or an --images folder with images in it')
  return paths


def _target(path: str | None, src: str, many: bool, ext: str) -> str | None:
  if path is None:
    return None
  if many or os.path.isdir(path):
    os.makedirs(path, exist_ok=True)
    return os.path.join(path, os.path.splitext(os.path.basename(src))[0] + ext)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return path


def run(args) -> tuple[int, int]:
  """Segments every input; returns (done, skipped)."""
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  classes = [c.strip() for c in args.classes.split(',') if c.strip()]
  if not classes:
    raise ValueError(f'--classes {args.classes!r} names no class')
  paths = _inputs(args)
  many = len(paths) > 1
  if many and os.path.splitext(args.output)[1].lower() in IMAGE_EXTENSIONS:
    raise ValueError(f'with {len(paths)} images --output must be a folder, not {args.output}')
  background = not args.no_background
  segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **args.eval)
  names = segmenter.class_list(classes, background)
  done, skipped = 0, 0
  bar = tqdm(paths, desc='segment', unit='img', file=sys.stderr, disable=not many, dynamic_ncols=True)
  for path in bar:
    try:
      image = eval_datasets.read_image(path)
      labels, scores = segmenter.segment(image, classes, background,
                                         background_threshold=args.background_threshold)
    except (OSError, ValueError) as e:  # PIL raises OSError subclasses for unreadable / truncated files
      bar.write(f'skipped {path}: {e}', file=sys.stderr)
      skipped += 1
      continue
    render_overlay(image, labels, names, background).save(_target(args.output, path, many, '.png'))
    if args.save_scores:
      np.save(_target(args.save_scores, path, many, '.npy'), scores.astype(np.float32))
    if args.save_labels:
      eval_datasets.write_label_png(_target(args.save_labels, path, many, '.png'), labels)
    found = [names[c] for c in np.unique(labels) if not (background and c == 0)]
    if not many:
      print(f'{path}: {", ".join(found) or "background only"} -> {args.output}')
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
  print(f'segmented {done} image(s), skipped {skipped}')
  return 0 if done else 1


if __name__ == '__main__':
  sys.exit(main())
