"""A plain linen ViT-S/16 forward + backward: the MFU reference of bench/RESULTS.md "Performance" (~55 % here).

Nothing of ovseg_jax: a textbook ViT-S/16 (224 px, 197 tokens, 12 blocks, width 384, 6 heads, MLP 1536,
pre-LN, GELU, a 1000-way head on [CLS]) and the gradient of its softmax cross-entropy, jitted once. It tells
how much of the matmul peak XLA-CPU reaches on the simplest model of that size, so that the OVSegmentor
step's MFU (`python -m bench.train_step`) can be read against it in the same run.

    python -m bench.plain_vit [--batch_size 8] [--steps 3]
"""

import json
import sys
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ovseg_jax import cli


class Block(nn.Module):
  width: int
  heads: int

  @nn.compact
  def __call__(self, x):
    y = nn.MultiHeadDotProductAttention(num_heads=self.heads)(nn.LayerNorm()(x))
    x = x + y
    y = nn.Dense(4 * self.width)(nn.LayerNorm()(x))
    return x + nn.Dense(self.width)(nn.gelu(y))


class ViT(nn.Module):
  width: int = 384
  depth: int = 12
  heads: int = 6
  patch: int = 16
  classes: int = 1000

  @nn.compact
  def __call__(self, images):                                  # [B, 224, 224, 3] -> [B, classes]
    x = nn.Conv(self.width, (self.patch, self.patch), strides=self.patch)(images)
    x = x.reshape(x.shape[0], -1, self.width)                  # [B, 196, D]
    cls = self.param('cls', nn.initializers.zeros, (1, 1, self.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.width)), x], axis=1)
    x = x + self.param('pos', nn.initializers.normal(0.02), x.shape[1:])
    for _ in range(self.depth):
      x = Block(self.width, self.heads)(x)
    return nn.Dense(self.classes)(nn.LayerNorm()(x[:, 0]))


def analytic_gflops(batch_size: int, img: int = 224, width: int = 384, depth: int = 12, patch: int = 16,
                    classes: int = 1000) -> float:
  """Matmul FLOPs of forward + backward (= 3 x forward, 2 FLOPs per multiply-add), in GFLOP.

  Forward per image: patch embed 2 N_p (p^2 3) D; per block 2 N (4 D^2 + 2 D 4D) + 2 (2 N^2 D) for qkv/out,
  MLP and the two attention matmuls (N = N_p + 1 tokens); head 2 D classes.
  """
  n_p = (img // patch) ** 2
  n = n_p + 1
  fwd = 2 * n_p * patch * patch * 3 * width + depth * (2 * n * 12 * width ** 2 + 4 * n * n * width) \
      + 2 * width * classes
  return 3 * fwd * batch_size / 1e9


def time_fwd_bwd(batch_size: int = 8, steps: int = 3, img: int = 224, **vit_kwargs) -> dict:
  """-> {'step_s': median seconds of one forward + backward, 'gflops': XLA's count for it}."""
  model = ViT(**vit_kwargs)
  images = jax.random.normal(jax.random.key(0), (batch_size, img, img, 3), jnp.float32)
  labels = jnp.arange(batch_size) % model.classes
  params = model.init(jax.random.key(1), images[:1])

  def loss(p, x, y):
    logits = model.apply(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

  compiled = jax.jit(jax.value_and_grad(loss)).lower(params, images, labels).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  jax.block_until_ready(compiled(params, images, labels))   # warm-up
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(compiled(params, images, labels))
    times.append(time.perf_counter() - t)
  return {'step_s': float(np.median(times)), 'gflops': float(cost['flops']) / 1e9}


def fields(result: dict, peak_flops: float, prefix: str = '') -> dict:
  """`time_fwd_bwd`'s result as JSON fields, MFU against a peak in FLOP/s (bench.train_step uses the prefix)."""
  return {f'{prefix}step_s': round(result['step_s'], 4), f'{prefix}gflops': round(result['gflops'], 2),
          f'{prefix}mfu': round(result['gflops'] * 1e9 / result['step_s'] / peak_flops, 4)}


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_integer('batch_size', 8, 'images per step', flag_values=fv)
  flags.DEFINE_integer('steps', 3, 'timed steps after one warm-up step', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.plain_vit', doc=__doc__)
  from ovseg_jax import train_monitor  # pylint: disable=g-import-not-at-top
  r = time_fwd_bwd(args.batch_size, args.steps)
  peak = train_monitor.measure_matmul_peak(2048)
  print(json.dumps(dict(bench='plain_vit_s16', batch_size=args.batch_size, **fields(r, peak),
                        matmul_peak_gflops=round(peak / 1e9, 1))), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
