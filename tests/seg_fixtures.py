"""Test fixtures for the segmentation tests: a tiny random OVSegmentor inference checkpoint and a tiny
VOC-layout folder (the layout `data.synthetic --format voc` writes). Nothing is fetched."""

import atexit
import functools
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from configs import tiny
from ovseg_jax import checkpoint
from ovseg_jax import eval_datasets

# Small eval geometry for the tiny model (patch 8): 64 px short side, 64 px windows, stride 32.
TINY_EVAL = dict(short_side=64, window=64, stride=32, window_batch=2)


def tiny_model_config() -> ml_collections.ConfigDict:
  """configs/tiny.py's model, made smaller still (compile time dominates these tests): patch 8, 8 groups."""
  m = tiny.get_config().model
  m.unlock()
  m.vision.update(width=64, depths=(1, 1), num_heads=4)
  m.binding.num_group_tokens = 16
  m.text.update(width=64, num_layers=1, num_heads=2, intermediate=128)
  m.proj.update(hidden=128, out=64)
  m.decoder.num_heads = 4
  # The authors' heads only: inference never reads the patch head, and without it the random fixture (BN noise
  # drawn in tree order) stays the one the window tests were written against.
  m.patch_head = False
  return m


def tiny_variables(model_config, seed: int = 0):
  from ovseg_jax.models.ovsegmentor import OVSegmentor  # pylint: disable=g-import-not-at-top
  model = OVSegmentor(config=ml_collections.FrozenConfigDict(model_config))
  size = model_config.vision.img_size
  ids = jnp.ones((1, 8), jnp.int32)
  variables = jax.jit(lambda k: model.init({'params': k, 'dropout': k, 'gumbel': k},
                                           jnp.zeros((1, size, size, 3)), ids, ids, train=False))(
                                               jax.random.PRNGKey(seed))
  # Spread the BN running statistics a little so the projectors are not the identity map.
  rng = np.random.default_rng(seed)
  stats = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.1, np.shape(x)).astype(np.float32)
                       if np.ndim(x) else x, variables['batch_stats'])
  stats = jax.tree_util.tree_map_with_path(
      lambda p, x: np.abs(x) + 0.5 if 'var' in jax.tree_util.keystr(p) else x, stats)
  return {'params': jax.tree.map(np.asarray, variables['params']), 'batch_stats': stats}


def write_tiny_checkpoint(directory: str, seed: int = 0) -> str:
  mc = tiny_model_config()
  return checkpoint.save_inference(directory, mc, tiny_variables(mc, seed), {'source': 'tests/seg_fixtures'})


@functools.lru_cache(maxsize=1)
def shared_tiny_checkpoint() -> str:
  """One tiny checkpoint per test process (building it costs a compile), removed at exit."""
  root = tempfile.mkdtemp(prefix='ovseg_tiny_ckpt_')
  atexit.register(shutil.rmtree, root, True)
  return write_tiny_checkpoint(os.path.join(root, 'ckpt'))


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
  """Smooth random RGB uint8 [h, w, 3] (low-frequency blobs + noise, like the golden inputs)."""
  rng = np.random.default_rng(seed)
  coarse = rng.normal(0, 1, (max(2, h // 8), max(2, w // 8), 3))
  img = np.asarray(Image.fromarray(((coarse - coarse.min()) / np.ptp(coarse) * 255).astype(np.uint8))
                   .resize((w, h), Image.BILINEAR), np.float32)
  return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)


def write_voc_folder(root: str, names, sizes, class_names, seed: int = 0) -> dict:
  """JPEGImages/<n>.jpg, SegmentationClass/<n>.png (palette), ImageSets/Segmentation/val.txt,
  class_names.txt. Label maps: background 0 with one rectangle per foreground class, a 255 border.
  Returns {name: label array}."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'JPEGImages'), exist_ok=True)
  os.makedirs(os.path.join(root, 'ImageSets', 'Segmentation'), exist_ok=True)
  labels = {}
  for i, (name, (h, w)) in enumerate(zip(names, sizes)):
    Image.fromarray(random_image(h, w, seed + i)).save(os.path.join(root, 'JPEGImages', name + '.jpg'))
    lab = np.zeros((h, w), np.uint8)
    for c in range(1, len(class_names)):
      y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
      lab[y:y + rng.integers(3, h // 2), x:x + rng.integers(3, w // 2)] = c
    lab[0, :] = 255
    eval_datasets.write_label_png(os.path.join(root, 'SegmentationClass', name + '.png'), lab)
    labels[name] = lab
  with open(os.path.join(root, 'ImageSets', 'Segmentation', 'val.txt'), 'w') as f:
    f.write('\n'.join(names) + '\n')
  with open(os.path.join(root, 'class_names.txt'), 'w') as f:
    f.write('\n'.join(class_names) + '\n')
  return labels
