"""`python -m ovseg_jax.segment`: overlay + legend, raw scores, label PNGs, bad images skipped and counted,
inputs never overwritten, one-line usage errors."""

import os

import numpy as np
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax import inference
from ovseg_jax import segment
from tests import seg_fixtures
from tests import test_images


def _eval_args():
  return [f'--eval.{k}={v}' for k, v in seg_fixtures.TINY_EVAL.items()]


def test_single_image_writes_overlay_scores_and_labels(tmp_path, capsys):
  ckpt = seg_fixtures.shared_tiny_checkpoint()
  img = seg_fixtures.random_image(40, 56, seed=7)
  Image.fromarray(img).save(tmp_path / 'in.jpg', quality=95)
  out, scores_path, labels_path = tmp_path / 'o' / 'out.png', tmp_path / 's.npy', tmp_path / 'l.png'
  rc = segment.main(['--checkpoint', ckpt, '--image', str(tmp_path / 'in.jpg'), '--classes', 'cat, dog ,potted plant',
                     '--output', str(out), '--save_scores', str(scores_path), '--save_labels', str(labels_path),
                     '--background_threshold', '0.9', *_eval_args()])
  assert rc == 0
  scores = np.load(scores_path)
  assert scores.dtype == np.float32 and scores.shape == (4, 40, 56)
  # The CLI's scores are the API's on the decoded image.
  seg = inference.Segmenter.from_checkpoint(ckpt, **seg_fixtures.TINY_EVAL)
  decoded = eval_datasets.read_image(str(tmp_path / 'in.jpg'))
  labels, ref = seg.segment(decoded, ['cat', 'dog', 'potted plant'], background_threshold=0.9)
  np.testing.assert_allclose(scores, ref, atol=1e-6)
  np.testing.assert_array_equal(eval_datasets.read_label_png(str(labels_path)), labels)
  overlay = np.asarray(Image.open(out))
  assert overlay.shape[1] == 160 and overlay.shape[0] > 40          # image + legend strip (min width 160)
  np.testing.assert_array_equal(overlay[:40, :56][labels == 0], decoded[labels == 0])  # background untouched
  assert 'segmented 1 image(s), skipped 0' in capsys.readouterr().out


def test_many_images_with_a_bad_one(tmp_path, capsys):
  ckpt = seg_fixtures.shared_tiny_checkpoint()
  folder = tmp_path / 'imgs'
  folder.mkdir()
  for i in range(2):
    Image.fromarray(seg_fixtures.random_image(30, 44, seed=i)).save(folder / f'im{i}.png')
  (folder / 'broken.jpg').write_bytes(b'not a jpeg')
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(folder / 'tiny.png')   # smaller than one patch
  out = tmp_path / 'out'
  rc = segment.main(['--checkpoint', ckpt, '--images', str(folder), '--classes', 'sky,tree', '--output', str(out),
                     '--save_scores', str(tmp_path / 'scores'), '--no_background', *_eval_args()])
  assert rc == 0
  captured = capsys.readouterr()
  assert 'segmented 2 image(s), skipped 2' in captured.out
  assert 'skipped ' + str(folder / 'broken.jpg') in captured.err
  assert 'smaller than one 8x8 patch' in captured.err
  assert 'Traceback' not in captured.err
  assert sorted(os.listdir(out)) == ['im0.png', 'im1.png']
  assert np.load(tmp_path / 'scores' / 'im1.npy').shape == (2, 30, 44)
  # several images and an image-file --output is refused
  assert segment.main(['--checkpoint', ckpt, '--images', str(folder), '--classes', 'sky', '--output',
                       str(tmp_path / 'x.png')]) == 2
  assert 'must be a folder' in capsys.readouterr().err


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(tmp_path / 'a.png')
  assert segment.main(['--checkpoint', str(tmp_path / 'nope'), '--image', str(tmp_path / 'a.png'),
                       '--classes', 'cat', '--output', str(tmp_path / 'o.png')]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'model_config.json' in err and err.count('\n') == 1


# ------------------------------------------------------------------------------------------------------------
# Bad inputs (issue 19): skipped and counted, never destroyed, one line each.
# ------------------------------------------------------------------------------------------------------------

def _run(*args):
  return segment.main(['--checkpoint', seg_fixtures.shared_tiny_checkpoint(), *map(str, args), *_eval_args()])


def test_a_batch_of_bad_images_is_skipped_and_counted(tmp_path, capsys):
  folder = tmp_path / 'imgs'
  folder.mkdir()
  Image.fromarray(seg_fixtures.random_image(30, 44, seed=0)).save(folder / 'a.png')
  Image.fromarray(seg_fixtures.random_image(30, 44, seed=1)).save(folder / 'x.jpg', quality=95)
  Image.fromarray(seg_fixtures.random_image(30, 44, seed=2)).save(folder / 'x.png')
  (folder / 'grey16.png').write_bytes(test_images.png16(test_images.GRADIENT16.repeat(4, 0).repeat(3, 1)))
  (folder / 'bomb.png').write_bytes(test_images.BOMB)                     # declares 50000x50000
  Image.fromarray(np.zeros((100, 120, 3), np.uint8)).save(folder / 'big.png')  # real, over --max_pixels
  jpeg = (folder / 'x.jpg').read_bytes()
  (folder / 'truncated.jpg').write_bytes(jpeg[:len(jpeg) // 2])
  (folder / 'random.png').write_bytes(np.random.default_rng(0).integers(0, 256, 300, np.uint8).tobytes())
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'dir.png').mkdir()
  out, scores, labels = tmp_path / 'out', tmp_path / 'scores', tmp_path / 'labels'
  rc = _run('--images', folder, '--classes', 'sky,tree', '--output', out, '--save_scores', scores,
            '--save_labels', labels, '--max_pixels', 10_000)
  assert rc == 0
  captured = capsys.readouterr()
  assert 'Traceback' not in captured.err
  skips = [line for line in captured.err.splitlines() if line.startswith('skipped ')]
  expected = {'bomb.png': 'declares 2,500,000,000 pixels, over the pixel budget of 10,000 pixels',
              'big.png': '120x100 (12,000 pixels) is over the pixel budget of 10,000 pixels',
              'truncated.jpg': 'truncated or damaged image data', 'random.png': 'is not an image file',
              'empty.png': 'is an empty file (0 bytes)', 'dir.png': 'is a folder, not an image file'}
  assert len(skips) == len(expected)
  for name, reason in expected.items():
    assert sum(line.startswith(f'skipped {folder / name}: ') and reason in line for line in skips) == 1, name
  assert ('segmented 4 image(s), skipped 6 (1 corrupt, 1 empty, 1 not a file, 2 too large, 1 unreadable)'
          in captured.out)
  # x.jpg and x.png share a stem: both keep their extension; the others keep the plain stem.
  assert sorted(os.listdir(out)) == ['a.png', 'grey16.png', 'x.jpg.png', 'x.png.png']
  assert sorted(os.listdir(scores)) == ['a.npy', 'grey16.npy', 'x.jpg.npy', 'x.png.npy']
  assert sorted(os.listdir(labels)) == sorted(os.listdir(out))
  assert not np.array_equal(np.load(scores / 'x.jpg.npy'), np.load(scores / 'x.png.npy'))
  # The 16-bit image is segmented as its high byte (a gradient), not as the white image convert('RGB') gives.
  seg = inference.Segmenter.from_checkpoint(seg_fixtures.shared_tiny_checkpoint(), **seg_fixtures.TINY_EVAL)
  grey = (test_images.GRADIENT16.repeat(4, 0).repeat(3, 1) >> 8).astype(np.uint8)
  _, ref = seg.segment(np.repeat(grey[..., None], 3, -1), ['sky', 'tree'])
  np.testing.assert_allclose(np.load(scores / 'grey16.npy'), ref, atol=1e-6)
  overlay = np.asarray(Image.open(out / 'grey16.png'))[:32, :36]
  assert len(np.unique(overlay)) > 10


def test_every_image_failing_exits_1(tmp_path, capsys):
  (tmp_path / 'bad.png').write_bytes(b'nope')
  assert _run('--image', tmp_path / 'bad.png', '--classes', 'cat', '--output', tmp_path / 'o.png') == 1
  captured = capsys.readouterr()
  assert f'skipped {tmp_path / "bad.png"}: is not an image file' in captured.err
  assert 'segmented 0 image(s), skipped 1 (1 unreadable)' in captured.out
  assert not (tmp_path / 'o.png').exists()


def _refused(capsys, *args) -> str:
  assert _run(*args) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and err.count('\n') == 1 and 'Traceback' not in err, err
  return err


def test_outputs_never_overwrite_inputs(tmp_path, capsys):
  folder = tmp_path / 'imgs'
  folder.mkdir()
  for name in ('a.png', 'b.png'):
    Image.fromarray(seg_fixtures.random_image(20, 20, seed=len(name))).save(folder / name)
  before = {p: p.read_bytes() for p in folder.iterdir()}
  a = folder / 'a.png'
  assert 'would overwrite the input image' in _refused(capsys, '--image', a, '--classes', 'cat', '--output', a)
  assert 'would overwrite the input image' in _refused(capsys, '--image', a, '--classes', 'cat', '--output', folder)
  assert 'would overwrite the input image' in _refused(capsys, '--image', a, '--classes', 'cat', '--output',
                                                       tmp_path / 'o.png', '--save_labels', a)
  assert 'is the input folder' in _refused(capsys, '--images', folder, '--classes', 'cat', '--output', folder)
  assert 'is the input folder' in _refused(capsys, '--images', folder, '--classes', 'cat', '--output',
                                           tmp_path / 'o', '--save_scores', folder / '.' )
  assert 'would overwrite the input image' in _refused(capsys, '--image', a, '--image', folder / 'b.png',
                                                       '--classes', 'cat', '--output', folder)
  assert 'would both write' in _refused(capsys, '--image', a, '--classes', 'cat', '--output', tmp_path / 'o.png',
                                        '--save_labels', tmp_path / 'o.png')
  assert {p: p.read_bytes() for p in folder.iterdir()} == before
  assert sorted(os.listdir(tmp_path)) == ['imgs']  # nothing written


def test_usage_errors_are_one_line_before_anything_is_written(tmp_path, capsys):
  img = tmp_path / 'in' / 'x.png'
  img.parent.mkdir()
  Image.fromarray(seg_fixtures.random_image(20, 20)).save(img)
  (tmp_path / 'file.txt').write_text('a file')
  (tmp_path / 'other').mkdir()
  Image.fromarray(seg_fixtures.random_image(20, 20)).save(tmp_path / 'other' / 'x.png')
  out = tmp_path / 'o.png'
  cases = {
      ('--classes', ' , '): "names no class",
      ('--classes', 'cat,,dog'): 'class 2 of 3 is empty',
      ('--classes', 'cat,dog,'): 'class 3 of 3 is empty',
      ('--classes', 'cat,dog,Cat'): "'cat' and 'Cat' are the same class",
      ('--classes', 'potted plant,potted  plant'): 'are the same class',
      ('--classes', 'cat,background'): "'background' is added as channel 0",
      ('--classes', 'cat', '--output', tmp_path / 'file.txt' / 'out.png'): 'file.txt is a file, not a folder',
      ('--classes', 'cat', '--save_scores', tmp_path / 'file.txt' / 's.npy'): 'is a file, not a folder',
      ('--classes', 'cat', '--save_labels', tmp_path / 'l.jpg'): 'label maps are palette PNGs',
      ('--classes', 'cat', '--output', tmp_path / 'o.txt'): 'give an image file name',
      ('--classes', 'cat', '--max_pixels', 0): 'max_pixels must be a positive whole number',
      ('--classes', 'cat', '--image', tmp_path / 'other' / 'x.png', '--output', tmp_path / 'outs'):
          'would write the same output x.png',
  }
  for extra, message in cases.items():
    args = ['--image', img, *extra]
    if '--output' not in extra:
      args += ['--output', out]
    assert message in _refused(capsys, *args), extra
  assert _run('--images', img, '--classes', 'cat', '--output', tmp_path / 'o') == 2
  assert 'is a file; give a folder of images' in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == ['file.txt', 'in', 'other']
