"""The authors' optimizer (docs/paper_vs_authors.md Q19): AdamW, warmup + cosine per step, clip, frozen groups.

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
* Global-norm clipping as torch's `clip_grad_norm_(params, 5.0)` (`clip_by_global_norm`): every gradient times
  min(1, 5 / (||g|| + 1e-6)), ||g|| over the trainable parameters only (frozen ones have no gradient in torch).
* A parameter the loss does not reach (torch: `.grad is None`, e.g. BERT's unused pooler in stage 1) is
  skipped by torch's AdamW, not even decayed. `gradient_probe` finds those leaves while the step is traced
  and `skip_without_gradient` drops their update (train_step.py). Their moments, fed zeros, stay zero.
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

from ovseg_jax import param_tree

TRAINABLE, FROZEN = 'trainable', 'frozen'


def decays(name: str, ndim: int) -> bool:
  """The official weight-decay rule: no decay for 1-D parameters or parameters named `*bias`."""
  return not (ndim == 1 or name.split('/')[-1].endswith('bias'))


def decay_mask(params):
  """Pytree of bools like `params` (leaves may be MaskedNode subtrees, which are kept)."""
  return jax.tree_util.tree_map_with_path(lambda p, x: decays(param_tree.path_str(p), jnp.ndim(x)), params)


def frozen_labels(params, frozen: Sequence[str]):
  """Pytree of 'frozen' / 'trainable' labels: a parameter is frozen when a regex fully matches its path."""
  pats = [re.compile(f) for f in frozen]

  def label(p, _):
    name = param_tree.path_str(p)
    return FROZEN if any(r.fullmatch(name) for r in pats) else TRAINABLE
  return jax.tree_util.tree_map_with_path(label, params)


def trainable_mask(params, frozen: Sequence[str]):
  """Pytree of bools: True for parameters that receive updates."""
  return jax.tree.map(lambda l: l == TRAINABLE, frozen_labels(params, frozen))


def gradient_probe(params, record: dict):
  """Identity on `params` whose backward pass fills `record` {'/'-joined path: bool} at trace time: False
  for a leaf whose cotangent is a symbolic zero, i.e. the loss does not depend on it differentiably (unused,
  or used only under stop_gradient). Apply it to the params a loss is differentiated in."""
  is_zero = lambda x: isinstance(x, jax.custom_derivatives.SymbolicZero)  # noqa: E731

  @jax.custom_vjp
  def probe(tree):
    return tree

  def fwd(tree):   # with symbolic_zeros the primals arrive wrapped
    return jax.tree.map(lambda x: x.value, tree,
                        is_leaf=lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)), None

  def bwd(_, ct):
    for path, c in jax.tree_util.tree_flatten_with_path(ct, is_leaf=is_zero)[0]:
      record[param_tree.path_str(path)] = not is_zero(c)
    return (jax.tree.map(lambda c: None if is_zero(c) else c, ct, is_leaf=is_zero),)

  probe.defvjp(fwd, bwd, symbolic_zeros=True)
  return probe(params)


def skip_without_gradient(updates, record: dict):
  """Zeroes the update of every leaf `gradient_probe` recorded without gradient (torch's AdamW skips a
  parameter whose .grad is None). An empty record means the probe never ran: an error, not "no update"."""
  if not record:
    raise ValueError('gradient_probe recorded nothing: apply it inside the differentiated loss function')
  return jax.tree_util.tree_map_with_path(
      lambda p, u: u if record[param_tree.path_str(p)] else jnp.zeros_like(u), updates)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_: g <- g * min(1, max_norm / (||g||_2 + 1e-6)), one norm over all leaves.
  (optax.clip_by_global_norm has no 1e-6 and leaves g unscaled up to ||g|| == max_norm.)"""
  def update(updates, state, params=None):
    del params
    factor = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
    return jax.tree.map(lambda g: g * factor.astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


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
      clip_by_global_norm(optim.grad_clip_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  frozen = tuple(optim.frozen)
  if not frozen:
    return inner, schedule
  tx = optax.multi_transform({TRAINABLE: inner, FROZEN: optax.set_to_zero()},
                             lambda params: frozen_labels(params, frozen))
  return tx, schedule


def warmup_and_total_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> tuple[int, int]:
  """(warmup_steps, total_steps) from the config: explicit step counts win over epoch counts, which are
  truncated like the official build_scheduler's int(epochs * n_iter_per_epoch)."""
  total = config.train.total_steps or int(config.train.total_epochs * steps_per_epoch)
  warmup = config.optim.warmup_steps
  if warmup < 0:
    warmup = int(config.optim.warmup_epochs * steps_per_epoch)
  if total <= 0:
    raise ValueError('training length is 0 steps: set --config.train.total_steps or total_epochs')
  return warmup, total
