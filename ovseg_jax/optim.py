"""The optimizer of the authors' recipe (official notes §3.1): AdamW, warmup + cosine per step, clip, frozen groups.

    tx = optim.make_optimizer(config.optim, total_steps=T, warmup_steps=W, global_batch=B)

* AdamW(b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.05), decoupled decay as torch.optim.AdamW:
      theta <- theta - lr * (adam_update(g) + wd * theta)     (decay only where `decay_mask` is True)
  Decay mask (official `utils/optimizer.py`): no decay for 1-D parameters and for names ending in `bias`;
  everything else decays, including the 0-dim `logit_scale` (the official rule only exempts ndim == 1).
* Learning rate: timm `CosineLRScheduler(t_in_epochs=False, warmup_prefix=False, cycle_limit=1)`:
      s(t) = warmup_lr + t * (base_lr - warmup_lr) / W                 t < W
      s(t) = min_lr + (base_lr - min_lr) * (1 + cos(pi * t / T)) / 2    W <= t < T   (t NOT shifted by W)
      s(t) = min_lr                                                     t >= T
  The official loop calls `step_update(g)` after optimizer step g, so step g uses s(max(g - 1, 0)).
  base_lr, warmup_lr and min_lr are all multiplied by global_batch / lr_scale_batch (lr_scale_batch = 0: x1).
* Global-norm clipping at 5.0 over the trainable parameters only (frozen ones have no gradient in torch).
* Frozen parameters (regexes of '/'-joined paths in `config.optim.frozen`, e.g. 'text_encoder/.*'):
  `optax.multi_transform` routes them to `set_to_zero`, so they get no update and no optimizer state
  (their slots in the AdamW state are empty `MaskedNode`s).
"""

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

TRAINABLE, FROZEN = 'trainable', 'frozen'


def path_str(path) -> str:
  """A jax key path -> 'img_encoder/blocks_0/attn/qkv/kernel' (dict keys, attributes and indices)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return '/'.join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
  """[(path string, leaf)] in tree-flatten order."""
  return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def decays(name: str, ndim: int) -> bool:
  """The official weight-decay rule: no decay for 1-D parameters or parameters named `*bias`."""
  return not (ndim == 1 or name.split('/')[-1].endswith('bias'))


def decay_mask(params):
  """Pytree of bools like `params` (leaves may be MaskedNode subtrees, which are kept)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(path_str(p), jnp.ndim(x)), params)


def frozen_labels(params, frozen: Sequence[str]):
  """Pytree of 'frozen' / 'trainable' labels: a parameter is frozen when a regex fully matches its path."""
  pats = [re.compile(f) for f in frozen]

  def label(p, _):
    name = path_str(p)
    return FROZEN if any(r.fullmatch(name) for r in pats) else TRAINABLE
  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params, frozen: Sequence[str]):
  """Pytree of bools: True for parameters that receive updates."""
  return jax.tree.map(lambda l: l == TRAINABLE, frozen_labels(params, frozen))


def lr_scale(optim: ml_collections.ConfigDict, global_batch: int) -> float:
  """The official linear scaling factor global_batch / lr_scale_batch (1 when lr_scale_batch is 0)."""
  return global_batch / optim.lr_scale_batch if optim.lr_scale_batch else 1.0


def timm_cosine(t, *, base_lr: float, warmup_lr: float, min_lr: float, warmup_steps: int,
                total_steps: int):
  """timm CosineLRScheduler value s(t) at iteration t (see the module docstring)."""
  t = jnp.asarray(t, jnp.float32)
  warm = warmup_lr + t * (base_lr - warmup_lr) / max(warmup_steps, 1)
  cos = min_lr + 0.5 * (base_lr - min_lr) * (1.0 + jnp.cos(jnp.pi * t / max(total_steps, 1)))
  after = jnp.where(t < total_steps, cos, min_lr)
  return jnp.where(t < warmup_steps, warm, after)


def make_schedule(optim: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int,
                  global_batch: int) -> Callable[[Any], jax.Array]:
  """count (number of optimizer steps already applied, g) -> the lr used by step g: s(max(g - 1, 0))."""
  f = lr_scale(optim, global_batch)
  kw = dict(base_lr=optim.base_lr * f, warmup_lr=optim.warmup_lr * f, min_lr=optim.min_lr * f,
            warmup_steps=warmup_steps, total_steps=total_steps)

  def schedule(count):
    return timm_cosine(jnp.maximum(jnp.asarray(count, jnp.int32) - 1, 0), **kw)
  return schedule


def make_optimizer(optim: ml_collections.ConfigDict, *, total_steps: int, warmup_steps: int,
                   global_batch: int) -> tuple[optax.GradientTransformation, Callable]:
  """-> (tx, schedule). tx = [frozen: set_to_zero | trainable: clip(5) -> AdamW(schedule, decay mask)]."""
  schedule = make_schedule(optim, total_steps=total_steps, warmup_steps=warmup_steps,
                           global_batch=global_batch)
  inner = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  frozen = tuple(optim.frozen)
  if not frozen:
    return inner, schedule
  tx = optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()},
                             lambda params: frozen_labels(params, frozen))
  return tx, schedule


def warmup_and_total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """(warmup_steps, total_steps) from the config: explicit step counts win over epoch counts."""
  total = config.train.total_steps or int(round(config.train.total_epochs * steps_per_epoch))
  warmup = config.optim.warmup_steps
  if warmup < 0:
    warmup = int(round(config.optim.warmup_epochs * steps_per_epoch))
  if total <= 0:
    raise ValueError('training length is 0 steps: set --config.train.total_steps or total_epochs')
  return warmup, total
