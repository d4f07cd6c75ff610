"""optim.py: the official decay mask, the timm warmup+cosine schedule, clipping and frozen groups."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ovseg_jax import optim
from ovseg_jax import param_tree


def _optim_config(**kw):
  c = ml_collections.ConfigDict(dict(
      base_lr=1e-3, warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=0.0, warmup_steps=2, weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=5.0, lr_scale_batch=0, frozen=()))
  c.update(kw)
  return c


def test_decay_mask_on_named_params():
  """Official rule: no decay for 1-D params and *bias; the 0-dim logit_scale IS decayed."""
  shapes = {
      'img_encoder/patch_embed/proj/kernel': (16, 16, 3, 64),
      'img_encoder/patch_embed/proj/bias': (64,),
      'img_encoder/pos_embed': (196, 64),
      'img_encoder/group_token': (64, 64),
      'img_encoder/stage1_block0/norm1/scale': (64,),
      'img_encoder/stage1_block0/attn/qkv/kernel': (64, 192),
      'decoder/cross_attn/attn/q_proj/bias': (8, 8),         # a 2-D bias is still a bias
      'img_projector/bn/scale': (4096,),
      'text_encoder/embeddings/word_embeddings/embedding': (30522, 64),
      'logit_scale': (),
  }
  expected = {
      'img_encoder/patch_embed/proj/kernel': True, 'img_encoder/patch_embed/proj/bias': False,
      'img_encoder/pos_embed': True, 'img_encoder/group_token': True,
      'img_encoder/stage1_block0/norm1/scale': False, 'img_encoder/stage1_block0/attn/qkv/kernel': True,
      'decoder/cross_attn/attn/q_proj/bias': False, 'img_projector/bn/scale': False,
      'text_encoder/embeddings/word_embeddings/embedding': True, 'logit_scale': True,
  }
  tree = {}
  for name, shape in shapes.items():
    node = tree
    *parents, leaf = name.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jax.ShapeDtypeStruct(shape, jnp.float32)
  got = dict(param_tree.named_leaves(optim.decay_mask(tree)))
  assert got == expected


def _timm_reference(t, base, warm_lr, min_lr, warm, total):
  """timm 0.6 CosineLRScheduler._get_lr, t_in_epochs=False, warmup_prefix=False, cycle_limit=1, k=1."""
  if t < warm:
    return warm_lr + t * (base - warm_lr) / warm
  if t >= total:
    return min_lr
  return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / total))


def test_schedule_matches_timm_with_the_official_one_step_lag():
  cfg = _optim_config(base_lr=6.4e-4, warmup_lr=1.6e-5, min_lr=1.6e-4, lr_scale_batch=4096)
  sched = optim.make_schedule(cfg, total_steps=20, warmup_steps=4, global_batch=1024)
  f = 1024 / 4096
  got = np.array([float(sched(g)) for g in range(23)])
  # step g uses s(max(g - 1, 0)); every value scaled by global_batch / 4096
  want = np.array([_timm_reference(max(g - 1, 0), 6.4e-4 * f, 1.6e-5 * f, 1.6e-4 * f, 4, 20) for g in range(23)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # hand values: warmup from warmup_lr, the first two steps equal, cosine not shifted by the warmup
  assert got[0] == got[1] == np.float32(4e-6)
  np.testing.assert_allclose(got[3], 4e-6 + 2 * (1.6e-4 - 4e-6) / 4, rtol=1e-6)
  np.testing.assert_allclose(got[5], 4e-5 + 0.5 * (1.6e-4 - 4e-5) * (1 + math.cos(math.pi * 4 / 20)), rtol=1e-6)
  np.testing.assert_allclose(got[22], 4e-5, rtol=1e-6)


def test_schedule_without_warmup_starts_at_base_lr():
  sched = optim.make_schedule(_optim_config(warmup_steps=0), total_steps=10, warmup_steps=0, global_batch=8)
  np.testing.assert_allclose([float(sched(0)), float(sched(1))], [1e-3, 1e-3], rtol=1e-6)


def test_warmup_and_total_steps_from_epochs_or_steps():
  c = ml_collections.ConfigDict(dict(
      train=dict(total_steps=0, total_epochs=3.0), optim=dict(warmup_steps=-1, warmup_epochs=0.5)))
  assert optim.warmup_and_total_steps(c, 100) == (50, 300)
  c.train.total_steps, c.optim.warmup_steps = 7, 2
  assert optim.warmup_and_total_steps(c, 100) == (2, 7)


def _params():
  return {
      'img_encoder': {'kernel': jnp.full((4, 4), 2.0), 'bias': jnp.full((4,), 2.0)},
      'text_encoder': {'kernel': jnp.full((4, 4), 3.0)},
      'logit_scale': jnp.asarray(2.0),
  }


def test_adamw_decay_mask_frozen_and_clip_in_one_update():
  cfg = _optim_config(frozen=('text_encoder/.*',), warmup_steps=0)
  tx, sched = optim.make_optimizer(cfg, total_steps=10, warmup_steps=0, global_batch=8)
  params = _params()
  state = tx.init(params)
  # Frozen params hold no AdamW moments (empty MaskedNode slots): no optimizer memory.
  moments = [x for x in jax.tree.leaves(state) if np.ndim(x) > 0]
  assert sum(int(np.size(x)) for x in moments) == 2 * (16 + 4)   # mu and nu of img_encoder only
  grads = jax.tree.map(jnp.zeros_like, params)
  grads['img_encoder']['kernel'] = jnp.full((4, 4), 12.5)          # ||g|| = 50 -> clipped to 5
  grads['text_encoder']['kernel'] = jnp.full((4, 4), 1e6)          # frozen: must not enter the clip norm
  updates, state = tx.update(grads, state, params)
  new = optax.apply_updates(params, updates)
  lr = float(sched(0))
  # Frozen: exactly unchanged.
  np.testing.assert_array_equal(new['text_encoder']['kernel'], params['text_encoder']['kernel'])
  # Zero-gradient bias: no decay -> unchanged. Zero-gradient 0-dim logit_scale: decayed by lr * wd * p.
  np.testing.assert_array_equal(new['img_encoder']['bias'], params['img_encoder']['bias'])
  np.testing.assert_allclose(float(new['logit_scale']), 2.0 - lr * 0.05 * 2.0, rtol=1e-6)
  # Kernel: Adam's first step is -lr * g / (|g| + eps) (bias-corrected) minus decoupled decay.
  np.testing.assert_allclose(new['img_encoder']['kernel'], 2.0 - lr * (1.0 + 0.05 * 2.0), rtol=1e-6)
  # The first moment saw the clipped gradient: (1 - b1) * g * 5 / 50 (frozen 1e6 gradient excluded).
  mu = [x for x in jax.tree.leaves(state) if np.shape(x) == (4, 4)][0]
  np.testing.assert_allclose(mu, 0.1 * 12.5 * 5.0 / 50.0, rtol=1e-5)


def test_clip_is_torch_clip_grad_norm():
  """torch.nn.utils.clip_grad_norm_: g * min(1, max_norm / (||g|| + 1e-6)); it scales at ||g|| == max_norm too."""
  clip = optim.clip_by_global_norm(5.0)
  for norm in (50.0, 5.0, 1.0):
    g = {'a': jnp.full((4,), norm / 2), 'b': jnp.zeros((3,))}          # ||g|| = norm
    out, _ = clip.update(g, clip.init(g))
    factor = min(1.0, 5.0 / (norm + 1e-6))
    np.testing.assert_allclose(out['a'], norm / 2 * factor, rtol=1e-7)
  assert float(out['a'][0]) == 0.5   # ||g|| = 1: unchanged


def test_epoch_counts_are_truncated_like_build_scheduler():
  """Their build_scheduler: int(epochs * n_iter_per_epoch) (truncation, not rounding)."""
  c = ml_collections.ConfigDict(dict(
      train=dict(total_steps=0, total_epochs=2.5), optim=dict(warmup_steps=-1, warmup_epochs=0.75)))
  assert optim.warmup_and_total_steps(c, 3) == (int(0.75 * 3), int(2.5 * 3)) == (2, 7)
