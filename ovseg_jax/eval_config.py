"""The segmentation settings `config.eval` and their defaults (the authors' mmseg slide inference).

One home for two readers: configs/common.py builds `c.eval` from `defaults()`, and `inference.Segmenter`
starts from it when it is given no config (a pip-installed package has no configs/ folder). A checkpoint
written by `export` carries the eval block of its training config in its meta.json, which overrides these.
This module imports nothing heavy, so config files and launchers stay quick to load.
"""

import ml_collections


def defaults() -> ml_collections.ConfigDict:
  """A fresh ConfigDict of the eval defaults (callers may change it)."""
  return ml_collections.ConfigDict(dict(
      short_side=448, window=448, stride=224, window_batch=4,
      long_side=2048,                  # mmcv imrescale scale (2048, 448): the long side is capped here
      templates='simple',              # 'simple' ("a photo of a {}.") | 'imagenet80'
      bg_threshold=0.95,               # background where max_c logit < min(bg_threshold, max P) (Eq. 1)
      # 'threshold': Eq. 1's rule above. 'prompt' (not in the paper): "a photo of a background." is one more
      # class, for models trained with loss.group_match_weight, which teaches it to the unmatched groups.
      background='threshold',
      # With background='prompt' (not in the paper): subtracted from the background prompt's cosine similarity
      # before Eq. 1's softmax, a prior against the background row (configs/tiny.py: 0.25, chosen on a
      # selection split; bench/RESULTS.md "Background margin"). 0 scores the prompt like any class.
      bg_prompt_margin=0.0,
      top_k=5,                         # classes kept by the image-level filter of Eq. 1
      # PAMR (pamr.py; TCL's inference refinement, not the authors'): refine the window-averaged logits along
      # the image's colour edges before the final resize. TCL's settings: 10 iterations, dilations
      # (1, 2, 4, 8, 12, 24), at 1/4 of the network-input size (github:kakaobrain/tcl models/tcl/tcl.py).
      pamr=False,
      pamr_iterations=10,
      pamr_dilations=(1, 2, 4, 8, 12, 24),
      pamr_downsample=4,               # PAMR runs at (h / 4, w / 4) of the resized image, as TCL's masks
  ))
