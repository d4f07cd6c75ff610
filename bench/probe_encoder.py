"""Can the tiny visual encoder learn the synthetic classes at all? A supervised probe.

  python -m bench.probe_encoder --steps 1000 --train_images 20000            # configs/tiny.py's encoder
  python -m bench.probe_encoder --steps 600 --patch_size 4 --lr 5e-4
  python -m bench.probe_encoder --steps 300 --labels colour                  # the easy control
  python -m bench.probe_encoder --steps 750 --channel_shuffle --stem_channels=''   # linear patch embed

Trains configs/tiny.py's VisualEncoder (+ mean over its output groups + a linear layer) with a multi-label
sigmoid cross-entropy on which of the six classes (or, `--labels colour`, which of the six colours) an image
holds: the strongest signal any caption loss could give. Images are synthetic.make_example renders resized to
the training size. Reports per-label and exact-set accuracy every `--every` steps on 500 held-out-split images
(unseen (class, colour) pairs; `val`) and 500 i.i.d. images (the train split with another seed; `iid`).
Predicting "absent" everywhere scores ~0.67 per label.
"""

import sys
import time

from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from PIL import Image

from configs import tiny
from ovseg_jax import cli
from ovseg_jax.data import augment
from ovseg_jax.data import synthetic
from ovseg_jax.models import visual


def make_set(split: str, n: int, seed: int, size: int, labels: str):
  names = synthetic.SHAPES if labels == 'class' else synthetic.COLOURS
  x = np.zeros((n, size, size, 3), np.float32)
  y = np.zeros((n, len(names)), np.float32)
  for i in range(n):
    ex = synthetic.make_example(seed, split, i, 64, 96)
    x[i] = augment.normalize(Image.fromarray(ex['image']).resize((size, size), Image.BILINEAR))
    for shape, colour, *_ in ex['objects']:
      y[i, names.index(shape if labels == 'class' else colour)] = 1
  return x, y


class Probe(nn.Module):
  model_config: ml_collections.FrozenConfigDict
  num_labels: int

  @nn.compact
  def __call__(self, x, train: bool):
    out = visual.VisualEncoder(self.model_config)(x, train)
    return nn.Dense(self.num_labels)(out['x'].mean(axis=1))


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_integer('steps', 600, 'training steps', flag_values=fv)
  flags.DEFINE_integer('batch', 32, 'images per step', flag_values=fv)
  flags.DEFINE_float('lr', 1e-3, 'Adam learning rate', flag_values=fv)
  flags.DEFINE_integer('patch_size', 8, 'ViT patch size', flag_values=fv)
  flags.DEFINE_integer('train_images', 6000, 'distinct training images', flag_values=fv)
  flags.DEFINE_enum('labels', 'class', ['class', 'colour'], 'what the probe predicts', flag_values=fv)
  flags.DEFINE_integer('every', 250, 'evaluate every N steps', flag_values=fv)
  flags.DEFINE_string('stem_channels', None, "comma-separated conv stem widths, '' for the linear patch embed "
                      "(default: configs/tiny.py's)", flag_values=fv)
  flags.DEFINE_bool('channel_shuffle', False, 'permute the RGB channels of every training batch', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m bench.probe_encoder', doc=__doc__)
  cfg = tiny.get_config()
  cfg.unlock()
  cfg.model.vision.patch_size = a.patch_size
  if a.stem_channels is not None:
    cfg.model.vision.stem_channels = tuple(int(c) for c in a.stem_channels.split(',') if c.strip())
  size = cfg.model.vision.img_size
  t0 = time.time()
  xtr, ytr = make_set('train', a.train_images, 0, size, a.labels)
  sets = {'val': make_set('val', 500, 1, size, a.labels), 'iid': make_set('train', 500, 1, size, a.labels)}
  print(f'rendered {a.train_images} + 2 x 500 images in {time.time() - t0:.0f}s', flush=True)
  model = Probe(ml_collections.FrozenConfigDict(cfg.model), ytr.shape[1])
  keys = {'params': jax.random.key(0), 'gumbel': jax.random.key(1), 'dropout': jax.random.key(2)}
  params = model.init(keys, xtr[:2], False)['params']
  tx = optax.adamw(a.lr, weight_decay=0.05)
  opt = tx.init(params)

  @jax.jit
  def step(params, opt, x, y, key):
    def loss_fn(p):
      logits = model.apply({'params': p}, x, True, rngs={'gumbel': key, 'dropout': key})
      return optax.sigmoid_binary_cross_entropy(logits, y).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt, loss

  predict = jax.jit(lambda p, x: model.apply({'params': p}, x, False) > 0)
  rng = np.random.default_rng(0)
  t0 = time.time()
  for s in range(1, a.steps + 1):
    idx = rng.integers(0, len(xtr), a.batch)
    xb = xtr[idx]
    if a.channel_shuffle:  # on normalised images: the pipeline's permutation, up to the per-channel mean/std
      xb = np.stack([augment.shuffle_channels(x, rng) for x in xb])
    params, opt, loss = step(params, opt, jnp.asarray(xb), jnp.asarray(ytr[idx]), jax.random.key(s))
    if s % a.every == 0 or s == a.steps:
      parts = [f'step {s}', f'train loss {float(loss):.3f}']
      for name, (x, y) in sets.items():
        pred = np.concatenate([np.asarray(predict(params, x[i:i + 100])) for i in range(0, len(x), 100)])
        parts.append(f'{name} per-label {(pred == y).mean():.3f} exact {(pred == y).all(1).mean():.3f}')
      print(' | '.join(parts) + f' | {time.time() - t0:.0f}s', flush=True)


if __name__ == '__main__':
  sys.exit(main())
