"""ovseg_jax/images.py: the one image reader: pixel budget before decoding, one-line errors, 8-bit conversion."""

import io
import os
import pickle
import re
import struct
import warnings
import zlib

import numpy as np
from PIL import Image
import pytest

from ovseg_jax import errors
from ovseg_jax import eval_datasets
from ovseg_jax import images
from ovseg_jax.data import augment

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------- crafted files
def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff)


def png_bytes(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes | None = None) -> bytes:
  """A PNG with a valid IHDR (CRC included); `rows` are the filtered scanlines (None: a few zero bytes, i.e.
  a header that declares width x height with almost no data behind it: a decompression bomb)."""
  ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, colour_type, 0, 0, 0)
  idat = zlib.compress(rows if rows is not None else b'\x00' * 16)
  return b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', ihdr) + _chunk(b'IDAT', idat) + _chunk(b'IEND', b'')


def png16(values: np.ndarray) -> bytes:
  """A 16-bit PNG of uint16 [H, W] (grey) or [H, W, 3] (RGB), written byte by byte (big-endian samples)."""
  values = np.asarray(values, np.uint16)
  h, w = values.shape[:2]
  colour_type = 0 if values.ndim == 2 else 2
  big = values.astype('>u2').reshape(h, -1)
  return png_bytes(w, h, 16, colour_type, b''.join(b'\x00' + big[y].tobytes() for y in range(h)))


BOMB = png_bytes(50000, 50000, 8, 2)          # 2.5 gigapixels declared in a ~60-byte file
GRADIENT16 = (np.arange(8 * 12, dtype=np.uint32).reshape(8, 12) * 689 + 3).astype(np.uint16)  # 3 .. 65438


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
  out = io.BytesIO()
  im.save(out, fmt, **kw)
  return out.getvalue()


def _one_line(e: Exception, name: str) -> str:
  text = str(e)
  assert '\n' not in text and text.startswith(f'{name}: '), text
  return text


# -------------------------------------------------------------------------------------------- the budget
def test_bomb_header_is_refused_before_decoding_and_pil_says_nothing():
  assert images.DEFAULT_MAX_PIXELS == 8192 * 8192
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # PIL's DecompressionBombWarning must not escape either
    for call in (images.probe, images.read_rgb, images.open_image):
      with pytest.raises(images.ImageError) as e:
        call(BOMB, name='bomb.png')
      assert e.value.reason == 'too_large' and e.value.path == 'bomb.png'
      assert '2,500,000,000 pixels' in _one_line(e.value, 'bomb.png')
    # Between PIL's warning limit and its error limit: our own check names the size.
    with pytest.raises(images.ImageError, match=r'12000x12000 \(144,000,000 pixels\) is over the pixel budget '
                       r'of 67,108,864 pixels = 8192x8192'):
      images.probe(png_bytes(12000, 12000, 8, 2))
  err = pickle.loads(pickle.dumps(images.ImageError('x.png', 'corrupt', 'truncated')))  # from pool workers
  assert isinstance(err, errors.UsageError) and (str(err), err.reason, err.path) == ('x.png: truncated',
                                                                                    'corrupt', 'x.png')
  assert images.probe(png_bytes(8192, 8192, 8, 2)) == (8192, 8192)  # exactly the budget is allowed


def test_real_image_over_a_lowered_budget(tmp_path, monkeypatch):
  path = tmp_path / 'big.png'
  Image.fromarray(np.full((90, 120, 3), 7, np.uint8)).save(path)
  with pytest.raises(images.ImageError) as e:
    images.read_rgb(str(path), max_pixels=10_000)
  assert e.value.reason == 'too_large'
  assert '120x90 (10,800 pixels) is over the pixel budget of 10,000 pixels = 100x100' in _one_line(e.value,
                                                                                                     str(path))
  assert images.read_rgb(str(path), max_pixels=10_800).shape == (90, 120, 3)
  # $OVSEG_MAX_PIXELS sets the default for every reader, eval_datasets' and the training decode included.
  monkeypatch.setenv(images.ENV_MAX_PIXELS, '10000')
  with pytest.raises(images.ImageError, match='over the pixel budget of 10,000'):
    eval_datasets.read_image(str(path))
  with pytest.raises(images.ImageError, match='over the pixel budget of 10,000'):
    augment.decode_crop_resize(path.read_bytes(), np.random.default_rng(0), 32, (0.5, 1.0))
  monkeypatch.setenv(images.ENV_MAX_PIXELS, 'lots')
  with pytest.raises(errors.UsageError, match="OVSEG_MAX_PIXELS='lots' must be a positive whole number"):
    images.read_rgb(str(path))
  for bad in (0, -5, 2.5, True):
    with pytest.raises(errors.UsageError, match='max_pixels must be a positive whole number'):
      images.read_rgb(str(path), max_pixels=bad)


def test_a_budget_above_pils_own_limit_is_honoured_and_pil_is_restored(monkeypatch):
  monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1000)  # PIL alone would raise its bomb error above 2000
  data = _encode(Image.fromarray(np.full((60, 50, 3), 9, np.uint8)), 'PNG')
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    assert images.read_rgb(data, max_pixels=5000)[0, 0].tolist() == [9, 9, 9]
    with pytest.raises(images.ImageError, match='over the pixel budget of 2,000'):
      images.read_rgb(data, max_pixels=2000)
  assert Image.MAX_IMAGE_PIXELS == 1000


# ----------------------------------------------------------------------------------------- bad files
@pytest.mark.parametrize('case,reason', [('truncated', 'corrupt'), ('random', 'unreadable'),
                                         ('folder', 'not_a_file'), ('zero_bytes', 'empty'),
                                         ('missing', 'missing'), ('truncated_header', 'unreadable'),
                                         ('bad_crc', 'unreadable')])
def test_bad_files_are_one_line(tmp_path, case, reason):
  good = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), 'JPEG')
  path = tmp_path / 'x.png'
  if case == 'truncated':
    path.write_bytes(good[:len(good) // 2])
  elif case == 'random':
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 500, np.uint8).tobytes())
  elif case == 'folder':
    path.mkdir()
  elif case == 'zero_bytes':
    path.write_bytes(b'')
  elif case == 'truncated_header':
    path.write_bytes(BOMB[:20])
  elif case == 'bad_crc':
    data = bytearray(png_bytes(4, 4, 8, 2))
    data[29] ^= 0xFF  # the IHDR CRC
    path.write_bytes(bytes(data))
  with pytest.raises(images.ImageError) as e:
    images.read_rgb(str(path))
  assert e.value.reason == reason and e.value.path == str(path)
  _one_line(e.value, str(path))
  if case not in ('folder', 'missing'):  # bytes give the same reason, under the name given
    with pytest.raises(images.ImageError) as e:
      images.read_rgb(path.read_bytes(), name='record 7')
    assert e.value.reason == reason
    _one_line(e.value, 'record 7')


# ------------------------------------------------------------------------------------ 8-bit conversion
def test_16bit_grey_png_keeps_its_gradient():
  data = png16(GRADIENT16)
  assert Image.open(io.BytesIO(data)).mode == 'I;16'
  rgb = images.read_rgb(data)
  assert rgb.dtype == np.uint8 and rgb.shape == (8, 12, 3)
  np.testing.assert_array_equal(rgb, np.repeat((GRADIENT16 >> 8)[..., None], 3, -1).astype(np.uint8))
  # exact values: 3 -> 0, 689 * 40 + 3 = 27563 -> 107, 689 * 95 + 3 = 65458 -> 255
  assert (rgb[0, 0, 0], rgb[3, 4, 0], rgb[7, 11, 0]) == (0, 107, 255)
  assert len(np.unique(rgb)) > 80  # a gradient, not the white image of convert('RGB')
  assert (np.asarray(Image.open(io.BytesIO(data)).convert('RGB')) == 255).mean() > 0.9  # what PIL alone gives


def test_16bit_rgb_png_is_the_high_byte():
  v = (np.arange(4 * 5 * 3, dtype=np.uint32).reshape(4, 5, 3) * 1111 + 250).astype(np.uint16)
  np.testing.assert_array_equal(images.read_rgb(png16(v)), (v >> 8).astype(np.uint8))


def test_int32_and_float_modes(tmp_path):
  i32 = np.array([[-5, 0, 255], [256, 40000, 70000]], np.int32)
  Image.fromarray(i32, 'I').save(tmp_path / 'i.tif')
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'i.tif'))[..., 0], [[0, 0, 0], [1, 156, 255]])
  unit = np.array([[0.0, 0.5, 1.0], [0.25, np.nan, 0.75]], np.float32)
  Image.fromarray(unit, 'F').save(tmp_path / 'unit.tif')
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'unit.tif'))[..., 1], [[0, 128, 255], [64, 0, 191]])
  wide = np.array([[-10.0, 0.0], [30.0, np.inf]], np.float32)  # not in [0, 1]: min-max over the finite values
  Image.fromarray(wide, 'F').save(tmp_path / 'wide.tif')
  np.testing.assert_array_equal(images.read_rgb(str(tmp_path / 'wide.tif'))[..., 2], [[0, 64], [255, 0]])


def test_palette_alpha_cmyk_and_1bit():
  pal = Image.new('P', (3, 1))
  pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
  pal.putdata([0, 1, 1])
  pal.info['transparency'] = 0
  with warnings.catch_warnings():
    warnings.simplefilter('error')  # no palette-transparency warning either
    np.testing.assert_array_equal(images.read_rgb(_encode(pal, 'PNG'))[0],
                                  [[10, 20, 30], [200, 100, 50], [200, 100, 50]])
  la = Image.fromarray(np.array([[[90, 0], [200, 255]]], np.uint8), 'LA')
  np.testing.assert_array_equal(images.read_rgb(_encode(la, 'PNG'))[0], [[90] * 3, [200] * 3])  # alpha dropped
  rgba = Image.fromarray(np.array([[[1, 2, 3, 0]]], np.uint8), 'RGBA')
  np.testing.assert_array_equal(images.read_rgb(_encode(rgba, 'PNG')), [[[1, 2, 3]]])
  cmyk = Image.new('CMYK', (4, 4), (0, 255, 255, 0))  # pure red
  assert images.read_rgb(_encode(cmyk, 'TIFF'))[0, 0].tolist() == [255, 0, 0]
  bits = Image.fromarray(np.array([[True, False]]))
  np.testing.assert_array_equal(images.read_rgb(_encode(bits, 'PNG'))[0], [[255] * 3, [0] * 3])
  with pytest.raises(images.ImageError, match='cannot convert PIL mode La') as e:
    images.to_rgb(Image.new('La', (2, 2)), name='odd')
  assert e.value.reason == 'unsupported'


def test_animated_gives_frame_0_and_exif_orientation_is_opt_in():
  frames = [Image.new('RGB', (6, 4), c) for c in ((255, 0, 0), (0, 0, 255))]
  out = io.BytesIO()
  frames[0].save(out, 'GIF', save_all=True, append_images=frames[1:], duration=50)
  assert images.read_rgb(out.getvalue())[0, 0].tolist() == [255, 0, 0]
  apng = io.BytesIO()
  frames[1].save(apng, 'PNG', save_all=True, append_images=frames[:1])
  assert images.read_rgb(apng.getvalue())[0, 0].tolist() == [0, 0, 255]
  # A 6-wide, 4-high JPEG tagged "rotate 90 CW" (orientation 6): stored pixels by default, upright on request.
  exif = Image.Exif()
  exif[0x0112] = 6
  data = _encode(Image.new('RGB', (6, 4), (0, 200, 0)), 'JPEG', exif=exif.tobytes())
  assert images.read_rgb(data).shape == (4, 6, 3)
  assert images.read_rgb(data, exif_transpose=True).shape == (6, 4, 3)


def test_training_decode_uses_the_same_conversion():
  data = png16(np.full((40, 40), 0x8042, np.uint16))  # mid grey in 16 bits; convert('RGB') would give white
  im = augment.decode_crop_resize(data, np.random.default_rng(0), 16, (0.5, 1.0))
  assert im.mode == 'RGB' and im.size == (16, 16) and np.all(np.asarray(im) == 0x80)
  with pytest.raises(images.ImageError, match='too_large|over the pixel budget'):
    augment.decode_crop_resize(BOMB, np.random.default_rng(0), 16, (0.5, 1.0))


def test_eval_read_image_matches_and_load_keeps_the_mode(tmp_path):
  path = tmp_path / 'g.png'
  path.write_bytes(png16(GRADIENT16))
  np.testing.assert_array_equal(eval_datasets.read_image(str(path)), images.read_rgb(png16(GRADIENT16)))
  eval_datasets.write_label_png(str(tmp_path / 'lab.png'), np.array([[0, 3], [255, 1]]))
  im = images.load(str(tmp_path / 'lab.png'))
  assert im.mode == 'P' and np.asarray(im).tolist() == [[0, 3], [255, 1]]


def test_every_image_read_goes_through_images_py():
  """No `Image.open` in the package or bench/ outside images.py: one pixel budget, one conversion."""
  users = set()
  for top in ('ovseg_jax', 'bench'):
    for folder, _, files in os.walk(os.path.join(ROOT, top)):
      for f in files:
        path = os.path.join(folder, f)
        if f.endswith('.py') and re.search(r'\bImage\.open\(', open(path).read()):
          users.add(os.path.relpath(path, ROOT))
  assert users == {'ovseg_jax/images.py'}
