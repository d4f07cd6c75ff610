"""`python -m ovseg_jax.segment`: overlay + legend, raw scores, label PNGs, bad images skipped."""

import os

import numpy as np
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax import inference
from ovseg_jax import segment
from tests import seg_fixtures


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
