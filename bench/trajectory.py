"""Training trajectory parity: the authors' recorded optimisation replayed through the project's train step.

    python -m bench.trajectory --golden_dir DIR --out OUT.npz [--golden trajectory_golden_lr1e-3.npz]

DIR holds `official_ckpt.pth`, the golden `--golden` (a file name in DIR; default the base-lr-1e-3 file, in
which weight decay, warmup + cosine, clipping and the EMA all show in float32; `trajectory_golden.npz` is the
faithful-lr one) and its `trajectory_param_groups*.json` (same suffix). A golden is the authors' own
`build_optimizer` / `build_scheduler` / `clip_grad_norm_` / `momentum_update` run for a few iterations from
`official_ckpt.pth` in the deterministic train mode, batch 4 on one process (golden_small/TRAJECTORY.md).

What runs is what `python -m ovseg_jax.train` runs:
  * the checkpoint is imported by `convert official` (`official.load_official`): params, BN statistics and
    the EMA teacher (their `img_encoder_momentum.*`);
  * the config is configs/vitb.py stage 2 with the checkpoint's model config and `train.deterministic=True`
    (noise-free Gumbel, no drop path, no dropout); the golden's recorded settings go through the trainer's
    own keys: `optim.{base_lr, warmup_lr, min_lr}` = their yml values after their linear rule (the JSON's
    `rule`; `optim.lr_scale_batch=0`), `optim.{weight_decay, b1, b2, eps, grad_clip_norm}` = the recorded
    param groups and clip norm, `train.ema_momentum` = the recorded EMA coefficient, `train.total_epochs` /
    `optim.warmup_epochs` = the harness's short schedule (epochs, warmup_epochs at n_iter steps per epoch,
    through `optim.warmup_and_total_steps`), `train.global_batch_size` = 4, `loss.dice_per_device_batch=0`
    (their single process holds the whole batch);
  * the optimizer and schedule come from `optim.make_optimizer`; the state has `train_step.init_state`'s
    layout with a fresh optimizer (their stage 2), sharded by `sharding.tree_shardings`; the step is
    `train_step.jit_train_step`, the trainer's compiled step, called once per recorded batch.
After every step the state is exported to the authors' layout by `convert/official_export.state_dict` (the
`export --format official` code). Keys our model has no variable for (`logit_scale_mask` and the decoder's
unused `assign.*`, the exporter's FILLS) are written with the checkpoint's own tensors: their run never
changes them (no gradient), and `differences` checks that it does not. `*.num_batches_tracked` (flax BN keeps
no counter) is the checkpoint's count plus the train-mode BatchNorm calls of one step of the project's forward
(`bn_calls_per_step`), so the golden's counts check the BN call structure (docs/paper_vs_authors.md Q7).

OUT.npz has the golden's names and shapes: traj_loss_{total,contrastive,entity,mask}, traj_grad_norm,
traj_lr, traj_fp_names / traj_fp_sum / traj_fp_l2 / traj_fp_delta_l2 (float64 fingerprints of every
state-dict tensor; row 0 = the checkpoint, row k = after step k), traj_value/<name>, traj_bn/*, and
traj_adam_exp_avg{,_sq}/<name> (the AdamW moments after the last step). The worst differences against the
golden are printed (`differences` defines each); the last line is one JSON object of them.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import collections  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import vitb  # noqa: E402
from ovseg_jax import cli  # noqa: E402
from ovseg_jax import optim  # noqa: E402
from ovseg_jax import param_tree  # noqa: E402
from ovseg_jax import sharding as sharding_lib  # noqa: E402
from ovseg_jax import train_step as step_lib  # noqa: E402
from ovseg_jax.convert import official  # noqa: E402
from ovseg_jax.convert import official_export  # noqa: E402
from ovseg_jax.convert import torch_pickle  # noqa: E402
from ovseg_jax.models import heads  # noqa: E402

DEFAULT_GOLDEN = 'trajectory_golden_lr1e-3.npz'
CHECKPOINT = 'official_ckpt.pth'
MEAN = np.asarray([123.675, 116.28, 103.53], np.float32)   # ImageNet mean / std in 0-255 units
STD = np.asarray([58.395, 57.12, 57.375], np.float32)
PROJECTORS = ('img_projector', 'text_projector', 'bridge_projector')
# Biases whose gradient is zero in exact arithmetic, because what follows removes a constant shift: k_proj
# biases before a softmax over keys, the token-MLP fc2 bias before the LayerNorm over channels, the projectors'
# hidden biases before BatchNorm, the decoder's final LN bias (constant over the batch before the bridge
# projector's BatchNorm). Their float gradient is rounding noise, which Adam divides by its own RMS, so they
# take steps of about lr in directions set by rounding on each side; their values are checked against Adam's
# step bound instead (`adam_step_bound`).
NOISE_PARAMS = (r'.*\.attn\.k_proj\.bias', r'.*\.mlp_inter\.fc2\.bias', r'.*_projector\.linear_hidden\.0\.bias',
                r'multimodal_groupingblock\.blocks\.0\.norm_new_x\.bias')


# ----------------------------------------------------------------------------------------------------------
# Inputs: golden, checkpoint, config, batches.
# ----------------------------------------------------------------------------------------------------------
def param_groups_path(golden_path: str) -> str:
  """.../trajectory_golden{suffix}.npz -> .../trajectory_param_groups{suffix}.json."""
  d, name = os.path.split(golden_path)
  return os.path.join(d, re.sub(r'^trajectory_golden(.*)\.npz$', r'trajectory_param_groups\1.json', name))


def load_golden(golden_dir: str, name: str = DEFAULT_GOLDEN) -> tuple[dict, dict]:
  """-> (golden arrays, param-groups JSON)."""
  path = os.path.join(golden_dir, name)
  for p in (path, param_groups_path(path), os.path.join(golden_dir, CHECKPOINT)):
    if not os.path.isfile(p):
      raise FileNotFoundError(f'{p} does not exist')
  with np.load(path) as z:
    golden = {k: z[k] for k in z.files}
  with open(param_groups_path(path)) as f:
    return golden, json.load(f)


def import_checkpoint(golden_dir: str):
  """`convert official` in memory -> (model_config, variables, teacher params, the .pth's state dict)."""
  path = os.path.join(golden_dir, CHECKPOINT)
  model_config, variables, teacher, _ = official.load_official(path, vitb.get_config().model)
  if teacher is None:
    raise ValueError(f'{path} has no img_encoder_momentum.* (EMA teacher): not a stage-2 checkpoint')
  return model_config, variables, teacher, torch_pickle.state_dict_of(torch_pickle.load(path), path)


def trajectory_config(model_config, golden: dict, groups: dict):
  """The trainer's stage-2 config set to the golden's recorded optimisation (module docstring)."""
  c = vitb.get_config('stage=2')
  c.unlock()
  c.model = model_config
  c.train.deterministic = True
  c.train.global_batch_size = int(golden['traj_image_u8'].shape[1])
  c.train.total_epochs = float(groups['epochs'])
  c.train.total_steps = 0
  c.train.ema_momentum = float(golden['traj_ema_momentum'])
  c.train.init_teacher_from_student = False   # the checkpoint's own img_encoder_momentum is the teacher
  c.loss.dice_per_device_batch = 0             # one process: the Dice sum runs over the whole batch
  o = c.optim
  o.base_lr, o.warmup_lr, o.min_lr = (float(groups['rule'][k]) for k in ('base_lr', 'warmup_lr', 'min_lr'))
  o.lr_scale_batch = 0
  o.warmup_epochs = float(groups['warmup_epochs'])
  o.warmup_steps = -1
  o.weight_decay = float(golden['traj_group_weight_decay'][0])
  o.b1, o.b2 = (float(b) for b in golden['traj_group_betas'][0])
  o.eps = float(golden['traj_group_eps'][0])
  o.grad_clip_norm = float(golden['traj_clip_max_norm'])
  c.lock()
  return c


def stage2_defaults_vs_yml(groups: dict) -> dict[str, tuple]:
  """{key: (ours, theirs)} where the project's stage-2 defaults differ from the authors' stage-2 yml."""
  c, y = vitb.get_config('stage=2'), groups['yml']
  pairs = {'base_lr': (c.optim.base_lr, y['base_lr']), 'warmup_lr': (c.optim.warmup_lr, y['warmup_lr']),
           'min_lr': (c.optim.min_lr, y['min_lr']), 'weight_decay': (c.optim.weight_decay, y['weight_decay']),
           'eps': (c.optim.eps, y['eps']), 'betas': ([c.optim.b1, c.optim.b2], list(y['betas'])),
           'clip_grad': (c.optim.grad_clip_norm, y['clip_grad']), 'epochs': (c.train.total_epochs, y['epochs']),
           'warmup_epochs': (c.optim.warmup_epochs, y['warmup_epochs']),
           'global_batch': (c.train.global_batch_size, y['batch_size'] * groups['harness_options']['world_size']),
           'lr_scale_batch': (c.optim.lr_scale_batch, 4096)}
  return {k: v for k, v in pairs.items() if v[0] != v[1]}


def golden_batches(golden: dict) -> list[dict]:
  """The recorded batches in the trainer's layout (NHWC normalised float32 images, int32 ids / masks)."""
  out = []
  for k in range(golden['traj_image_u8'].shape[0]):
    b = {}
    for key in ('image', 'cross_image'):
      b[key] = (golden[f'traj_{key}_u8'][k].transpose(0, 2, 3, 1).astype(np.float32) - MEAN) / STD
    for key in ('text', 'question', 'answer', 'cross_entity'):
      b[f'{key}_ids'] = golden[f'traj_{key}_ids'][k].astype(np.int32)
      b[f'{key}_mask'] = golden[f'traj_{key}_mask'][k].astype(np.int32)
    out.append({key: b[key] for key in step_lib.BATCH_KEYS})
  return out


def bn_calls_per_step(config, model, variables, teacher, batch, total_steps: int) -> dict[str, int]:
  """Train-mode BatchNorm calls per projector in one `forward_losses` (traced, not run). The authors'
  forward makes 4 / 8 / 1 (img / text / bridge, docs/paper_vs_authors.md Q7), which their num_batches_tracked counts."""
  counts = collections.Counter()

  def count(next_fun, args, kwargs, context):
    if isinstance(context.module, heads.BatchNorm) and context.method_name == '__call__':
      if args[1] if len(args) > 1 else kwargs['train']:
        counts[context.module.path[0]] += 1
    return next_fun(*args, **kwargs)

  def forward(params, batch_stats, ema, b):
    return step_lib.forward_losses(params, batch_stats, ema, b, jax.random.key(0), jnp.int32(0), config=config,
                                   model=model, total_steps=total_steps)
  with nn.intercept_methods(count):
    jax.eval_shape(forward, variables['params'], variables['batch_stats'], teacher, batch)
  return {p: counts[p] for p in PROJECTORS}


def optimizer_groups(params, config, model_config) -> dict[str, str]:
  """Authors' parameter name -> 'decay' | 'no_decay' | 'frozen' by our optimizer's masks (optim.py), for
  every parameter of ours (text encoder: 'frozen' only if all of it is)."""
  decay = dict(param_tree.named_leaves(optim.decay_mask(params)))
  trainable = dict(param_tree.named_leaves(optim.trainable_mask(params, tuple(config.optim.frozen))))
  text_frozen = not any(v for k, v in trainable.items() if k.startswith('text_encoder/'))
  out = {}
  for key, shape, _ in official_export.official_layout(model_config):
    if key.startswith(official.TEXT_PREFIX):
      out[key] = 'frozen' if text_frozen else 'trainable'
      continue
    tgt = official.target_shape(key, shape)
    if tgt is None or tgt[0] != 'params' or '/'.join(tgt[1]) not in decay:
      continue   # buffers, the EMA teacher, and keys we have no variable for
    name = '/'.join(tgt[1])
    out[key] = 'frozen' if not trainable[name] else ('decay' if decay[name] else 'no_decay')
  return out


# ----------------------------------------------------------------------------------------------------------
# The replay.
# ----------------------------------------------------------------------------------------------------------
class Replay:
  """The imported checkpoint (shared by several goldens) and `run(golden)`: one compiled trainer step."""

  def __init__(self, golden_dir: str, devices: int = 1):
    self.model_config, self.variables, self.teacher, self.raw = import_checkpoint(golden_dir)
    self.devices = devices
    self.fills = {k for k, s, _ in official_export.official_layout(self.model_config)
                  if any(re.fullmatch(p, k) for p, _ in official_export.FILLS)
                  and not k.endswith('num_batches_tracked')}

  def export(self, state: dict, step: int, bn_calls: dict) -> dict:
    """The state -> the authors' state dict (the exporter; see the module docstring for the fills)."""
    host = jax.device_get({k: state[k] for k in ('params', 'batch_stats', 'ema')})
    sd = official_export.state_dict(self.model_config, {'params': host['params'],
                                                        'batch_stats': host['batch_stats']}, host['ema'])
    for key in sd:
      if key.endswith('num_batches_tracked'):
        sd[key] = np.asarray(self.raw[key], np.int64) + step * bn_calls[key.split('.')[0]]
      elif key in self.fills:
        sd[key] = np.asarray(self.raw[key])
    return sd

  def run(self, golden: dict, groups: dict, log=None) -> dict:
    """Replays `golden`'s batches -> {'arrays': OUT arrays, 'settings', 'bn_calls', 'groups'}."""
    log = log or (lambda msg: None)
    config = trajectory_config(self.model_config, golden, groups)
    batches = golden_batches(golden)
    n = len(batches)
    warmup_steps, total_steps = optim.warmup_and_total_steps(config, steps_per_epoch=int(groups['n_iter']))
    gbs = config.train.global_batch_size
    mesh = sharding_lib.make_mesh(config.mesh, devices=jax.devices()[:self.devices])
    sharding_lib.check_batch_divisible(gbs, mesh)
    model = step_lib.make_model(config)
    tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps, warmup_steps=warmup_steps,
                                        global_batch=gbs)
    # train_step.init_state's layout around the imported variables, with a fresh optimizer (their stage 2).
    abstract = jax.eval_shape(functools.partial(step_lib.init_state, config, model, tx), jax.random.key(0))
    params = self.variables['params']
    state = dict(params=params, batch_stats=self.variables['batch_stats'], opt_state=tx.init(params),
                 ema=self.teacher, step=jnp.zeros((), jnp.int32))
    if jax.tree.structure(state) != jax.tree.structure(abstract):
      raise ValueError('the imported state does not have the layout of train_step.init_state')
    shardings = sharding_lib.tree_shardings(abstract, mesh, config.sharding)
    state = jax.device_put(jax.tree.map(np.array, state), shardings)   # own copies: the step donates them
    step_fn = step_lib.jit_train_step(config, model, tx, schedule, total_steps, mesh, shardings)
    step_rng = jax.random.split(jax.random.key(config.seed))[1]
    bn_calls = bn_calls_per_step(config, model, self.variables, self.teacher, batches[0], total_steps)

    rows, metrics = [self.export(state, 0, bn_calls)], []
    t0 = time.perf_counter()
    for k, batch in enumerate(batches):
      state, m = step_fn(state, sharding_lib.host_batch_to_global(batch, mesh), step_rng)
      metrics.append(jax.device_get(m))
      rows.append(self.export(state, k + 1, bn_calls))
      log(f'step {k + 1}/{n}: loss {float(metrics[-1]["loss"]):.6f} ({time.perf_counter() - t0:.1f}s)')
    settings = dict(base_lr=config.optim.base_lr, warmup_lr=config.optim.warmup_lr, min_lr=config.optim.min_lr,
                    warmup_steps=warmup_steps, total_steps=total_steps, weight_decay=config.optim.weight_decay,
                    betas=[config.optim.b1, config.optim.b2], eps=config.optim.eps,
                    clip=config.optim.grad_clip_norm, ema=config.train.ema_momentum,
                    devices=int(mesh.devices.size), lr_after=[float(schedule(g)) for g in range(1, n + 1)])
    return dict(arrays=out_arrays(golden, metrics, rows, jax.device_get(state['opt_state'])), settings=settings,
                bn_calls=bn_calls, numel={k: int(np.size(v)) for k, v in rows[0].items()},
                groups=optimizer_groups(params, config, self.model_config))


def out_arrays(golden: dict, metrics: list[dict], rows: list[dict], opt_state) -> dict[str, np.ndarray]:
  """The OUT.npz arrays, under the golden's names and shapes (module docstring), from the step metrics, the
  exported state dict of every row and the final optimizer state."""
  out = {}
  for ours, ref in (('loss', 'total'), ('loss_contrast', 'contrastive'), ('loss_entity', 'entity'),
                    ('loss_mask', 'mask')):
    out[f'traj_loss_{ref}'] = np.asarray([m[ours] for m in metrics], np.float32)
  out['traj_grad_norm'] = np.asarray([m['grad_norm'] for m in metrics], np.float32)
  out['traj_lr'] = np.repeat(np.asarray([[m['lr']] for m in metrics], np.float64), golden['traj_lr'].shape[1], 1)
  names = list(rows[0])
  out['traj_fp_names'] = np.asarray(names)
  f64 = lambda x: np.asarray(x, np.float64).ravel()  # noqa: E731
  out['traj_fp_sum'] = np.asarray([[np.sum(f64(r[k])) for k in names] for r in rows])
  out['traj_fp_l2'] = np.asarray([[np.linalg.norm(f64(r[k])) for k in names] for r in rows])
  out['traj_fp_delta_l2'] = np.asarray([[np.linalg.norm(f64(r[k]) - f64(rows[0][k])) for k in names]
                                        for r in rows])
  mu = dict(param_tree.named_leaves(optax.tree_utils.tree_get(opt_state, 'mu')))
  nu = dict(param_tree.named_leaves(optax.tree_utils.tree_get(opt_state, 'nu')))
  for key in golden:
    if key.startswith('traj_value/'):
      name = key[len('traj_value/'):]
      out[key] = np.stack([np.asarray(r[name], golden[key].dtype) for r in rows])
    elif key.startswith('traj_bn/'):
      proj, buf = re.fullmatch(r'traj_bn/(\w+_projector)_(\w+)', key).groups()
      out[key] = np.stack([np.asarray(r[f'{proj}.linear_hidden.1.{buf}'], golden[key].dtype) for r in rows])
    elif key.startswith('traj_adam_exp_avg'):   # our moment leaf -> the authors' layout (the converter's map)
      name = key.partition('/')[2]
      path = '/'.join(official.target_of(name, golden[key])[1])
      src = nu if key.startswith('traj_adam_exp_avg_sq/') else mu
      out[key] = official.to_official(name, golden[key].shape, np.asarray(src[path]))
  return out


# ----------------------------------------------------------------------------------------------------------
# Comparison.
# ----------------------------------------------------------------------------------------------------------
def adam_step_bound(lrs, b1: float, b2: float) -> np.ndarray:
  """[n + 1] cumulative bound on |x_k - x_0| per element for Adam without weight decay (eps ignored):
  |m_hat_t| / sqrt(v_hat_t) <= (1 - b1) / sqrt(1 - b2) * sqrt(sum_j (b1^2 / b2)^j) * sqrt(1 - b2^t) /
  (1 - b1^t) (Cauchy-Schwarz; 1 at t = 1), times the lr of step t."""
  out = [0.0]
  for t, lr in enumerate(lrs, start=1):
    r = ((1 - b1) / np.sqrt(1 - b2) * np.sqrt(sum((b1 * b1 / b2) ** j for j in range(t)))
         * np.sqrt(1 - b2 ** t) / (1 - b1 ** t))
    out.append(out[-1] + lr * r)
  return np.asarray(out)


def categories(golden: dict, groups: dict) -> dict[str, list[str]]:
  """The golden's fingerprint names by kind: 'trained' (a real gradient), 'noise' (a gradient, zero in exact
  arithmetic: NOISE_PARAMS), 'teacher', 'frozen', 'no_gradient' (in their optimizer, never a gradient),
  'buffer'."""
  grad = {str(n) for n in golden['traj_grad_names']}
  frozen, nograd = set(groups['frozen_not_in_optimizer']), set(groups['in_optimizer_without_gradient'])
  out = collections.defaultdict(list)
  for name in (str(x) for x in golden['traj_fp_names']):
    if name in grad:
      out['noise' if any(re.fullmatch(p, name) for p in NOISE_PARAMS) else 'trained'].append(name)
    elif name.startswith('img_encoder_momentum.'):
      out['teacher'].append(name)
    elif name in frozen:
      out['frozen'].append(name)
    elif name in nograd:
      out['no_gradient'].append(name)
    else:
      out['buffer'].append(name)
  return dict(out)


def _rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def _scaled(a, b) -> float:
  """max |a - b| / max |b|: the difference relative to the tensor's scale."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def differences(ours: dict, golden: dict, groups: dict, numel: dict[str, int]) -> dict:
  """Worst differences of a replay against the golden (`numel`: elements of each state-dict tensor):
    loss_*, grad_norm, lr  max over steps of |ours - ref| / |ref| (grad_norm: the global norm before clipping)
    fp_l2          max over rows and over every tensor but the 'noise' and 'no_gradient' ones (`categories`)
                   of the relative L2 difference
    fp_l2_final    the same at the last row (after the last step) only
    fp_sum         max |sum difference| / (sqrt(numel) * L2), the sum's Cauchy-Schwarz scale, same tensors
    value          max over traj_value tensors (not 'noise' / 'no_gradient' ones) and rows of max|diff| / max|ref|
    logit_scale    max over rows of the relative difference
    bn             max over the traj_bn running means / vars of max|diff| / max|ref|
    bn_count_equal num_batches_tracked equal in every row
    adam           max over the AdamW moments of non-'noise' params of max|diff| / max|ref|
    noise_vs_bound 'noise' params (see `categories`): max of |L2 difference| / (2 sqrt(numel) B_k) and of the
                   tracked values' max|diff| / (2 B_k), B_k = adam_step_bound: <= 1 when both sides move less
                   than Adam's largest step
    no_gradient_change  max |row k - row 0| of the 'no_gradient' fingerprints and values, either side
  """
  cat = categories(golden, groups)
  idx_g = {str(n): i for i, n in enumerate(golden['traj_fp_names'])}
  idx_o = {str(n): i for i, n in enumerate(ours['traj_fp_names'])}
  d = {}
  for k in ('total', 'contrastive', 'entity', 'mask'):
    d[f'loss_{k}'] = _rel(ours[f'traj_loss_{k}'], golden[f'traj_loss_{k}'])
  d['grad_norm'] = _rel(ours['traj_grad_norm'], golden['traj_grad_norm'])
  d['lr'] = _rel(ours['traj_lr'], golden['traj_lr'])

  checked = sum((cat.get(k, []) for k in ('trained', 'teacher', 'frozen', 'buffer')), [])
  io, ig = [idx_o[n] for n in checked], [idx_g[n] for n in checked]
  l2g = golden['traj_fp_l2'][:, ig]
  rel = np.abs(ours['traj_fp_l2'][:, io] - l2g) / np.maximum(l2g, 1e-30)
  d['fp_l2'] = float(rel.max())
  d['fp_l2_final'] = float(rel[-1].max())
  d['fp_l2_worst'] = checked[int(np.argmax(rel.max(0)))]
  scale = l2g * np.sqrt(np.asarray([numel[n] for n in checked], np.float64))
  d['fp_sum'] = float(np.max(np.abs(ours['traj_fp_sum'][:, io] - golden['traj_fp_sum'][:, ig])
                             / np.maximum(scale, 1e-30)))

  noise, nograd = set(cat.get('noise', [])), set(cat.get('no_gradient', []))
  vals = {k: _scaled(ours[k], golden[k]) for k in golden
          if k.startswith('traj_value/') and k.partition('/')[2] not in noise | nograd}
  d['value'] = max(vals.values())
  d['value_worst'] = max(vals, key=vals.get)
  d['logit_scale'] = _rel(ours['traj_value/logit_scale'], golden['traj_value/logit_scale'])
  bn = {k: _scaled(ours[k], golden[k]) for k in golden if k.startswith('traj_bn/') and '_running_' in k}
  d['bn'] = max(bn.values())
  d['bn_worst'] = max(bn, key=bn.get)
  d['bn_count_equal'] = all(np.array_equal(ours[k], golden[k]) for k in golden
                            if k.startswith('traj_bn/') and k.endswith('num_batches_tracked'))
  adam = {k: _scaled(ours[k], golden[k]) for k in golden
          if k.startswith('traj_adam_exp_avg') and k.partition('/')[2] not in noise}
  d['adam'] = max(adam.values())
  d['adam_worst'] = max(adam, key=adam.get)

  bound = adam_step_bound(golden['traj_lr'][:, 0], *(float(b) for b in golden['traj_group_betas'][0]))[1:]
  ratios = {}
  for name in sorted(noise):
    diff = np.abs(ours['traj_fp_l2'][1:, idx_o[name]] - golden['traj_fp_l2'][1:, idx_g[name]])
    ratios[name] = float(np.max(diff / (2 * np.sqrt(numel[name]) * bound)))
    key = f'traj_value/{name}'
    if key in golden:
      diff = np.abs(ours[key] - golden[key])[1:].reshape(len(bound), -1).max(1)
      ratios[key] = float(np.max(diff / (2 * bound)))
  d['noise_vs_bound'] = max(ratios.values(), default=0.0)
  d['noise_vs_bound_worst'] = max(ratios, key=ratios.get) if ratios else ''
  change = 0.0
  for name in nograd:
    for src, idx in ((ours, idx_o), (golden, idx_g)):
      for fp in ('traj_fp_sum', 'traj_fp_l2'):
        change = max(change, float(np.max(np.abs(src[fp][:, idx[name]] - src[fp][0, idx[name]]))))
      if f'traj_value/{name}' in src:
        v = src[f'traj_value/{name}']
        change = max(change, float(np.max(np.abs(v - v[0]))))
  d['no_gradient_change'] = change
  return d


def group_mismatches(ours: dict[str, str], groups: dict) -> list[str]:
  """Parameters whose optimizer group (decay / no decay / frozen) differs from the authors' param groups."""
  theirs = {}
  for g in groups['param_groups']:
    for name in g['names']:
      theirs[name] = 'decay' if g['weight_decay'] > 0 else 'no_decay'
  for name in groups['frozen_not_in_optimizer']:
    theirs[name] = 'frozen'
  bad = [f'{k}: ours {v}, theirs {theirs.get(k)}' for k, v in ours.items() if theirs.get(k) != v]
  # Theirs without a counterpart in ours must be exactly the parameters that never get a gradient.
  extra = {k for k in set(theirs) - set(ours) - set(groups['in_optimizer_without_gradient'])
           if not k.startswith('img_encoder_momentum.')}   # the EMA teacher is no parameter of ours
  return bad + [f'{k}: no variable of ours' for k in sorted(extra)]


# ----------------------------------------------------------------------------------------------------------
# CLI.
# ----------------------------------------------------------------------------------------------------------
@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('golden_dir', None, 'folder with official_ckpt.pth and the golden files', flag_values=fv)
  flags.DEFINE_string('out', None, 'the .npz to write (the golden\'s array names and shapes)', flag_values=fv)
  flags.DEFINE_string('golden', DEFAULT_GOLDEN, 'golden file name in --golden_dir', flag_values=fv)
  flags.DEFINE_integer('devices', 1, 'devices of the data-parallel mesh (divide 4)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.trajectory', doc=__doc__, required=('golden_dir', 'out'))
  jax.config.update('jax_default_matmul_precision', 'highest')
  try:
    golden, groups = load_golden(args.golden_dir, args.golden)
    t0 = time.perf_counter()
    replay = Replay(args.golden_dir, devices=args.devices)
    r = replay.run(golden, groups, log=lambda msg: print(msg, flush=True))
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {str(e).splitlines()[0]}', file=sys.stderr)
    return 2
  seconds = time.perf_counter() - t0
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  np.savez(args.out, **r['arrays'])
  d = differences(r['arrays'], golden, groups, r['numel'])
  mism = group_mismatches(r['groups'], groups)
  print(f'golden {args.golden}: {len(golden["traj_loss_total"])} steps; settings {json.dumps(r["settings"])}')
  print(f'train-mode BN calls per step {r["bn_calls"]}; optimizer groups: '
        f'{"identical to theirs" if not mism else "; ".join(mism[:5])}')
  defaults = stage2_defaults_vs_yml(groups)
  print(f'stage-2 defaults vs their yml: {"identical" if not defaults else defaults}')
  print('worst differences against the golden (bench/trajectory.py `differences`):')
  for k, v in d.items():
    print(f'  {k:22s} {v:.3g}' if isinstance(v, float) else f'  {k:22s} {v}')
  print(f'wrote {args.out} ({seconds:.0f}s)')
  print(json.dumps(dict(bench='trajectory', golden=args.golden, group_mismatches=len(mism),
                        **{k: (float(f'{v:.3g}') if isinstance(v, float) else v) for k, v in d.items()})))
  return 0


if __name__ == '__main__':
  sys.exit(main())
