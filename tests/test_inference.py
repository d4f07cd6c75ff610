"""Zero-shot inference: tiling, Eq. 1 against a NumPy oracle, and the whole path on a tiny random model."""

import os

import jax
import numpy as np
import pytest
import torch
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax import inference
from ovseg_jax import prompts
from ovseg_jax import resize as resize_lib
from tests import seg_fixtures


# ------------------------------------------------------------------------------------------------------------
# Resizing and tiling (no model).
# ------------------------------------------------------------------------------------------------------------

def test_rescale_size_is_mmcv_rule():
  assert inference.rescale_size(300, 451) == (448, 673)        # the golden chelsea input
  assert inference.rescale_size(375, 500) == (448, 597)        # a VOC-size image
  assert inference.rescale_size(100, 1000) == (205, 2048)      # long side capped at 2048
  assert inference.rescale_size(448, 448) == (448, 448)


def test_preprocess_matches_golden_input(golden_dir):
  g = np.load(os.path.join(golden_dir, 'golden.npz'))
  x = inference.preprocess(g['seg_image_uint8'])
  ref = g['seg_input'][0].transpose(1, 2, 0)
  assert x.shape == ref.shape == (448, 673, 3)
  assert np.abs(x - ref).max() < 1e-5


def test_windows_match_golden_and_cover_every_pixel(golden_dir):
  g = np.load(os.path.join(golden_dir, 'golden.npz'))
  np.testing.assert_array_equal(inference.slide_windows(448, 673, 448, 224), g['seg_windows'])
  for h, w in [(448, 673), (448, 597), (205, 2048), (100, 90), (448, 448), (449, 1000)]:
    wins = inference.slide_windows(h, w, 448, 224)
    count = np.zeros((h, w), int)
    for y1, y2, x1, x2 in wins:
      assert (y2 - y1, x2 - x1) == (min(448, h), min(448, w))
      assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
      count[y1:y2, x1:x2] += 1
    assert count.min() >= 1, (h, w)


def test_overlap_averaging_is_exact():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(40, 70, 3)).astype(np.float32)

  def fn(crops):  # a window-dependent map: per-pixel value plus the crop mean
    base = crops[..., 0] + crops.mean(axis=(1, 2, 3))[:, None, None]
    return np.stack([base, 2 * crops[..., 1] - base], axis=1)

  got = inference.slide_inference(x, fn, window=32, stride=16, window_batch=3)
  # Direct: for each pixel, the mean over the windows that contain it, in float64.
  wins = inference.slide_windows(40, 70, 32, 16)
  total = np.zeros((2, 40, 70))
  count = np.zeros((40, 70))
  for y1, y2, x1, x2 in wins:
    total[:, y1:y2, x1:x2] += fn(x[None, y1:y2, x1:x2].astype(np.float64))[0]
    count[y1:y2, x1:x2] += 1
  assert len(wins) == 2 * 4 and count.max() == 6  # rows overlap twice, columns up to three times
  np.testing.assert_allclose(got, total / count, atol=2e-6)


def test_host_bilinear_matches_torch():
  rng = np.random.default_rng(1)
  for shape, out in [((3, 28, 41), (57, 19)), ((2, 300, 451), (448, 673)), ((2, 448, 673), (300, 451))]:
    x = (rng.random(shape) * 255).astype(np.float32)
    got = resize_lib.resize_hw(x, out, axes=(1, 2))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x)[None], size=out, mode='bilinear',
                                          align_corners=False)[0].numpy()
    assert np.abs(got - ref).max() < 1e-4, shape  # float32 rounding only, on values up to 255 (no FMA: 3e-3)


# ------------------------------------------------------------------------------------------------------------
# Eq. 1 as a pure function vs a NumPy oracle written like the authors' encode_decode.
# ------------------------------------------------------------------------------------------------------------

def _softmax(z, axis=-1):
  z = np.exp(z - z.max(axis=axis, keepdims=True))
  return z / z.sum(axis=axis, keepdims=True)


def _oracle_window(soft, grid, feat, img, text, scale, out_hw, top_k, bg):
  """One window, float64: one-hot @ P, scatter top-k mask, bg = 1 below min(thr, P.max())."""
  k = soft.shape[0]
  rh = resize_lib.interpolation_matrix(grid[0], out_hw[0], 'bilinear', False)
  rw = resize_lib.interpolation_matrix(grid[1], out_hw[1], 'bilinear', False)
  maps = np.einsum('oh,khw,pw->kop', rh, soft.reshape(k, *grid), rw)
  onehot = np.eye(k)[maps.argmax(0)]                                # [H, W, K]
  zg = feat / np.linalg.norm(feat, axis=-1, keepdims=True)
  z = img / np.linalg.norm(img)
  aff = zg @ text.T * scale
  pre = _softmax(aff)
  avg = _softmax(z @ text.T * scale)
  mask = np.zeros_like(avg)
  mask[np.argsort(-avg)[:min(top_k, len(avg))]] = 1
  p = _softmax(np.where(mask > 0, aff, -np.inf)) * pre
  fg = np.moveaxis(onehot @ p, -1, 0)                               # [N, H, W]
  if bg is None:
    return fg
  bgl = (fg.max(0) < min(bg, p.max())).astype(np.float64)
  return np.concatenate([bgl[None], fg])


@pytest.mark.parametrize('bg', [None, 0.95, 0.2])
def test_eq1_matches_numpy_oracle(bg):
  rng = np.random.default_rng(2)
  b, k, grid, n, p = 2, 5, (4, 6), 9, 16
  soft = _softmax(rng.normal(0, 2, (b, k, grid[0] * grid[1])), axis=1).astype(np.float32)
  feat = rng.normal(size=(b, k, p)).astype(np.float32)
  img = rng.normal(size=(b, p)).astype(np.float32)
  text = rng.normal(size=(n, p))
  text = (text / np.linalg.norm(text, axis=-1, keepdims=True)).astype(np.float32)
  scale = np.float32(30.0)
  got = np.asarray(inference.eq1_logits(soft, grid, feat, img, text, scale, (17, 23), top_k=5, bg_threshold=bg))
  assert got.shape == (b, n + (bg is not None), 17, 23)
  for i in range(b):
    ref = _oracle_window(soft[i].astype(np.float64), grid, feat[i].astype(np.float64),
                         img[i].astype(np.float64), text.astype(np.float64), 30.0, (17, 23), 5, bg)
    np.testing.assert_allclose(got[i], ref, atol=1e-5)
    # only the 5 image-level classes ever get a non-zero score
    assert (np.abs(got[i, int(bg is not None):]).reshape(n, -1).max(1) > 0).sum() <= 5
  if bg == 0.2:
    assert got[:, 0].min() == 0 and got[:, 0].max() == 1


def test_eq1_under_jit_and_top_k_larger_than_classes():
  rng = np.random.default_rng(3)
  soft = _softmax(rng.normal(0, 2, (1, 3, 16)), axis=1).astype(np.float32)
  feat = rng.normal(size=(1, 3, 8)).astype(np.float32)
  img = rng.normal(size=(1, 8)).astype(np.float32)
  text = np.eye(8, dtype=np.float32)[:2]                          # N = 2 < top_k
  fn = jax.jit(lambda s, f, i, t, thr: inference.eq1_logits(s, (4, 4), f, i, t, 10.0, (8, 8), top_k=5,
                                                             bg_threshold=thr))
  got = np.asarray(fn(soft, feat, img, text, 0.5))
  ref = _oracle_window(soft[0].astype(np.float64), (4, 4), feat[0].astype(np.float64), img[0].astype(np.float64),
                       text.astype(np.float64), 10.0, (8, 8), 5, 0.5)
  np.testing.assert_allclose(got[0], ref, atol=1e-5)


# ------------------------------------------------------------------------------------------------------------
# The whole path on a tiny random model.
# ------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_ckpt():
  return seg_fixtures.shared_tiny_checkpoint()


@pytest.fixture(scope='module')
def segmenter(tiny_ckpt):
  return inference.Segmenter.from_checkpoint(tiny_ckpt, **seg_fixtures.TINY_EVAL)


CLASSES = ['cat', 'potted plant', 'traffic light']


def test_segment_whole_path_with_background(segmenter):
  img = seg_fixtures.random_image(50, 90, seed=1)
  labels, scores = segmenter.segment(img, CLASSES, background=True)
  assert labels.shape == (50, 90) and labels.dtype == np.int32
  assert scores.shape == (4, 50, 90) and scores.dtype == np.float32
  np.testing.assert_allclose(scores.sum(0), 1.0, atol=1e-5)
  np.testing.assert_array_equal(labels, scores.argmax(0))

  # Batched + padded windows equal one window at a time through the same jitted step.
  emb = segmenter.text_embedding(CLASSES)
  x = inference.preprocess(img, 64)
  assert x.shape == (64, 115, 3)                                   # 3 windows: batch of 2, then 1
  one_by_one = inference.slide_inference(
      x, lambda c: segmenter.window_logits(c, emb, True), window=64, stride=32, window_batch=1)
  np.testing.assert_allclose(inference.scores_from_logits(one_by_one, (50, 90)), scores, atol=1e-5)

  # Threshold 0 never fires (scores are >= 0): no background pixel anywhere.
  labels0, scores0 = segmenter.segment(img, CLASSES, background_threshold=0.0)
  assert labels0.min() >= 1
  # Without background: 3 channels, the foreground logits are the same maps.
  crops = x[None, :, :64]
  with_bg = segmenter.window_logits(crops, emb, True, background_threshold=1.0)
  no_bg = segmenter.window_logits(crops, emb, False)
  np.testing.assert_array_equal(with_bg[:, 1:], no_bg)
  assert set(np.unique(with_bg[:, 0])) <= {0.0, 1.0}
  # bg logit is 1 exactly where the best class score is below min(threshold, max of P)
  from ovseg_jax.models.ovsegmentor import OVSegmentor
  p = jax.jit(lambda v, c: inference.group_class_affinity(
      *[segmenter.model.apply(v, c, train=False, method=OVSegmentor.encode_image)[k]
        for k in ('image_feat', 'image_x')],
      emb, segmenter.model.apply(v, method=OVSegmentor.logit_scale_exp), 5))(segmenter.variables, crops)
  p = np.asarray(p)
  np.testing.assert_array_equal(with_bg[:, 0] == 1, no_bg.max(axis=1) < min(1.0, p.max()))
  assert 0 < with_bg[:, 0].mean() < 1                             # both cases occur in this window


def test_compiled_once_per_window_shape_and_embeddings_cached(segmenter):
  img = seg_fixtures.random_image(50, 90, seed=2)
  emb = segmenter.text_embedding(CLASSES)
  assert segmenter.text_embedding(CLASSES) is emb
  segmenter.segment(img, CLASSES)
  before = dict(inference.WINDOW_TRACES)
  for seed in (3, 4):
    segmenter.segment(seg_fixtures.random_image(50, 90, seed=seed), CLASSES)
  # a second Segmenter of the same model reuses the compilations
  again = inference.Segmenter(segmenter.model_config, segmenter.variables, segmenter.eval_config)
  again.segment(seg_fixtures.random_image(50, 90, seed=5), CLASSES, background_threshold=0.3)
  assert inference.WINDOW_TRACES == before
  assert before and all(v == 1 for v in before.values()), before


def test_multi_word_names_and_prompt_ensemble(tiny_ckpt, segmenter):
  from ovseg_jax.models.ovsegmentor import OVSegmentor
  encode = jax.jit(lambda v, i, m: segmenter.model.apply(v, i, m, train=False,
                                                         method=OVSegmentor.encode_text)['text_x'])

  def direct(seg, name, templates):  # normalised mean over templates of text_x, prompts padded together
    ids, mask = seg.tokenizer([t.format(name) for t in templates], padding='longest')
    m = np.asarray(encode(seg.variables, ids, mask)).mean(0)
    return m / np.linalg.norm(m)

  emb = np.asarray(segmenter.text_embedding(['potted plant', 'potted']))
  ids, _ = segmenter.tokenizer(['a photo of a potted plant.'])
  assert segmenter.tokenizer.decode(ids[0]) == '[CLS] a photo of a potted plant. [SEP]'
  np.testing.assert_allclose(emb[0], direct(segmenter, 'potted plant', prompts.SIMPLE_TEMPLATES), atol=2e-6)
  np.testing.assert_allclose(emb[1], direct(segmenter, 'potted', prompts.SIMPLE_TEMPLATES), atol=2e-6)

  ens = inference.Segmenter.from_checkpoint(tiny_ckpt, templates='imagenet80', **seg_fixtures.TINY_EVAL)
  got = np.asarray(ens.text_embedding(['potted plant', 'cat']))
  assert len(prompts.IMAGENET_TEMPLATES) == 80
  for row, name in zip(got, ['potted plant', 'cat']):
    np.testing.assert_allclose(row, direct(ens, name, prompts.IMAGENET_TEMPLATES), atol=2e-5)
  # the ensemble is not the single prompt
  assert np.abs(got[0] - emb[0]).max() > 10 * 2e-5


def test_palette_png_round_trip(tmp_path, segmenter):
  labels, _ = segmenter.segment(seg_fixtures.random_image(40, 33, seed=5), CLASSES)
  labels[0, :4] = [0, 1, 2, 3]
  path = str(tmp_path / 'pred.png')
  eval_datasets.write_label_png(path, labels)
  with Image.open(path) as im:
    assert im.mode == 'P'
    assert tuple(im.getpalette()[3:6]) == (128, 0, 0)               # VOC colour of class 1
  np.testing.assert_array_equal(eval_datasets.read_label_png(path), labels)
  Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / 'rgb.png')
  with pytest.raises(ValueError, match='palette'):
    eval_datasets.read_label_png(str(tmp_path / 'rgb.png'))


def test_bad_inputs_are_one_line_value_errors(segmenter):
  with pytest.raises(ValueError, match=r'smaller than one 8x8 patch'):
    segmenter.segment(np.zeros((5, 40, 3), np.uint8), CLASSES)
  with pytest.raises(ValueError, match=r'smaller than one 8x8 patch'):
    segmenter.segment(np.zeros((8, 4000, 3), np.uint8), CLASSES)  # 8 x 4000 -> 4 x 2048
  with pytest.raises(ValueError, match='uint8 RGB'):
    segmenter.segment(np.zeros((40, 40), np.uint8), CLASSES)
  with pytest.raises(ValueError, match='foreground names only'):
    segmenter.segment(np.zeros((40, 40, 3), np.uint8), ['background', 'cat'])
  with pytest.raises(ValueError, match='duplicates'):
    segmenter.segment(np.zeros((40, 40, 3), np.uint8), ['cat', 'cat'])
  with pytest.raises(ValueError, match='unknown eval option'):
    inference.default_eval_config(shortside=3)


def test_inference_imports_no_optimizer_or_trainer():
  import subprocess
  import sys
  code = ('import sys, ovseg_jax.inference, ovseg_jax.segment, ovseg_jax.evaluate; '
          'print(sorted(m for m in sys.modules if m == "optax" or m.startswith("optax.") or m in '
          '("ovseg_jax.optim", "ovseg_jax.train", "ovseg_jax.train_step", "ovseg_jax.losses", "ovseg_jax.sharding")))')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=root, check=True)
  assert out.stdout.strip() == '[]', out.stdout
