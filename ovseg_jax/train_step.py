"""The train state and the one jitted, sharded update step (official `forward_train` + optimizer + EMA).

State (a dict, sharded leaf by leaf by `sharding.tree_shardings`):
    params       OVSegmentor params {img_encoder, text_encoder, img/text/bridge_projector, decoder, logit_scale}
    batch_stats  the three projectors' BN running statistics
    opt_state    optax state of `optim.make_optimizer` (frozen params hold empty MaskedNodes)
    ema          EMA teacher: a copy of params['img_encoder'] (stage 2 / mask loss), else {}
    step         int32 scalar: optimizer steps applied so far

One step, in the authors' call order (docs/paper_vs_authors.md Q7: every projector call updates its running stats):
    online = encode_image(image, train)                    img_projector(pooled), img_projector(groups)
    text   = encode_text(caption, train, project_tokens)   text_projector([CLS]), text_projector(tokens)
    L_contrast = InfoNCE(image_x, text_x)                                                   (Eq. 7)
    quest  = encode_text(question); dec = decode_entity(image_feat_before_proj, quest tokens) -> bridge
    answer = encode_text(answer);   L_entity = InfoNCE(question_out, answer.text_x)         (Eq. 8-9)
    teacher = VisualEncoder(params=ema)(cross_image, train), stop_gradient; img_projector(teacher) (stats)
    entity  = encode_text(cross_entity); group_logits = sg(image_feat @ entity.text_x)      [B, K]
    L_mask  = mask_consistency_loss(online.q, teacher.q, teacher.k, ...)                    (Eq. 10-12)
    L = L_contrast + w_e L_entity + lambda(step) L_mask                                     (Eq. 13)
then clip + AdamW (optim.py; a parameter the loss does not reach gets no update, as torch skips a parameter
without .grad) and ema <- m * ema + (1 - m) * params_new['img_encoder'] (m = 0.99, optax
`incremental_update` with step_size 1 - m). A non-finite loss or gradient norm leaves the state unchanged
but for `step` (`metrics['finite'] = 0`), so the trainer stops with a good state in memory and on disk.

rng: the step folds `state['step']` into a base key, so a resumed run draws the same noise as a straight one.
Frozen params (config.optim.frozen) enter the loss through `stop_gradient`: no gradient is computed for them,
yet the frozen text encoder still runs in train mode with dropout (official).
"""

import functools
from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from ovseg_jax import device_images
from ovseg_jax import group_health
from ovseg_jax import losses
from ovseg_jax import matching
from ovseg_jax import optim
from ovseg_jax import prompts
from ovseg_jax import recipe
from ovseg_jax import sharding as sharding_lib
from ovseg_jax import text_buckets
from ovseg_jax.models import ovsegmentor
from ovseg_jax.models import visual
from ovseg_jax.tokenizer import MASK_ID

OVSegmentor = ovsegmentor.OVSegmentor
# The keys of a full (stage-2) batch. The cross keys are read by the mask branch only: a batch of a run
# without it (stage 1; data/pipeline.py `needs_cross_image`) has none (`required_batch_keys`). Images are
# uint8 from the pipeline or float32 already normalised (device_images.prepare_images); the pipeline's DeiT
# recipe adds `image_erase_box` (+ `cross_image_erase_box`) int32 [B, 4].
CROSS_KEYS = ('cross_image', 'cross_entity_ids', 'cross_entity_mask')
BATCH_KEYS = ('image', 'text_ids', 'text_mask', 'question_ids', 'question_mask', 'answer_ids',
              'answer_mask') + CROSS_KEYS


uses_teacher = recipe.uses_teacher   # stage 2, or paper_single with a mask loss: an EMA teacher exists


def required_batch_keys(config: ml_collections.ConfigDict, mask_branch: bool = True) -> tuple[str, ...]:
  """The BATCH_KEYS a step reads: without CROSS_KEYS when the mask branch does not run."""
  return BATCH_KEYS if uses_teacher(config) and mask_branch else BATCH_KEYS[:-len(CROSS_KEYS)]


def uses_entity(config: ml_collections.ConfigDict) -> bool:
  return config.loss.entity_weight > 0


@functools.lru_cache(maxsize=8)
def _match_prompt_arrays(dataset: str, max_length: int):
  """(prompt ids [V + 1, T], prompt mask [V + 1, T], name tokens [V, M] padded with -1) of the dataset's entity
  vocabulary, then the background, each as "a photo of a {}." (`losses.group_match_loss`)."""
  from ovseg_jax import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from ovseg_jax.data import entities as entities_lib  # pylint: disable=g-import-not-at-top
  names = entities_lib.get_vocabulary(entities_lib.dataset_vocabulary(dataset)).canonical
  tok = tokenizer_lib.get_tokenizer(max_length=max_length)
  ids, mask = tok([prompts.SIMPLE_TEMPLATE.format(n) for n in (*names, prompts.BACKGROUND)])
  name_ids, name_mask = tok(list(names), padding='longest')
  # Drop [CLS] and [SEP]: the name's wordpieces alone, as they appear inside the answer sentence.
  pieces = [row[1:int(m.sum()) - 1] for row, m in zip(name_ids, name_mask)]
  tokens = np.full((len(names), max(len(p) for p in pieces)), -1, np.int32)
  for i, p in enumerate(pieces):
    tokens[i, :len(p)] = p
  return ids, mask, tokens


def train_model_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """config.model for training; the deterministic mode also zeroes BERT dropout (no rng-free switch)."""
  m = ml_collections.ConfigDict(config.model.to_dict())
  if config.train.deterministic:
    m.text.dropout = 0.0
  return ml_collections.FrozenConfigDict(m)


def make_model(config: ml_collections.ConfigDict) -> OVSegmentor:
  return OVSegmentor(config=train_model_config(config))


# ----------------------------------------------------------------------------------------------------------
# State.
# ----------------------------------------------------------------------------------------------------------
def init_state(config: ml_collections.ConfigDict, model: OVSegmentor, tx: optax.GradientTransformation,
               rng: jax.Array) -> dict:
  """The fresh train state (random init). Run it under `sharding.create_sharded_state`."""
  size = config.model.vision.img_size
  t = config.model.text.max_length
  images = jnp.zeros((1, size, size, 3), jnp.float32)
  ids = jnp.zeros((1, t), jnp.int32)
  p_rng, d_rng, g_rng = jax.random.split(rng, 3)
  variables = model.init({'params': p_rng, 'dropout': d_rng, 'gumbel': g_rng}, images, ids, ids + 1,
                         train=False)
  params = variables['params']
  return dict(
      params=params,
      batch_stats=variables['batch_stats'],
      opt_state=tx.init(params),
      # `+ 0.0` keeps the teacher in its own buffers (the step donates the state leaf by leaf).
      ema=jax.tree.map(lambda x: x + 0.0, params['img_encoder']) if uses_teacher(config) else {},
      step=jnp.zeros((), jnp.int32),
  )


# ----------------------------------------------------------------------------------------------------------
# Forward (official forward_train) and loss.
# ----------------------------------------------------------------------------------------------------------
def _matcher(config, mesh):
  if config.loss.matcher == 'scipy' and mesh is not None:
    axes = tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.shape)
    return functools.partial(matching.assign_sharded, mesh=mesh, batch_axes=axes, method='scipy')
  return config.loss.matcher


def forward_losses(params, batch_stats, teacher, batch: dict, rng: jax.Array, step: jax.Array, *,
                   config: ml_collections.ConfigDict, model: OVSegmentor, total_steps: int,
                   mesh=None, return_intermediates: bool = False, mask_branch: bool = True):
  """The official forward_train -> (total loss, (metrics, new batch_stats[, intermediates])).

  batch: `required_batch_keys` arrays of the global batch B (images [B, H, W, 3] uint8 as the pipeline
    ships them, or float32 already normalised: device_images.prepare_images; ids / masks [B, T]; T may be a
    text bucket shorter than model.text.max_length, text_buckets.py).
  rng: the step key (streams 'dropout' and 'gumbel' are split from it per call).
  mask_branch: False skips the teacher / cross-image / mask-loss branch (the trainer's choice while the
    paper_single lambda is still 0; see `mask_phase_start`).
  """
  missing = [k for k in required_batch_keys(config, mask_branch) if k not in batch]
  if missing:
    raise KeyError(f'the batch lacks {missing} (has {sorted(batch)}); the mask branch needs the cross-image '
                   'keys, which data/pipeline.py emits when needs_cross_image(config)')
  batch = device_images.prepare_images(batch, jax.random.fold_in(rng, device_images.RNG_FOLD))
  det = bool(config.train.deterministic)
  counter = iter(range(1 << 20))

  def rngs():  # fresh 'dropout' / 'gumbel' keys for every model call, in call order
    i = next(counter)
    return {'dropout': jax.random.fold_in(rng, 2 * i), 'gumbel': jax.random.fold_in(rng, 2 * i + 1)}

  def call(bs, method, *args):
    out, upd = model.apply({'params': params, 'batch_stats': bs}, *args, method=method, rngs=rngs(),
                           mutable=['batch_stats'])
    return out, upd['batch_stats']

  bs = batch_stats
  inter = {}
  all_tokens = bool(config.train.text_bn_all_tokens)
  # Bucketed padding: the token projection's BN statistics skip padding, whose count depends on the bucket.
  enc_text = functools.partial(OVSegmentor.encode_text, project_tokens=all_tokens,
                               real_token_stats=all_tokens and text_buckets.enabled(config))
  # Contrast (Eq. 7).
  img, bs = call(bs, functools.partial(OVSegmentor.encode_image, deterministic=det), batch['image'], True)
  txt, bs = call(bs, enc_text, batch['text_ids'], batch['text_mask'], True)
  scale, _ = call(bs, OVSegmentor.logit_scale_exp)
  chunk = config.loss.contrast_chunk
  l_contrast = losses.contrastive_loss(img['image_x'], txt['text_x'], scale, chunk)
  inter.update(image_x=img['image_x'], text_x=txt['text_x'])

  # Masked entity completion (Eq. 8-9).
  l_entity = jnp.zeros((), jnp.float32)
  if uses_entity(config):
    quest, bs = call(bs, enc_text, batch['question_ids'], batch['question_mask'], True)
    dec, bs = call(bs, OVSegmentor.decode_entity, img['image_feat_before_proj'],
                   quest['text_feat_before_proj'], batch['question_mask'], True)
    ans, bs = call(bs, enc_text, batch['answer_ids'], batch['answer_mask'], True)
    l_entity = losses.entity_loss(dec['question_out'], ans['text_x'], scale, chunk)
    inter.update(question_out=dec['question_out'], answer_x=ans['text_x'])

  # Cross-image mask consistency (Eq. 10-12) with the EMA teacher.
  metrics = {}
  l_mask = None
  lam = jnp.zeros((), jnp.float32)
  if uses_teacher(config) and mask_branch:
    lam = losses.mask_loss_weight(step, total_steps, config.recipe, config.loss.mask_weight,
                                  config.loss.mask_start_fraction, config.stage)
    teacher = jax.lax.stop_gradient(teacher)
    t_out = visual.VisualEncoder(model.config).apply({'params': teacher}, batch['cross_image'], True, det,
                                                     rngs=rngs())
    t_out = jax.lax.stop_gradient(t_out)
    # The official teacher output goes through the shared online img_projector (BN stats only).
    t_groups = t_out['x']
    _, bs = call(bs, lambda m, g: (m.img_projector(jnp.mean(g, axis=1), True), m.img_projector(g, True)),
                 t_groups)
    ent, bs = call(bs, enc_text, batch['cross_entity_ids'], batch['cross_entity_mask'], True)
    group_logits = jax.lax.stop_gradient(jnp.einsum('bkp,bp->bk', img['image_feat'], ent['text_x'],
                                                    precision=jax.lax.Precision.HIGHEST))
    per_dev = config.loss.dice_per_device_batch or None
    l_mask, aux = losses.mask_consistency_loss(
        img['q'], t_out['q'], t_out['k'], img['grid'], group_logits,
        upsample_to=tuple(batch['cross_image'].shape[1:3]), cost=config.loss.mask_cost,
        dice_norm=config.loss.dice_norm, threshold=config.loss.cross_threshold,
        group_ratio=config.loss.group_ratio, matcher=_matcher(config, mesh), per_device_batch=per_dev,
        logit_scale=None)   # C^-0.5: the authors' embed_dim^-0.5 (768^-0.5 for ViT-B; golden test checks)
    metrics['mask_lambda'] = lam
    metrics['mask_dice_mean'] = jnp.mean(aux['dice'])
    inter.update(group_logits=group_logits, cols=aux['cols'], detached=aux['detached'],
                 mask_online=aux['online_logits'], mask_teacher=aux['teacher_logits'])

  # Not in the paper (config.loss.group_match_weight, patch_ground_weight; default 0): per-group and per-patch
  # terms against the vocabulary's prompts. The prompts are no batch: text BN in eval mode.
  extra = []
  if config.loss.group_match_weight or config.loss.patch_ground_weight:
    p_ids, p_mask, name_tokens = _match_prompt_arrays(config.data.dataset, int(config.model.text.max_length))
    prompt_txt, _ = call(bs, OVSegmentor.encode_text, jnp.asarray(p_ids), jnp.asarray(p_mask), False)
    present = losses.entity_presence(batch['answer_ids'], jnp.asarray(name_tokens))
  if config.loss.group_match_weight:
    l_match, match_aux = losses.group_match_loss(
        img['image_feat'], prompt_txt['text_x'], present, scale, config.loss.group_match_background_weight,
        _matcher(config, mesh))
    extra.append((config.loss.group_match_weight, l_match))
    metrics.update(loss_group_match=l_match, group_match_acc=match_aux['accuracy'],
                   group_match_bg_acc=match_aux['background_accuracy'])
  if config.loss.patch_ground_weight:
    if 'patch_x' not in img:
      raise ValueError('loss.patch_ground_weight > 0 needs model.patch_head=True (the patch projection head)')
    l_patch, patch_aux = losses.patch_grounding_loss(
        img['patch_x'], img['image_feat'], img['soft'], prompt_txt['text_x'], present, scale,
        config.loss.patch_top_k, config.loss.patch_distill_weight, config.loss.patch_purity_weight)
    extra.append((config.loss.patch_ground_weight, l_patch))
    metrics.update(loss_patch_ground=l_patch, **{f'patch_{k}': v for k, v in patch_aux.items()})
  metrics.update(group_health.binding_health(img))

  total = losses.total_loss(l_contrast, l_entity, l_mask, entity_weight=config.loss.entity_weight,
                            mask_lambda=lam, extra=tuple(extra))
  valid = jnp.maximum(jnp.sum(batch['question_mask']), 1)
  metrics.update(
      loss=total, loss_contrast=l_contrast, loss_entity=l_entity,
      loss_mask=jnp.zeros((), jnp.float32) if l_mask is None else l_mask,
      temperature=1.0 / scale, logit_scale_exp=scale,
      masked_token_frac=jnp.sum(batch['question_ids'] == MASK_ID) / valid)
  if return_intermediates:
    return total, (metrics, bs, inter)
  return total, (metrics, bs)


# ----------------------------------------------------------------------------------------------------------
# The update step.
# ----------------------------------------------------------------------------------------------------------
def mask_phase_start(config: ml_collections.ConfigDict, total_steps: int) -> int:
  """First step whose update needs the mask branch (0: every step; total_steps: none).

  Under the paper_single recipe lambda is 0 before `losses.paper_single_mask_start`, and there the mask
  branch would only cost a teacher forward and a matching whose loss is multiplied by 0 (its one side
  effect, the img_projector / text_projector BN running statistics of the cross images and cross-entity
  prompts, is left out). The trainer runs a step compiled without it until this step.
  """
  if not uses_teacher(config):
    return total_steps
  if config.recipe != 'paper_single':
    return 0
  return min(total_steps, losses.paper_single_mask_start(total_steps, config.loss.mask_start_fraction))


def train_step(state: dict, batch: dict, rng: jax.Array, *, config: ml_collections.ConfigDict,
               model: OVSegmentor, tx: optax.GradientTransformation, schedule: Callable, total_steps: int,
               mesh=None, mask_branch: bool = True) -> tuple[dict, dict]:
  """One optimizer step -> (new state, metrics dict of float32 scalars). Jit it with `jit_train_step`."""
  step = state['step']
  step_rng = jax.random.fold_in(rng, step)
  trainable = optim.trainable_mask(state['params'], tuple(config.optim.frozen))

  teacher = state['ema']
  if mesh is not None and mesh.shape.get('fsdp', 1) > 1:
    # FSDP (ZeRO-3 style): gather the weights once per step for the forward/backward, so activations keep
    # the batch sharding of data parallelism; the gradient is reduce-scattered back to the sharded layout by
    # the out_shardings, and params / AdamW moments / EMA stay sharded between steps. Without this, GSPMD
    # resolves the 'fsdp' conflict between batch-sharded activations and fsdp-sharded weights by resharding
    # activations, which needed more temporary memory than data parallelism (bench/RESULTS.md).
    gather = lambda tree: jax.tree.map(  # noqa: E731
        lambda x: jax.lax.with_sharding_constraint(x, sharding_lib.replicated(mesh)), tree)
    teacher = gather(teacher)
  else:
    gather = lambda tree: tree  # noqa: E731

  has_grad = {}   # filled while the backward pass is traced (optim.gradient_probe)

  def loss_fn(params):
    params = gather(optim.gradient_probe(params, has_grad))
    params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
    return forward_losses(params, state['batch_stats'], teacher, batch, step_rng, step, config=config,
                          model=model, total_steps=total_steps, mesh=mesh, mask_branch=mask_branch)

  (total, (metrics, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  # torch's AdamW skips a parameter without .grad, weight decay included (e.g. BERT's pooler in stage 1).
  updates = optim.skip_without_gradient(updates, has_grad)
  params = optax.apply_updates(state['params'], updates)
  ema = state['ema']
  if uses_teacher(config):
    ema = optax.incremental_update(params['img_encoder'], ema, 1.0 - config.train.ema_momentum)

  new = dict(params=params, batch_stats=new_bs, opt_state=opt_state, ema=ema)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  # Never carry a NaN state: a non-finite step leaves everything but the step counter unchanged (the batch
  # is skipped) and is reported through metrics['finite']; the trainer stops on it.
  new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, {k: state[k] for k in new})
  new['step'] = step + 1
  metrics.update(
      lr=schedule(step), grad_norm=grad_norm, param_norm=optax.tree.norm(params),
      update_norm=optax.tree.norm(updates), finite=finite.astype(jnp.float32))
  metrics = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), metrics)
  return new, metrics


def jit_train_step(config, model, tx, schedule, total_steps: int, mesh, state_shardings,
                   max_traces: int | None = None, mask_branch: bool = True) -> Any:
  """`jit(train_step)`: state donated, state/out shardings fixed, batch over ('data', 'fsdp'), rng and
  metrics replicated. Shapes never change, so it compiles once; `max_traces=n` makes a retrace beyond n
  an error (chex.assert_max_traces). `mask_branch=False`: the step without the mask branch."""
  # Activations keep batch sharding (models/vit.py `constrain_batch`): without the constraints,
  # FSDP-sharded weights pull XLA's propagation onto feature axes and the batch gets replicated (vitb, 64
  # devices, global batch 2048: 93.6 -> 16.4 GiB per device, 1.18 -> 1.01x the analytic FLOPs; bench/RESULTS.md).
  rules = (('batch', tuple(a for a in sharding_lib.BATCH_AXES if a in mesh.shape)),)

  def fn(state, batch, rng):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return train_step(state, batch, rng, config=config, model=model, tx=tx, schedule=schedule,
                        total_steps=total_steps, mesh=mesh, mask_branch=mask_branch)
  if max_traces is not None:
    fn = chex.assert_max_traces(fn, n=max_traces)
  rep = sharding_lib.replicated(mesh)
  return jax.jit(fn, in_shardings=(state_shardings, sharding_lib.batch_sharding(mesh), rep),
                 out_shardings=(state_shardings, rep), donate_argnums=(0,))


def param_count(tree) -> int:
  return int(sum(x.size for x in jax.tree.leaves(tree)))

