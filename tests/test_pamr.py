"""PAMR (pamr.py) against a NumPy reference written pixel by pixel from the definition, and its inference hook.

The reference loops over pixels and neighbours with clamped indices (the replicate border), computes each
pixel's standard deviation, kernel and softmax on their own, and applies the updates in float64. It shares no
code, no padding and no shifting trick with the JAX version.
"""

import jax
import numpy as np
import pytest

from ovseg_jax import eval_config
from ovseg_jax import inference
from ovseg_jax import pamr
from ovseg_jax import resize
from tests import seg_fixtures


def reference_pamr(image, masks, iterations, dilations):
  """image [H, W, 3], masks [C, H, W] -> refined masks [C, H, W] (pamr.py module docstring), float64."""
  image, m = np.asarray(image, np.float64), np.asarray(masks, np.float64)
  h, w = image.shape[:2]
  at = lambda y, x: (min(max(y, 0), h - 1), min(max(x, 0), w - 1))
  weights = {}
  for y in range(h):
    for x in range(w):
      window = [at(y + dy * d, x + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
      sigma = np.std([image[q] for q in window], axis=0, ddof=1)            # [3]
      nbrs = [at(y + dy * d, x + dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)
              if (dy, dx) != (0, 0)]
      k = np.array([-np.mean(np.abs(image[y, x] - image[q]) / (0.1 * sigma + 1e-8)) for q in nbrs])
      a = np.exp(k - k.max())
      weights[y, x] = (nbrs, a / a.sum())
  for _ in range(iterations):
    new = np.zeros_like(m)
    for (y, x), (nbrs, a) in weights.items():
      new[:, y, x] = sum(aj * m[:, qy, qx] for aj, (qy, qx) in zip(a, nbrs))
    m = new
  return m


def _two_region_image(h, w, edge, seed=0):
  """Dark left of column `edge`, bright right of it, with a little noise."""
  rng = np.random.default_rng(seed)
  img = np.where(np.arange(w)[None, :, None] < edge, -1.0, 1.0) * np.ones((h, w, 3))
  return (img + rng.normal(0, 0.05, img.shape)).astype(np.float32)


@pytest.mark.parametrize('iterations,dilations', [(1, (1,)), (3, (1, 2, 4)), (10, pamr.TCL_DILATIONS)])
def test_matches_the_reference(iterations, dilations):
  rng = np.random.default_rng(iterations)
  image = rng.normal(0, 1, (2, 9, 13, 3)).astype(np.float32)
  image[1, :, :6] += 2.0                                      # an edge in the second image
  masks = rng.uniform(0, 1, (2, 4, 9, 13)).astype(np.float32)
  got = np.asarray(pamr.pamr(image, masks, iterations=iterations, dilations=dilations))
  for b in range(2):
    np.testing.assert_allclose(got[b], reference_pamr(image[b], masks[b], iterations, dilations),
                               rtol=2e-5, atol=2e-6)


def test_known_cases():
  # A flat image gives every neighbour the same weight 1 / P; a constant mask stays constant (convex update).
  flat = np.zeros((7, 8, 3), np.float32)
  np.testing.assert_allclose(np.asarray(pamr.affinity(flat, (1, 2))), 1 / 16, rtol=1e-6)
  const = np.full((1, 3, 7, 8), 0.25, np.float32)
  np.testing.assert_allclose(np.asarray(pamr.pamr(flat[None], const, iterations=5, dilations=(1, 2))), 0.25,
                             rtol=1e-6)
  # A mask whose boundary is 2 columns off the image edge snaps to the edge: the dark columns 6 and 7,
  # wrongly labelled "bright", take the label of the dark region they belong to.
  image = _two_region_image(12, 16, edge=8)
  masks = np.zeros((1, 2, 12, 16), np.float32)
  masks[0, 0, :, :6] = 1                                      # class 0 ("dark") ends at column 6
  masks[0, 1, :, 6:] = 1
  out = np.asarray(pamr.pamr(image[None], masks, iterations=10, dilations=pamr.TCL_DILATIONS))[0]
  expected = np.where(np.arange(16) < 8, 0, 1)
  np.testing.assert_array_equal(out.argmax(0), np.broadcast_to(expected, (12, 16)))
  np.testing.assert_allclose(out.sum(0), 1.0, rtol=1e-5)      # still a distribution per pixel


def test_refine_logits_resolution():
  rng = np.random.default_rng(0)
  image = rng.normal(0, 1, (20, 28, 3)).astype(np.float32)
  logits = rng.uniform(0, 1, (3, 20, 28)).astype(np.float32)
  # downsample 1: no resize, plain PAMR
  full = pamr.refine_logits(image, logits, iterations=2, dilations=(1, 2), downsample=1)
  np.testing.assert_allclose(np.asarray(full), np.asarray(pamr.pamr(image[None], logits[None], iterations=2,
                                                                    dilations=(1, 2)))[0], rtol=1e-5, atol=1e-6)
  # TCL's quarter resolution: 5 x 7 (padded to 16 x 16), then back to 20 x 28; the same as PAMR on the
  # unpadded 5 x 7 arrays, which the reference computes
  quarter = pamr.refine_logits(image, logits, iterations=2, dilations=(1, 2), downsample=4)
  assert quarter.shape == (3, 20, 28) and quarter.dtype == np.float32
  rh = resize.interpolation_matrix(20, 5, 'bilinear', True)
  rw = resize.interpolation_matrix(28, 7, 'bilinear', True)
  small_image = np.einsum('ay,yxc,bx->abc', rh, image.astype(np.float64), rw)
  small_logits = resize.resize_hw(logits, (5, 7), axes=(1, 2))
  expected = resize.resize_hw(reference_pamr(small_image, small_logits, 2, (1, 2)).astype(np.float32), (20, 28),
                              axes=(1, 2))
  np.testing.assert_allclose(quarter, expected, rtol=1e-4, atol=1e-5)
  # images of other sizes in the same 16-pixel bucket reuse the compilation
  before = dict(pamr.TRACES)
  for h, w in ((24, 30), (36, 40)):                          # 6 x 8 and 9 x 10: padded to 16 x 16 too
    pamr.refine_logits(rng.normal(0, 1, (h, w, 3)), rng.uniform(0, 1, (3, h, w)), iterations=2,
                       dilations=(1, 2), downsample=4)
  assert pamr.TRACES == before and all(v == 1 for v in before.values())
  with pytest.raises(ValueError, match='must have the size of the image'):
    pamr.pamr(image[None], logits[None, :, :10], iterations=1, dilations=(1,))
  with pytest.raises(ValueError, match='dilations >= 1'):
    pamr.pamr(image[None], logits[None], iterations=1, dilations=(0, 2))
  with pytest.raises(ValueError, match='downsample=0'):
    pamr.refine_logits(image, logits, iterations=1, dilations=(1,), downsample=0)


def test_eval_option_in_the_segmenter():
  d = eval_config.defaults()
  assert d.pamr is False and d.pamr_iterations == 10 and tuple(d.pamr_dilations) == (1, 2, 4, 8, 12, 24)
  assert d.pamr_downsample == 4
  ckpt = seg_fixtures.shared_tiny_checkpoint()
  off = inference.Segmenter.from_checkpoint(ckpt, **seg_fixtures.TINY_EVAL)
  on = inference.Segmenter.from_checkpoint(ckpt, **seg_fixtures.TINY_EVAL, pamr=True, pamr_iterations=3,
                                           pamr_dilations=(1, 2))
  img = seg_fixtures.random_image(50, 90, seed=3)
  classes = ['cat', 'dog']
  labels_off, scores_off = off.segment(img, classes)
  labels_on, scores_on = on.segment(img, classes)
  assert scores_on.shape == scores_off.shape == (3, 50, 90)
  np.testing.assert_allclose(scores_on.sum(0), 1.0, atol=1e-5)
  # the refined scores are the softmax of the refined window-averaged logits
  x = inference.preprocess(img, 64)
  logits = off.slide_logits(x, off.text_embedding(classes))
  refined = np.asarray(pamr.refine_logits(x, logits, iterations=3, dilations=(1, 2), downsample=4))
  np.testing.assert_allclose(scores_on, inference.scores_from_logits(refined, (50, 90)), atol=1e-5)
  assert not np.allclose(scores_on, scores_off, atol=1e-3)
  jax.clear_caches()
