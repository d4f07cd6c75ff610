"""Training images on the device: the pipeline's uint8 batch -> the normalised float32 images the model takes.

The grain workers (data/pipeline.py) ship `image` / `cross_image` as uint8 [b, S, S, 3], augmented but not
normalised: a quarter of float32's bytes from the workers through the main process to the device. For the
stage-1 DeiT recipe they also ship the random-erasing box their generator drew (`{key}_erase_box`,
data/augment.erase_box). The train step turns both into what the workers used to compute:

    x = uint8 * (1 / std) + (-mean / std)     ImageNet mean / std in 0-255 units, data/augment.normalize's
                                              constants and arithmetic (DEVELOPERS.md 'Images')
    x[top:top+h, left:left+w, :] ~ N(0, 1)    timm RandomErasing(mode='pixel'), now drawn on the device

float32 images are taken as already normalised (and erased): the golden fixtures, tests/train_data and the
benchmarks feed them, and they pass through unchanged.
"""

import jax
import jax.numpy as jnp

from ovseg_jax.data import augment

IMAGE_KEYS = ('image', 'cross_image')
ERASE_SUFFIX = '_erase_box'
# fold_in data of the erasing key: far above the step's per-call model keys (train_step.forward_losses
# folds in 0, 1, 2, ... two per model call), so the erasing noise never shares a key with dropout / Gumbel.
RNG_FOLD = 1 << 30


def erase_mask(box: jax.Array, size: tuple[int, int]) -> jax.Array:
  """box int32 [B, 4] (top, left, h, w) -> bool [B, H, W, 1], True inside each box (h = w = 0: nowhere)."""
  rows = jnp.arange(size[0])[None, :, None]
  cols = jnp.arange(size[1])[None, None, :]
  top, left, h, w = (box[:, i, None, None] for i in range(4))
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  return inside[..., None]


def prepare_images(batch: dict, rng: jax.Array) -> dict:
  """The batch with model-ready images; the erase boxes are consumed (not in the result).

  batch: `image` and, when present, `cross_image`, each [B, S, S, 3] uint8 (normalised here) or float32
    (already normalised: passed through); optional `image_erase_box` / `cross_image_erase_box` int32
    [B, 4] (top, left, h, w; h = w = 0: no erasing).
  rng: a key of this step; image key j fills its boxes from `fold_in(rng, j)`.
  -> the same dict with `image` / `cross_image` float32 [B, S, S, 3]: (x - mean) / std, and each box
    filled with independent N(0, 1) values per pixel and channel.
  """
  out = {k: v for k, v in batch.items() if not k.endswith(ERASE_SUFFIX)}
  for j, key in enumerate(IMAGE_KEYS):
    if key not in batch:
      continue
    x = batch[key]
    if x.dtype == jnp.uint8:
      x = x.astype(jnp.float32) * jnp.asarray(augment.NORM_SCALE) + jnp.asarray(augment.NORM_OFFSET)
    box = batch.get(key + ERASE_SUFFIX)
    if box is not None:
      noise = jax.random.normal(jax.random.fold_in(rng, j), x.shape, jnp.float32)
      x = jnp.where(erase_mask(box, x.shape[1:3]), noise, x)
    out[key] = x
  return out
