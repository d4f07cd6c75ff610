"""The one image reader: every image the project reads (segment, evaluate, visualize, the builder, the
training pipeline) goes through here, under one pixel budget.

  image = images.read_rgb('cat.jpg')              # uint8 [H, W, 3]; ImageError (one line) if it cannot be read
  w, h = images.probe(data)                        # header only: size checked, no pixels decoded
  im = images.open_image(data, name=key)           # lazy PIL image, size checked: draft() / crop math here
  im = images.to_rgb(im, name=key)                 # decode + convert -> PIL 'RGB'

Pixel budget. An image whose header declares more than `max_pixels` pixels (width x height) is refused
before any pixel is decoded, with `ImageError(reason='too_large')`; callers skip and count it (nothing is
silently downscaled: DCT downscaling exists only for JPEG, and one rule for every format is easier to trust).
The default is `DEFAULT_MAX_PIXELS` = 8192 x 8192 = 67,108,864 pixels (192 MiB as uint8 RGB); the environment
variable `OVSEG_MAX_PIXELS` changes it for every reader in every process (builder and pipeline workers
included), and `segment --max_pixels` for one run. PIL's own decompression-bomb warning and error never
escape: they become the same `too_large` ImageError (PIL's limit is only ever raised, for the duration of a
read and under a lock, when the budget asked for is above it).

Conversion to 8-bit RGB (`to_rgb`), per PIL mode:
  RGB                  as is. 16-bit RGB(A) / grey+alpha PNGs are already reduced by PIL's decoder to
                       their high byte (v >> 8).
  I;16, I;16B, I;16L   16-bit grey: v >> 8 (the high byte, as libpng's strip_16 and cv2.imread do), not
                       PIL's convert('RGB'), which clips every value above 255 to white.
  I                    32-bit integer grey (PIL's container for 16-bit PNG / PGM / TIFF): clipped to
                       [0, 65535], then v >> 8.
  F                    32-bit float grey: values all within [0, 1] are intensities (round(v * 255));
                       any other range is stretched min-max to 0..255. NaN / inf -> 0.
  P, PA, LA, RGBA      alpha is dropped (colours as stored, not composited), as PIL's convert('RGB')
                       and the authors' loaders do.
  L, 1, CMYK, YCbCr... PIL's convert('RGB').
Animated images (GIF, APNG, MPO) give their first frame. EXIF orientation is ignored by default (pixels as
stored: benchmark label maps are aligned to the stored pixels, and the authors' loaders ignore it);
`exif_transpose=True` (segment's photos) applies it, and an unreadable EXIF block leaves the image as stored.

Every failure is one `ImageError` line `<file>: <reason>`; `.reason` is one of REASONS for counting.
"""

import contextlib
import io
import math
import os
import re
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

from ovseg_jax import errors

DEFAULT_MAX_PIXELS = 8192 * 8192
ENV_MAX_PIXELS = 'OVSEG_MAX_PIXELS'
# missing / not_a_file / empty: the path; unreadable: the header is no image PIL knows; corrupt: the pixel
# data is truncated or damaged; too_large: over the pixel budget; unsupported: a mode with no RGB conversion.
REASONS = ('missing', 'not_a_file', 'empty', 'unreadable', 'corrupt', 'too_large', 'unsupported')


class ImageError(errors.UsageError):
  """An image that cannot be used: one line '<file>: <why>'. `.path` names the file, `.reason` is in REASONS."""

  def __init__(self, path: str, reason: str, detail: str):
    super().__init__(f'{path}: {detail}')
    self.path, self.reason, self.detail = path, reason, detail

  def __reduce__(self):  # crosses process boundaries (builder pool, grain workers) intact
    return type(self), (self.path, self.reason, self.detail)


def default_max_pixels() -> int:
  """The budget used when none is passed: $OVSEG_MAX_PIXELS if set, else DEFAULT_MAX_PIXELS."""
  value = os.environ.get(ENV_MAX_PIXELS, '').strip()
  if not value:
    return DEFAULT_MAX_PIXELS
  try:
    n = int(value.replace('_', '').replace(',', ''))
  except ValueError:
    n = 0
  if n <= 0:
    raise errors.UsageError(f'{ENV_MAX_PIXELS}={value!r} must be a positive whole number of pixels '
                            f'(default {DEFAULT_MAX_PIXELS:,} = 8192x8192)')
  return n


def resolve_max_pixels(max_pixels: int | None = None) -> int:
  """`max_pixels`, or the default; a value that is not a positive integer is a UsageError."""
  if max_pixels is None:
    return default_max_pixels()
  if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels <= 0:
    raise errors.UsageError(f'max_pixels must be a positive whole number of pixels; got {max_pixels!r}')
  return int(max_pixels)


def describe_budget(max_pixels: int) -> str:
  """'67,108,864 pixels = 8192x8192' (the square only when it is one)."""
  side = math.isqrt(max_pixels)
  square = f' = {side}x{side}' if side * side == max_pixels else ''
  return f'{max_pixels:,} pixels{square}'


def check_size(width: int, height: int, *, max_pixels: int | None = None, name: str = '<image>') -> None:
  """Raises ImageError('too_large') when width x height is over the budget (or the size is not positive)."""
  limit = resolve_max_pixels(max_pixels)
  if width <= 0 or height <= 0:
    raise ImageError(name, 'unreadable', f'declares an empty size {width}x{height}')
  if width * height > limit:
    raise ImageError(name, 'too_large', f'{width}x{height} ({width * height:,} pixels) is over the pixel '
                     f'budget of {describe_budget(limit)} (see {ENV_MAX_PIXELS})')


# ---------------------------------------------------------------------------------------- PIL's own limit
_PIL_LIMIT_LOCK = threading.Lock()


@contextlib.contextmanager
def _pil_guard(limit: int):
  """PIL's bomb warning silenced (our budget decides); PIL's limit raised to ours only when ours is higher.

  With limit <= PIL's MAX_IMAGE_PIXELS, PIL errors only above 2x its own limit, i.e. on images we refuse
  anyway. Above it, PIL's global is raised for this read under a lock and restored (never lowered, never None).
  """
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    pil = Image.MAX_IMAGE_PIXELS
    if pil is None or limit <= pil:
      yield
      return
    with _PIL_LIMIT_LOCK:
      saved = Image.MAX_IMAGE_PIXELS
      Image.MAX_IMAGE_PIXELS = limit
      try:
        yield
      finally:
        Image.MAX_IMAGE_PIXELS = saved


def _bomb_error(name: str, e: Exception, limit: int) -> ImageError:
  m = re.search(r'\((\d+) pixels\)', str(e))
  size = f'declares {int(m.group(1)):,} pixels' if m else 'declares more pixels than allowed'
  return ImageError(name, 'too_large', f'{size}, over the pixel budget of {describe_budget(limit)} '
                    f'(see {ENV_MAX_PIXELS})')


def _detail(e: Exception) -> str:
  text = ' '.join(str(e).split()) or type(e).__name__
  return text if len(text) <= 160 else text[:157] + '...'


def _label(src, name: str | None) -> str:
  if name is not None:
    return str(name)
  if isinstance(src, (str, os.PathLike)):
    return os.fspath(src)
  return getattr(src, 'filename', None) or '<image bytes>'


# ------------------------------------------------------------------------------------------------ reading
def open_image(src, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
  """Opens lazily (header only) and checks the size against the budget.

  Args:
    src: a path, or the encoded bytes (bytes, bytearray, memoryview, a uint8 array).
    max_pixels: the budget (None: `default_max_pixels()`).
    name: what messages call the image (default: the path, or '<image bytes>').
  Returns:
    a PIL image on frame 0 whose pixels are not decoded yet (call `to_rgb` / `decode`; `draft` may come first).
    For a path the file stays open until the image is loaded or closed.
  Raises:
    ImageError: missing, a folder, empty, not an image, over the budget.
  """
  label = _label(src, name)
  limit = resolve_max_pixels(max_pixels)
  if isinstance(src, (str, os.PathLike)):
    path = os.fspath(src)
    if os.path.isdir(path):
      raise ImageError(label, 'not_a_file', 'is a folder, not an image file')
    if not os.path.exists(path):
      raise ImageError(label, 'missing', 'no such file')
    if not os.path.isfile(path):
      raise ImageError(label, 'not_a_file', 'is not a regular file')
    if os.path.getsize(path) == 0:
      raise ImageError(label, 'empty', 'is an empty file (0 bytes)')
    fp = path
  else:
    try:
      data = src if isinstance(src, bytes) else memoryview(src).tobytes()  # bytes, bytearray, uint8 arrays
    except TypeError:
      raise TypeError(f'expected a path or encoded bytes, got {type(src).__name__}') from None
    if not data:
      raise ImageError(label, 'empty', 'is empty (0 bytes)')
    fp = io.BytesIO(data)
  try:
    with _pil_guard(limit):
      im = Image.open(fp)
  except Image.DecompressionBombError as e:
    raise _bomb_error(label, e, limit) from None
  except Image.UnidentifiedImageError:
    raise ImageError(label, 'unreadable', 'is not an image file PIL can read (unknown format or damaged '
                     'header)') from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises OSError, SyntaxError, struct.error, ...)
    raise ImageError(label, 'unreadable', f'cannot read the image header ({_detail(e)})') from None
  try:
    check_size(*im.size, max_pixels=limit, name=label)
  except ImageError:
    im.close()
    raise
  return im


def probe(src, *, max_pixels: int | None = None, name: str | None = None) -> tuple[int, int]:
  """(width, height) from the header alone, after the checks of `open_image`; no pixel is decoded, so
  truncated pixel data is not detected here (`to_rgb` / `read_rgb` detect it)."""
  im = open_image(src, max_pixels=max_pixels, name=name)
  size = im.size
  im.close()
  return size


def decode(im: Image.Image, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
  """Decodes the pixels of an `open_image` result in its own mode; truncated / damaged data -> ImageError."""
  label = _label(im, name)
  limit = resolve_max_pixels(max_pixels)
  check_size(*im.size, max_pixels=limit, name=label)
  try:
    with _pil_guard(limit):
      im.load()
  except Image.DecompressionBombError as e:
    raise _bomb_error(label, e, limit) from None
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (OSError 'truncated', SyntaxError, zlib.error, ...)
    raise ImageError(label, 'corrupt', f'truncated or damaged image data ({_detail(e)})') from None
  return im


def _grey16_to_8(a: np.ndarray) -> np.ndarray:
  """uint16 / int32 grey -> uint8 high byte (v >> 8); int32 is clipped to [0, 65535] first."""
  return (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)


def _float_to_8(a: np.ndarray) -> np.ndarray:
  """float grey -> uint8: [0, 1] data as intensities, any other range min-max stretched; NaN / inf -> 0."""
  a = a.astype(np.float64)
  finite = np.isfinite(a)
  out = np.zeros(a.shape, np.float64)
  if finite.any():
    lo, hi = float(a[finite].min()), float(a[finite].max())
    if lo >= 0.0 and hi <= 1.0:
      out[finite] = a[finite] * 255.0
    elif hi > lo:
      out[finite] = (a[finite] - lo) / (hi - lo) * 255.0
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _rgb(im: Image.Image) -> Image.Image:
  mode = im.mode
  if mode == 'RGB':
    return im
  if mode.startswith('I;16') or mode == 'I':
    grey = _grey16_to_8(np.asarray(im))
  elif mode == 'F':
    grey = _float_to_8(np.asarray(im))
  elif mode in ('P', 'PA') or 'A' in im.getbands():
    # Via RGBA so palette transparency is read (and dropped) without PIL's palette-transparency warning.
    return im.convert('RGBA').convert('RGB')
  else:
    return im.convert('RGB')
  return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1), 'RGB')


def to_rgb(im: Image.Image, *, max_pixels: int | None = None, name: str | None = None,
           exif_transpose: bool = False) -> Image.Image:
  """Decodes an `open_image` result and converts it to 8-bit 'RGB' by the rules of the module docstring."""
  label = _label(im, name)
  im = decode(im, max_pixels=max_pixels, name=label)
  if exif_transpose:
    try:
      im = ImageOps.exif_transpose(im)
    except Exception:  # pylint: disable=broad-except  (a damaged EXIF block: keep the stored orientation)
      pass
  try:
    return _rgb(im)
  except MemoryError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (a mode PIL cannot convert, e.g. 'La')
    raise ImageError(label, 'unsupported', f'cannot convert PIL mode {im.mode} to RGB ({_detail(e)})') from None


def load(src, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
  """A decoded PIL image in its own mode (e.g. a palette label map), under the budget; the file is closed."""
  im = open_image(src, max_pixels=max_pixels, name=name)
  with im:  # closes the file, keeps the decoded pixels
    return decode(im, max_pixels=max_pixels, name=_label(src, name))


def read_rgb(src, *, max_pixels: int | None = None, name: str | None = None,
             exif_transpose: bool = False) -> np.ndarray:
  """A path or encoded bytes -> uint8 [H, W, 3] RGB (frame 0), under the budget; ImageError on failure."""
  label = _label(src, name)
  im = open_image(src, max_pixels=max_pixels, name=label)
  with im:
    rgb = to_rgb(im, max_pixels=max_pixels, name=label, exif_transpose=exif_transpose)
    return np.asarray(rgb, dtype=np.uint8)
