"""Training image augmentation on PIL / numpy, driven by an explicit `np.random.Generator`.

Stage 2 (docs/paper_vs_authors.md Q20): RandomResizedCrop(size, scale=(0.4, 1)) + horizontal flip + ImageNet
normalisation. Stage 1 (`deit_aug`, same row, timm 0.6.12 `create_transform`): RandomResizedCrop(size,
scale=(0.08, 1)) + flip + RandAugment 'rand-m9-mstd0.5-inc1' + normalisation + RandomErasing(p=0.25,
mode='pixel', count 1). Every draw comes from the generator passed in, so a record's augmentation is a pure
function of (record, seed, global stream position) (data/pipeline.py `example_rng`): resumable and identical
across host and worker counts.

The workers stop before normalisation: `train_image` returns uint8 pixels (a quarter of float32's bytes on
the way to the device) and, for the DeiT recipe, the erasing box its generator drew (`erase_box`). The
device normalises with `NORM_SCALE` / `NORM_OFFSET` and fills the box with N(0, 1) noise
(ovseg_jax/device_images.py); `normalize` is the same arithmetic on the host (inference tools, benchmarks).

JPEG decoding uses libjpeg's DCT-domain downscaling (`Image.draft`) when the crop is at least twice the
output size, which makes decode + crop ~3x cheaper at 224 px from 512 px sources; the crop box is mapped
into the reduced image, so the crop geometry is unchanged.
"""

import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from ovseg_jax import images

IMAGENET_MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)
IMAGENET_STD = np.asarray([58.395, 57.12, 57.375], np.float32)
_FILL = (124, 116, 104)  # timm's img_mean fill for geometric RandAugment ops


def rrc_params(rng: np.random.Generator, width: int, height: int, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3)):
  """torchvision `RandomResizedCrop.get_params`: -> (left, top, w, h) in pixels."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def decode_crop_resize(data: bytes, rng: np.random.Generator, size: int, scale, flip: bool = True):
  """JPEG/PNG bytes -> RGB PIL image [size, size] after RandomResizedCrop (+ flip with p=0.5)."""
  im = images.open_image(data)  # header only: the pixel budget is checked before any decoding
  width, height = im.size
  left, top, w, h = rrc_params(rng, width, height, scale)
  if im.format == 'JPEG' and min(w, h) >= 2 * size:
    k = size / min(w, h)  # libjpeg only reduces by 1/2, 1/4, 1/8 while the crop stays >= size
    im.draft('RGB', (math.ceil(width * k), math.ceil(height * k)))
  im = images.to_rgb(im)  # decode; 16-bit / float / palette / CMYK -> 8-bit RGB (images.py)
  sx, sy = im.size[0] / width, im.size[1] / height
  box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
  im = im.resize((size, size), Image.BILINEAR, box=box)
  if flip and rng.random() < 0.5:
    im = im.transpose(Image.FLIP_LEFT_RIGHT)
  return im


# (x - mean) / std as x * NORM_SCALE + NORM_OFFSET (2x faster in place; equal to 3e-7); the device uses them too.
NORM_SCALE = (1.0 / IMAGENET_STD).astype(np.float32)
NORM_OFFSET = (-IMAGENET_MEAN / IMAGENET_STD).astype(np.float32)


def normalize(im) -> np.ndarray:
  """uint8 RGB -> float32 [H, W, 3], ImageNet mean/std in 0-255 units (DEVELOPERS.md 'Images').

  (x - mean) / std computed as x * (1/std) + (-mean/std) in place (2x faster; equal to 3e-7).
  """
  x = np.array(im, dtype=np.float32)
  x *= NORM_SCALE
  x += NORM_OFFSET
  return x


# ------------------------------------------------------------------------------------------ RandAugment
def _negate(rng, v):
  return -v if rng.random() < 0.5 else v


def _affine(im, coeffs):
  return im.transform(im.size, Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=_FILL)


def _solarize_add(im, add, thresh=128):
  lut = [min(255, i + add) if i < thresh else i for i in range(256)]
  return im.point(lut * len(im.getbands()))


def _posterize(im, bits):
  """Keep the top `bits` bits of each channel. 0 bits (magnitude 10) is a black image, as Pillow gave before
  it refused bits < 1 (timm 0.6.12's environment); refused, it would drop the record as unreadable."""
  if bits >= 8:
    return im
  if bits <= 0:
    return im.point([0] * 256 * len(im.getbands()))
  return ImageOps.posterize(im, bits)


_OPS = {  # timm `_RAND_INCREASING_TRANSFORMS`: (img, magnitude in [0, 10], rng) -> img
    'AutoContrast': lambda im, m, rng: ImageOps.autocontrast(im),
    'Equalize': lambda im, m, rng: ImageOps.equalize(im),
    'Invert': lambda im, m, rng: ImageOps.invert(im),
    'Rotate': lambda im, m, rng: im.rotate(_negate(rng, m / 10 * 30), resample=Image.BILINEAR,
                                           fillcolor=_FILL),
    'PosterizeIncreasing': lambda im, m, rng: _posterize(im, 4 - int(m / 10 * 4)),
    'SolarizeIncreasing': lambda im, m, rng: ImageOps.solarize(im, 256 - int(m / 10 * 256)),
    'SolarizeAdd': lambda im, m, rng: _solarize_add(im, int(m / 10 * 110)),
    'ColorIncreasing': lambda im, m, rng: ImageEnhance.Color(im).enhance(1 + _negate(rng, m / 10 * .9)),
    'ContrastIncreasing': lambda im, m, rng: ImageEnhance.Contrast(im).enhance(1 + _negate(rng, m / 10 * .9)),
    'BrightnessIncreasing': lambda im, m, rng: ImageEnhance.Brightness(im).enhance(
        1 + _negate(rng, m / 10 * .9)),
    'SharpnessIncreasing': lambda im, m, rng: ImageEnhance.Sharpness(im).enhance(
        1 + _negate(rng, m / 10 * .9)),
    'ShearX': lambda im, m, rng: _affine(im, (1, _negate(rng, m / 10 * .3), 0, 0, 1, 0)),
    'ShearY': lambda im, m, rng: _affine(im, (1, 0, 0, _negate(rng, m / 10 * .3), 1, 0)),
    'TranslateXRel': lambda im, m, rng: _affine(im, (1, 0, _negate(rng, m / 10 * .45) * im.size[0], 0, 1, 0)),
    'TranslateYRel': lambda im, m, rng: _affine(im, (1, 0, 0, 0, 1, _negate(rng, m / 10 * .45) * im.size[1])),
}
RAND_AUGMENT_OPS = tuple(_OPS)


def rand_augment(im, rng: np.random.Generator, num_ops: int = 2, magnitude: float = 9.0,
                 magnitude_std: float = 0.5, prob: float = 0.5):
  """timm RandAugment 'rand-m9-mstd0.5-inc1': `num_ops` ops drawn with replacement, each applied with
  probability `prob` at a magnitude ~ N(9, 0.5) clipped to [0, 10]."""
  for name in rng.choice(RAND_AUGMENT_OPS, size=num_ops, replace=True):
    if rng.random() > prob:
      continue
    m = float(np.clip(rng.normal(magnitude, magnitude_std), 0.0, 10.0))
    im = _OPS[str(name)](im, m, rng)
  return im


def erase_box(rng: np.random.Generator, height: int, width: int, channels: int = 3, prob: float = 0.25,
              area=(0.02, 1 / 3), log_ratio=(math.log(0.3), math.log(1 / 0.3))) -> np.ndarray:
  """The draws of timm RandomErasing(mode='pixel', max_count=1) on a [height, width, channels] image.

  -> int32 [4] (top, left, h, w) of the box to fill with N(0, 1) in normalised space; h = w = 0: no erasing
  (drawn with probability 1 - prob, or when 10 tries find no box that fits). The box's h x w x channels
  normals are drawn here too and dropped: the generator then stands where timm's would, so every later draw
  (the cross-image partner, the answer template) is the one it always was. The device draws the fill
  (device_images.py).
  """
  if rng.random() > prob:
    return np.zeros(4, np.int32)
  for _ in range(10):
    target = rng.uniform(*area) * height * width
    aspect = math.exp(rng.uniform(*log_ratio))
    h = int(round(math.sqrt(target * aspect)))
    w = int(round(math.sqrt(target / aspect)))
    if w < width and h < height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      rng.standard_normal((h, w, channels), dtype=np.float32)   # the fill timm drew here: keeps the stream
      return np.asarray([top, left, h, w], np.int32)
  return np.zeros(4, np.int32)


def shuffle_channels(im, rng: np.random.Generator):
  """A random permutation of the RGB channels (a PIL image or uint8 [H, W, 3] array -> same kind).

  Not in the authors' recipe: the embedded synthetic dataset holds its (class, colour) pairs out, so colour is a
  shortcut there; permuting channels leaves shapes and patterns and takes hue away (configs/tiny.py).
  """
  arr = np.asarray(im)
  out = arr[..., rng.permutation(3)]
  return Image.fromarray(out) if isinstance(im, Image.Image) else out


def train_image(data: bytes, rng: np.random.Generator, size: int, *, deit: bool,
                crop_scale=(0.4, 1.0), channel_shuffle: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
  """Encoded image -> (augmented uint8 [size, size, 3], erase box int32 [4] or None), stage-1 DeiT or
  stage-2 recipe, before normalisation (the device normalises and erases: device_images.py).

  The box (`erase_box`: top, left, h, w; h = w = 0 for none) comes with the DeiT recipe only.
  channel_shuffle: also permute the RGB channels at random (`shuffle_channels`).
  """
  if deit:
    im = decode_crop_resize(data, rng, size, (0.08, 1.0))
    im = rand_augment(im, rng)
  else:
    im = decode_crop_resize(data, rng, size, tuple(crop_scale))
  if channel_shuffle:
    im = shuffle_channels(im, rng)
  x = np.array(im, dtype=np.uint8)
  return x, (erase_box(rng, size, size, x.shape[-1]) if deit else None)
