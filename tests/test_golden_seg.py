"""Zero-shot segmentation parity with the authors' pipeline on a real photo (golden.npz, README there).

The authors' model (preset small) is converted with `python -m ovseg_jax.convert official`, then `Segmenter`
runs the whole pipeline on skimage's chelsea (300 x 451 -> 448 x 673, three 448 windows) with the 21 VOC
names, "a photo of a {}.", background threshold 0.95.
"""

import os

import numpy as np
import pytest

from ovseg_jax import inference
from ovseg_jax.convert import __main__ as convert_cli


@pytest.fixture(scope='module')
def golden(golden_dir):
  return dict(np.load(os.path.join(golden_dir, 'golden.npz')))


@pytest.fixture(scope='module')
def segmenter(golden_dir, tmp_path_factory):
  dst = str(tmp_path_factory.mktemp('golden_seg') / 'ckpt')
  assert convert_cli.main(['official', '--src', os.path.join(golden_dir, 'official_ckpt.pth'), '--dst', dst]) == 0
  return inference.Segmenter.from_checkpoint(dst, bg_threshold=0.95, templates='simple', window_batch=4)


def test_class_embedding_matches(segmenter, golden):
  names = list(golden['seg_class_names'][1:])
  ids, mask = segmenter.tokenizer([f'a photo of a {c}.' for c in names], padding='longest')
  np.testing.assert_array_equal(ids, golden['seg_text_ids'])
  np.testing.assert_array_equal(mask, golden['seg_text_mask'])
  emb = np.asarray(segmenter.text_embedding(names))
  assert np.abs(emb - golden['seg_text_embedding']).max() < 1e-5


def test_first_window_logits_match(segmenter, golden):
  names = list(golden['seg_class_names'][1:])
  x = inference.preprocess(golden['seg_image_uint8'])
  y1, y2, x1, x2 = golden['seg_windows'][0]
  logits = segmenter.window_logits(x[None, y1:y2, x1:x2], segmenter.text_embedding(names), background=True)[0]
  ref = golden['seg_win0_logits']
  assert logits.shape == ref.shape == (21, 448, 448)
  assert np.abs(logits - ref).max() < 1e-4
  np.testing.assert_array_equal(logits[0], ref[0])               # the background decision of every pixel


def test_scores_match_on_stable_pixels_and_argmax_everywhere(segmenter, golden):
  names = list(golden['seg_class_names'][1:])
  labels, scores = segmenter.segment(golden['seg_image_uint8'], names, background=True)
  ref, stable = golden['seg_scores'], golden['seg_stable_mask']
  assert scores.shape == ref.shape == (21, 300, 451)
  diff = np.abs(scores - ref)
  assert diff[:, stable].max() <= 1e-3
  agree = labels == golden['seg_labels']
  assert agree[stable].mean() >= 0.999
  assert agree.mean() >= 0.99


def test_first_window_soft_map_and_pixel_groups_match(segmenter, golden):
  import jax
  from ovseg_jax import resize
  from ovseg_jax.models.ovsegmentor import OVSegmentor
  x = inference.preprocess(golden['seg_image_uint8'])[None, :448, :448]

  @jax.jit
  def groups(variables, crops):
    out = segmenter.model.apply(variables, crops, train=False, method=OVSegmentor.encode_image)
    maps = resize.resize(out['soft'].reshape(1, -1, *out['grid']), (448, 448), spatial_axes=(-2, -1))
    return out['soft'], maps.argmax(axis=1)[0]

  soft, group = groups(segmenter.variables, x)
  assert np.abs(np.asarray(soft) - golden['seg_win0_soft'][:, 0]).max() < 1e-5
  # pixel -> group is a hard argmax; only pixels within rounding of a tie may differ
  assert (np.asarray(group) == golden['seg_win0_group_map']).mean() > 0.9999
