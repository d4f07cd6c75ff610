r"""Pictures of what the model learned: input | group map | prediction | ground truth, one PNG per image.

  python -m ovseg_jax.visualize --checkpoint runs/local/export --data_dir runs/local/val --num_images 6 \
      --output runs/local/pictures [--eval.short_side=128 ...]

The group map colours each pixel by its argmax group of the soft pixel->group assignment (the binding
module's Eq. 4 map, upsampled bilinearly as in inference), computed on the whole image at the eval short side.
The prediction is `Segmenter.segment` (Eq. 1, sliding windows, background by threshold); the ground truth is
the dataset's label PNG (255 = ignore, drawn white). An image that cannot be read (ovseg_jax/images.py: damaged,
over the pixel budget) is skipped with one line.
"""

import os
import sys

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ovseg_jax import cli
from ovseg_jax import eval_datasets
from ovseg_jax import images
from ovseg_jax import inference
from ovseg_jax import resize as resize_lib
from ovseg_jax import segment as segment_cli
from ovseg_jax.models.ovsegmentor import OVSegmentor

_GROUP_COLOURS = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                           (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                           (170, 255, 195)], np.uint8)


def group_map(segmenter: inference.Segmenter, image: np.ndarray) -> np.ndarray:
  """int [H, W]: argmax group per pixel of the soft assignment on the whole (rescaled) image."""
  h, w = image.shape[:2]
  x = inference.preprocess(image, int(segmenter.eval_config.short_side), int(segmenter.eval_config.long_side))
  out = segmenter.model.apply(segmenter.variables, jnp.asarray(x)[None], train=False,
                              method=OVSegmentor.encode_image)
  gh, gw = out['grid']
  soft = out['soft'][0].reshape(-1, gh, gw)  # [K, gh, gw]
  up = resize_lib.resize(soft, (h, w), 'bilinear', align_corners=False, spatial_axes=(-2, -1))
  return np.asarray(jnp.argmax(up, axis=0))


def _label_image(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
  out = np.full(labels.shape + (3,), 255, np.uint8)  # ignore (255) stays white
  valid = labels < len(colours)
  out[valid] = colours[labels[valid]]
  return out


def panel(image: np.ndarray, groups: np.ndarray, pred: np.ndarray, gt: np.ndarray, names,
          title: str = '') -> Image.Image:
  """One row of four tiles with captions and a legend of the classes in the prediction or the truth."""
  colours = segment_cli.class_colours(len(names), background=True)
  tiles = [image, _GROUP_COLOURS[groups % len(_GROUP_COLOURS)], _label_image(pred, colours),
           _label_image(gt, colours)]
  captions = ['input', 'group map', 'prediction', 'ground truth']
  h, w = image.shape[:2]
  scale = max(1, 160 // max(h, w))  # small synthetic images are enlarged (nearest) to stay readable
  th, tw = h * scale, w * scale
  font = ImageFont.load_default(size=13)
  present = sorted(set(np.unique(pred)) | set(np.unique(gt[gt != 255])))
  top, pad, legend_h = 18 if not title else 36, 4, 20
  title_w = int(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(title, font=font)) + 2 * pad
  canvas = Image.new('RGB', (max(4 * tw + 5 * pad, title_w), top + th + legend_h + pad), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  if title:
    draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
  for i, (tile, cap) in enumerate(zip(tiles, captions)):
    x0 = pad + i * (tw + pad)
    canvas.paste(Image.fromarray(tile).resize((tw, th), Image.NEAREST), (x0, top))
    draw.text((x0, top - 16), cap, fill=(0, 0, 0), font=font)
  x = pad
  for c in present:
    draw.rectangle([x, top + th + 5, x + 12, top + th + 17], fill=tuple(int(v) for v in colours[c]),
                   outline=(0, 0, 0))
    draw.text((x + 16, top + th + 4), names[c], fill=(0, 0, 0), font=font)
    x += 24 + int(draw.textlength(names[c], font=font))
  return canvas


def run(checkpoint_dir: str, data_dir: str, output: str, num_images: int, dataset: str = 'folder',
        eval_overrides: dict | None = None) -> list:
  """Writes one PNG per image for the first `num_images` of the split; returns their paths.

  `eval_overrides`: {config.eval key: value} over the checkpoint's saved eval settings (--eval.KEY=VALUE).
  """
  data = eval_datasets.load_dataset(dataset, data_dir, max_images=num_images)
  segmenter = inference.Segmenter.from_checkpoint(checkpoint_dir, **(eval_overrides or {}))
  names = list(data.class_names)
  fg = names[1:] if names[0] == 'background' else names
  os.makedirs(output, exist_ok=True)
  paths = []
  for sample in data.samples:
    try:
      image = eval_datasets.read_image(sample.image_path)
    except images.ImageError as e:  # unreadable / over the pixel budget: one line, and the next picture
      print(f'skipped {e}', file=sys.stderr)
      continue
    gt = eval_datasets.read_label_png(sample.label_path)
    pred, _ = segmenter.segment(image, fg, background=True, background_threshold=data.bg_threshold)
    caption = ''
    cap_file = os.path.join(data.root, 'captions.txt')
    if os.path.exists(cap_file):
      with open(cap_file) as f:
        caption = dict(line.rstrip('\n').split('\t', 1) for line in f if '\t' in line).get(sample.name, '')
    path = os.path.join(output, f'{sample.name}.png')
    panel(image, group_map(segmenter, image), np.asarray(pred), gt, names, caption).save(path)
    paths.append(path)
  return paths


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint (export / convert)', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'VOC-layout folder with class_names.txt', flag_values=fv)
  flags.DEFINE_enum('dataset', 'folder', eval_datasets.DATASETS, 'dataset layout', flag_values=fv)
  flags.DEFINE_integer('num_images', 6, 'pictures to draw (the first N images of the split)', flag_values=fv)
  flags.DEFINE_string('output', None, 'folder for the PNGs', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m ovseg_jax.visualize', doc=__doc__,
                   required=('checkpoint', 'data_dir', 'output'), eval_settings=True)
  try:
    paths = run(args.checkpoint, args.data_dir, args.output, args.num_images, args.dataset, args.eval)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote {len(paths)} pictures to {args.output}')
  return 0


if __name__ == '__main__':
  jax.config.update('jax_platforms', 'cpu') if os.environ.get('JAX_PLATFORMS') is None else None
  sys.exit(main())
