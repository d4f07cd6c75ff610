"""Training losses of OVSegmentor (paper Sec. 3.2, Eq. 7-13), as pure functions of arrays.

Everything here follows the official code where it differs from the paper (docs/paper_vs_authors.md Q8-Q17); the
paper variants are options (`cost='neg_cos'`, `dice_norm='mean'`). All losses are computed in float32.

Sharding: the functions take the *global* batch (one logits matrix over all devices, as the official
`dist_collect` all-gather does) and are meant to be called inside the sharded, jitted train step.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from ovseg_jax import matching
from ovseg_jax.normalize import l2_normalize
from ovseg_jax.resize import resize

_HIGHEST = jax.lax.Precision.HIGHEST


# --------------------------------------------------------------------------------------------- InfoNCE

def _cross_entropy_rows(x: jax.Array, y: jax.Array, scale: jax.Array, chunk_size: int) -> jax.Array:
  """mean_i [logsumexp_j(scale x_i.y_j) - scale x_i.y_i] for x, y [B, P] (labels = the diagonal).

  chunk_size > 0 computes the [B, B] logits in row blocks of [chunk_size, B] with `lax.map`; each block is
  wrapped in `jax.checkpoint`, so the backward pass recomputes it too and the peak logits memory is one block
  in both passes instead of B^2 (B = global batch inside a sharded jit).
  """
  b = x.shape[0]
  diag = scale * jnp.sum(x * y, axis=-1)  # [B]: the positive pairs, O(B P)
  if chunk_size <= 0 or chunk_size >= b:
    logits = scale * jnp.einsum('ip,jp->ij', x, y, precision=_HIGHEST)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - diag)

  n_chunks = -(-b // chunk_size)
  pad = n_chunks * chunk_size - b
  # Zero rows pad the last block; their logsumexp is computed and then dropped (it is finite, so harmless).
  xc = jnp.pad(x, ((0, pad), (0, 0))).reshape(n_chunks, chunk_size, x.shape[1])

  @jax.checkpoint
  def block_lse(rows):  # [chunk, P] -> [chunk]
    return jax.nn.logsumexp(scale * jnp.einsum('ip,jp->ij', rows, y, precision=_HIGHEST), axis=-1)

  lse = jax.lax.map(block_lse, xc).reshape(-1)[:b]
  return jnp.mean(lse - diag)


def contrastive_loss(a: jax.Array, b: jax.Array, logit_scale_exp: jax.Array,
                     chunk_size: int = 0) -> jax.Array:
  """Symmetric InfoNCE of the image-caption alignment (paper Eq. 7; docs/paper_vs_authors.md Q11).

  With z^a = a / ||a||, z^b = b / ||b|| and s = logit_scale_exp (the clamped exp(logit_scale), Q8),
  logits_ij = s z^a_i . z^b_j and
      L = 0.5 * (CE(logits, diag) + CE(logits^T, diag)),
  each cross-entropy averaged over the B rows. B is the global batch: negatives are all other samples.

  Args:
    a: [B, P] image embeddings (not necessarily normalised).
    b: [B, P] caption embeddings.
    logit_scale_exp: scalar temperature multiplier s.
    chunk_size: 0 builds the [B, B] logits at once; > 0 computes each cross-entropy in blocks of
      [chunk_size, B] logits (rows for CE_a, then rows of the transposed problem for CE_b), recomputed in the
      backward pass. Same value up to float rounding; twice the matmul FLOPs, peak memory O(chunk_size B).
  Returns:
    scalar loss.
  """
  a = l2_normalize(a.astype(jnp.float32))
  b = l2_normalize(b.astype(jnp.float32))
  s = jnp.asarray(logit_scale_exp, jnp.float32)
  return 0.5 * (_cross_entropy_rows(a, b, s, chunk_size) + _cross_entropy_rows(b, a, s, chunk_size))


def entity_loss(question_out: jax.Array, answer_x: jax.Array, logit_scale_exp: jax.Array,
                chunk_size: int = 0) -> jax.Array:
  """Masked-entity-completion loss (paper Eq. 8-9; docs/paper_vs_authors.md Q9, Q11).

  The same symmetric InfoNCE as `contrastive_loss`, with the same `logit_scale_exp`, between the decoder's
  answer vector z^M (position 0 of the masked caption after the entity decoder, Eq. 8, bridge-projected) and
  the prompted-entity embedding z^E (text_x of the answer "a photo of a {entities}").

  Args:
    question_out: [B, P] bridge_projector(decoder output at position 0).
    answer_x: [B, P] projected [CLS] of the answer text.
    logit_scale_exp: scalar temperature multiplier.
    chunk_size: see `contrastive_loss`.
  Returns:
    scalar loss (Eq. 9).
  """
  return contrastive_loss(question_out, answer_x, logit_scale_exp, chunk_size)


# --------------------------------------------------------------------------------------------- mask loss

def mask_logits(q: jax.Array, k: jax.Array, scale: float | None = None) -> jax.Array:
  """Raw group-patch affinity logits I^T G of Eq. 10 before the sigmoid (official `project_and_mask`).

  Args:
    q: [B, K, C] group queries (AssignAttention q_proj).
    k: [B, L, C] patch keys (AssignAttention k_proj).
    scale: multiplier; None = C^-0.5. The official code hard-codes 768^-0.5, which equals C^-0.5 for ViT-B;
      pass scale=768**-0.5 to reproduce it exactly at another width (it moves the sigmoid threshold).
  Returns:
    [B, K, L] float32 logits.
  """
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return scale * jnp.einsum('bkc,blc->bkl', q.astype(jnp.float32), k.astype(jnp.float32), precision=_HIGHEST)


def upsample_masks(logits: jax.Array, grid: tuple[int, int],
                   upsample_to: tuple[int, int] | None) -> jax.Array:
  """Mask logits from the patch grid to pixels (official: F.interpolate bilinear, align_corners=True).

  Kept as its own step so that it can be optimised alone. The Dice cannot simply move to patch resolution:
  the min-max normalisation, the sigmoid threshold and the pixel counts act on the upsampled values, and
  14 -> 224 with align_corners=True samples no interior patch centre exactly (13 and 223 are coprime), so
  even the per-mask max differs. The matching cost is different: cosines of upsampled maps are bilinear
  forms a^T (G_h (x) G_w) b with G = R^T R of the [224, 14] interpolation matrices, so they could be
  computed exactly at 14 x 14 (not done: equal only up to float rounding, which can flip near-ties).

  Args:
    logits: [B, K, L] with L = h * w (row-major patches).
    grid: (h, w).
    upsample_to: (H, W) or None (stay at h x w).
  Returns:
    [B, K, H * W] float32.
  """
  h, w = grid
  bsz, k, l = logits.shape
  if h * w != l:
    raise ValueError(f'grid {grid} does not match the {l} patches of the mask logits [B, K, L]={logits.shape}')
  maps = logits.reshape(bsz, k, h, w)
  if upsample_to is not None:
    maps = resize(maps, tuple(upsample_to), 'bilinear', align_corners=True, spatial_axes=(-2, -1))
  return maps.reshape(bsz, k, -1)


def detached_groups(group_logits: jax.Array, group_ratio: float) -> jax.Array:
  """Groups whose online masks receive no gradient (docs/paper_vs_authors.md Q13).

  The int(K * group_ratio) groups with the smallest entity similarity are detached (torch
  `topk(largest=False)`); ties go to the lower index. The paper's r (Eq. 10 text) selects the K' = rK most
  similar groups; both readings coincide at the official r = 0.5.

  Args:
    group_logits: [B, K] online group embeddings . entity embedding (unnormalised), no gradient.
    group_ratio: r.
  Returns:
    bool [B, K], True = detached.
  """
  k = group_logits.shape[-1]
  n = int(k * group_ratio)
  if n <= 0:
    return jnp.zeros(group_logits.shape, bool)
  _, idx = jax.lax.top_k(-jax.lax.stop_gradient(group_logits), n)
  return jnp.any(idx[..., :, None] == jnp.arange(k), axis=-2)


def mask_matching_cost(online: jax.Array, teacher: jax.Array, cost: str = 'l2') -> jax.Array:
  """Hungarian cost between per-mask L2-normalised maps (official HungarianMatcher; paper Eq. 11).

  Args:
    online: [B, K, N] online mask logits (flattened pixels).
    teacher: [B, K, N] teacher mask logits.
    cost: 'l2' = torch.cdist(p=2) of the normalised maps = sqrt(2 - 2 cos) (official);
      'neg_cos' = -cos (paper Eq. 11). Their optimal permutations can differ.
  Returns:
    [B, K, K] cost, cost[b, i, j] between online mask i and teacher mask j (no gradient).
  """
  a = l2_normalize(jax.lax.stop_gradient(online))
  b = l2_normalize(jax.lax.stop_gradient(teacher))
  cos = jnp.einsum('bin,bjn->bij', a, b, precision=_HIGHEST)
  if cost == 'neg_cos':
    return -cos
  if cost == 'l2':
    # Squared distance via the norms (as torch.cdist's matmul path), clamped at 0 against rounding.
    sq_a = jnp.sum(jnp.square(a), -1)[..., :, None]
    sq_b = jnp.sum(jnp.square(b), -1)[..., None, :]
    return jnp.sqrt(jnp.maximum(sq_a + sq_b - 2.0 * cos, 0.0))
  raise ValueError(f"unknown mask matching cost {cost!r}; expected 'l2' (official) or 'neg_cos' (paper)")


def _min_max(x: jax.Array) -> jax.Array:
  """(x - min) / (max - min) over the last axis (official, no eps).

  Guard: a constant map (max == min) divides by 1 instead of 0, giving 0 where the official code gives NaN.
  Every map with max > min takes the official branch unchanged, so all finite results are identical.
  """
  lo = jnp.min(x, axis=-1, keepdims=True)
  hi = jnp.max(x, axis=-1, keepdims=True)
  span = hi - lo
  return (x - lo) / jnp.where(span > 0, span, 1.0)


def dice_per_sample(student: jax.Array, target: jax.Array) -> jax.Array:
  """Dice loss per sample, pooled over all K masks and pixels (official `dice_loss`, paper Eq. 12's D).

  dice_b = 1 - (2 sum s t + 1) / (sum s + sum t + 1), sums over K x N.

  Args:
    student: [B, K, N] in [0, 1].
    target: [B, K, N] in {0, 1}.
  Returns:
    [B].
  """
  s = student.reshape(student.shape[0], -1)
  t = target.reshape(target.shape[0], -1)
  return 1.0 - (2.0 * jnp.sum(s * t, -1) + 1.0) / (jnp.sum(s, -1) + jnp.sum(t, -1) + 1.0)


def _resolve_matcher(matcher: str | Callable[[jax.Array], jax.Array]) -> Callable[[jax.Array], jax.Array]:
  if callable(matcher):
    return matcher
  if matcher not in ('dp', 'scipy'):
    raise ValueError(f"matcher={matcher!r}: expected 'dp', 'scipy' or a callable cost [B,K,K] -> cols [B,K]")
  return functools.partial(matching.assign, method=matcher)


def mask_loss_from_logits(online_logits: jax.Array, teacher_logits: jax.Array, grid: tuple[int, int],
                          group_logits: jax.Array, *, upsample_to: tuple[int, int] | None = (224, 224),
                          cost: str = 'l2', dice_norm: str = 'official', threshold: float = 0.6,
                          group_ratio: float = 0.5, matcher: str | Callable = 'dp',
                          per_device_batch: int | None = None) -> tuple[jax.Array, dict]:
  """Cross-image mask consistency loss from raw mask logits (paper Eq. 10-12; official `mask_loss`).

  The authors' recipe (paper Eq. 10-12; docs/paper_vs_authors.md Q12-Q15):
    1. M1 = online logits, M2 = teacher logits (stop_gradient), bilinearly upsampled (align_corners=True).
    2. The int(K * group_ratio) groups with the smallest `group_logits` get stop_gradient on their M1 maps;
       all K masks still take part in the matching and in the loss value.
    3. Matching (Eq. 11) on per-mask L2-normalised maps, `cost` = 'l2' (cdist) or 'neg_cos'; M2 is reordered
       so that M1[i] faces M2[cols[i]].
    4. Target = sigmoid(M2) >= threshold * max_pixels sigmoid(M2) (the binarised sg(m) of Eq. 12);
       student = per-mask min-max normalised M1 (no sigmoid).
    5. dice_b pooled over the K masks and pixels (`dice_per_sample`);
       'official': sum_b dice_b / K over the per-device batch, i.e. mean_b(dice_b) * per_device_batch / K;
       'mean': mean_b dice_b.

  Data parallelism: the official loss is computed per GPU (sum over its batch / K) and DDP averages the
  GPUs, which equals mean_b(dice_b) * per_device_batch / K over the global batch. Inside a global-batch
  JAX step pass the official per-device batch as `per_device_batch` to reproduce that value (and scale);
  None uses the batch B this function sees (= sum_b dice_b / K, the single-device official value).

  Args:
    online_logits: [B, K, L] online q . teacher k (of the cross image), L = h * w.
    teacher_logits: [B, K, L] teacher q . teacher k.
    grid: (h, w) patch grid.
    group_logits: [B, K] similarity of each online group to the shared entity (no gradient).
    upsample_to: (H, W) pixel size of the masks, or None for patch resolution.
    cost, dice_norm, threshold, group_ratio: see above (config.loss.mask_cost, dice_norm, cross_threshold,
      group_ratio).
    matcher: 'dp' | 'scipy' (`matching.assign`), or a callable cost [B, K, K] -> cols [B, K] int32, e.g.
      functools.partial(matching.assign_sharded, mesh=mesh, batch_axes='data') in a sharded step.
    per_device_batch: see above; only used by dice_norm='official'.
  Returns:
    (loss scalar, aux) with aux = {'cols' [B, K] int32, 'detached' [B, K] bool, 'dice' [B],
    'cost' [B, K, K], 'online_logits' [B, K, L], 'teacher_logits' [B, K, L]}.
  """
  if dice_norm not in ('official', 'mean'):
    raise ValueError(f"dice_norm={dice_norm!r}: expected 'official' (sum_b / K) or 'mean'")
  if cost not in ('l2', 'neg_cos'):
    raise ValueError(f"unknown mask matching cost {cost!r}; expected 'l2' (official) or 'neg_cos' (paper)")
  assign = _resolve_matcher(matcher)
  online_logits = online_logits.astype(jnp.float32)
  teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
  bsz, k, _ = online_logits.shape

  detached = detached_groups(group_logits, group_ratio)
  # Detaching before the (linear) upsampling is the same as after it, on 256x fewer values.
  m1 = jnp.where(detached[..., None], jax.lax.stop_gradient(online_logits), online_logits)
  m1 = upsample_masks(m1, grid, upsample_to)                  # [B, K, N]
  m2 = upsample_masks(teacher_logits, grid, upsample_to)      # [B, K, N]

  cost_matrix = mask_matching_cost(m1, m2, cost)             # [B, K, K]
  cols = assign(cost_matrix).astype(jnp.int32)
  m2 = jnp.take_along_axis(m2, cols[..., None], axis=1)

  p2 = jax.nn.sigmoid(m2)
  target = (p2 >= threshold * jnp.max(p2, axis=-1, keepdims=True)).astype(jnp.float32)
  dice = dice_per_sample(_min_max(m1), target)               # [B]

  if dice_norm == 'official':
    n = bsz if per_device_batch is None else per_device_batch
    loss = jnp.mean(dice) * (n / k)
  else:
    loss = jnp.mean(dice)
  aux = dict(cols=cols, detached=detached, dice=dice, cost=cost_matrix,
             online_logits=online_logits, teacher_logits=teacher_logits)
  return loss, aux


def mask_consistency_loss(online_q: jax.Array, teacher_q: jax.Array, teacher_k: jax.Array,
                          grid: tuple[int, int], group_logits: jax.Array, *,
                          upsample_to: tuple[int, int] | None = (224, 224), cost: str = 'l2',
                          dice_norm: str = 'official', threshold: float = 0.6, group_ratio: float = 0.5,
                          matcher: str | Callable = 'dp', per_device_batch: int | None = None,
                          logit_scale: float | None = None) -> tuple[jax.Array, dict]:
  """Cross-image mask consistency loss (paper Eq. 10-12) from the online and EMA-teacher q / k.

  M1 = online_q . teacher_k^T * C^-0.5 (online groups of I on the teacher patches of I'),
  M2 = teacher_q . teacher_k^T * C^-0.5 (teacher groups of I' on its own patches); everything from the
  teacher and `group_logits` is stop_gradient. Then `mask_loss_from_logits`.

  Args:
    online_q: [B, K, C] online AssignAttention q of image I.
    teacher_q: [B, K, C] teacher q of the cross image I'.
    teacher_k: [B, L, C] teacher k of I', L = h * w.
    grid: (h, w).
    group_logits: [B, K] online projected group embeddings . projected entity prompt (unnormalised).
    logit_scale: see `mask_logits` (None = C^-0.5).
    Others: see `mask_loss_from_logits`.
  Returns:
    (loss, aux) as `mask_loss_from_logits`.
  """
  teacher_q = jax.lax.stop_gradient(teacher_q)
  teacher_k = jax.lax.stop_gradient(teacher_k)
  online_logits = mask_logits(online_q, teacher_k, logit_scale)
  teacher_logits = mask_logits(teacher_q, teacher_k, logit_scale)
  return mask_loss_from_logits(
      online_logits, teacher_logits, grid, group_logits, upsample_to=upsample_to, cost=cost,
      dice_norm=dice_norm, threshold=threshold, group_ratio=group_ratio, matcher=matcher,
      per_device_batch=per_device_batch)


# ------------------------------------------------------------------------------- per-group matching

def entity_presence(answer_ids: jax.Array, entity_tokens: jax.Array) -> jax.Array:
  """Which vocabulary entities an example's prompted-entity answer h(E) names (whole-token match).

  Args:
    answer_ids: int [B, T] token ids of the answer ("a photo of a circle and star"), which lists every entity
      the caption names (`EntityExtractor.mask`).
    entity_tokens: int [V, M] wordpiece ids of each entity name, right-padded with -1.
  Returns:
    bool [B, V]: entity v's token sequence occurs somewhere in answer b.
  """
  t, m = answer_ids.shape[1], entity_tokens.shape[1]
  ids = jnp.pad(answer_ids, ((0, 0), (0, m)), constant_values=-2)         # windows may run past the end
  windows = jnp.stack([ids[:, j:j + t] for j in range(m)], axis=-1)      # [B, T, M]: tokens p .. p+M-1
  hit = (windows[:, :, None, :] == entity_tokens[None, None]) | (entity_tokens[None, None] < 0)
  return jnp.any(jnp.all(hit, axis=-1), axis=1)


def group_match_loss(group_x: jax.Array, prompt_x: jax.Array, present: jax.Array, logit_scale_exp: jax.Array,
                     background_weight: float = 1.0,
                     matcher: str | Callable[[jax.Array], jax.Array] = 'dp') -> tuple[jax.Array, dict]:
  """Exclusive group <-> entity matching (not in the paper; config.loss.group_match_weight).

  Eq. 7-9 supervise only the mean of the K groups, yet Eq. 1 classifies each group on its own. Classifying
  every entity's best group (no exclusivity) was met by writing the caption into any group (bench/RESULTS.md
  "A per-group signal from the captions"). Here the caption's entities are matched one-to-one to groups, and
  every other group must be background, so one group per named object has to carry it:
      P_bk   = softmax_v(s z_bk . t_v),  v over the V entity prompts and the background prompt t_bg
      sigma  = argmin over one-to-one maps entity e -> group k of sum_e -log P_{b sigma(e)}[e]   (Hungarian)
      y_bk   = e if k = sigma(e), else bg
      L      = mean_{matched} -log P_bk[y_bk] + background_weight * mean_{unmatched} -log P_bk[bg]

  Args:
    group_x: [B, K, P] projected group embeddings (image_feat).
    prompt_x: [V + 1, P] projected prompt embeddings: the V vocabulary entities, then the background prompt.
    present: bool [B, V] entities the caption names (`entity_presence`); at most K per image are matched.
    logit_scale_exp: scalar s (the shared, clamped temperature of Eq. 7).
    background_weight: weight of the unmatched groups' background term.
    matcher: 'dp' | 'scipy' | a callable [B, K, K] cost -> [B, K] cols (matching.assign).
  Returns:
    (scalar loss, dict(accuracy: matched groups whose argmax is their entity, background_accuracy: unmatched
    groups whose argmax is background)).
  """
  b, k, _ = group_x.shape
  v = prompt_x.shape[0] - 1
  zg = l2_normalize(group_x.astype(jnp.float32))
  zt = l2_normalize(prompt_x.astype(jnp.float32))
  logits = jnp.asarray(logit_scale_exp, jnp.float32) * jnp.einsum('bkp,vp->bkv', zg, zt, precision=_HIGHEST)
  logp = jax.nn.log_softmax(logits, axis=-1)                               # [B, K, V + 1]
  # The caption's entities first (stable order), padded to K columns: entity index and validity per column.
  order = jnp.argsort(~present, axis=1, stable=True)
  if v < k:
    order = jnp.pad(order, ((0, 0), (0, k - v)))
  cols_entity = order[:, :k]                                                  # [B, K]
  cols_valid = jnp.arange(k)[None, :] < jnp.sum(present, axis=1, keepdims=True)   # [B, K]
  # cost[b, group, column] = -log P[b, group, entity of column]; a padding column costs 0 for every group.
  cost = -jnp.take_along_axis(logp, jnp.broadcast_to(cols_entity[:, None, :], (b, k, k)), axis=2)
  cost = jnp.where(cols_valid[:, None, :], cost, 0.0)
  match = _resolve_matcher(matcher)(jax.lax.stop_gradient(cost))           # [B, K]: group -> column
  matched = jnp.take_along_axis(cols_valid, match, axis=1)                 # [B, K] bool
  target = jnp.where(matched, jnp.take_along_axis(cols_entity, match, axis=1), v)
  nll = -jnp.take_along_axis(logp, target[..., None], axis=2)[..., 0]      # [B, K]
  w_obj = matched.astype(jnp.float32)
  w_bg = 1.0 - w_obj
  loss = (jnp.sum(w_obj * nll) / jnp.maximum(jnp.sum(w_obj), 1.0)
          + background_weight * jnp.sum(w_bg * nll) / jnp.maximum(jnp.sum(w_bg), 1.0))
  correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
  aux = {'accuracy': jnp.sum(w_obj * correct) / jnp.maximum(jnp.sum(w_obj), 1.0),
         'background_accuracy': jnp.sum(w_bg * correct) / jnp.maximum(jnp.sum(w_bg), 1.0)}
  return loss, aux


# ------------------------------------------------------------------------------- patch-level grounding

def patch_grounding_loss(patch_x: jax.Array, group_x: jax.Array, soft: jax.Array, prompt_x: jax.Array,
                         present: jax.Array, logit_scale_exp: jax.Array, top_k: int = 4,
                         distill_weight: float = 1.0, purity_weight: float = 1.0) -> tuple[jax.Array, dict]:
  """Patch-level grounding from the caption's entities (not in the paper; config.loss.patch_ground_weight).

  Eq. 7-9 never say which patches an entity is; Eq. 1 needs exactly that. Each patch is classified among the
  V entity prompts and a background prompt, weakly supervised by which entities the caption names (multiple
  instance learning: an entity the caption names is some patches, an entity it does not name is none), and the
  groups and their assignment are trained from those patch classes:
      p_bl   = softmax_v(s z_bl . t_v)                         [B, L, V + 1]  patch classes
      y_bv   = mean of the top_k largest p_blv over l          image-level score of class v
      L_mil  = BCE(y_bv, [v named by the caption]); the background counts as always present
      c_bk   = sum_l A_bkl sg(p_bl) / sum_l A_bkl               the class mix of group k's patches (A: Eq. 4)
      L_dist = sum_k (sum_l A_bkl / L) CE(sg(c_bk), softmax_v(s z_bk . t_v))   each group, its own patches
      L_pur  = mean_bl sum_k A_bkl CE(sg(p_bl), c_bk)          Eq. 4 groups patches of one class together
      L      = L_mil + distill_weight L_dist + purity_weight L_pur
  A group's target comes from its own patches, so it cannot be met by writing the caption into every group.

  Args:
    patch_x: [B, L, P] projected stage-1 patch tokens (model.patch_head).
    group_x: [B, K, P] projected group embeddings (image_feat).
    soft: [B, K, L] the soft assignment of Eq. 4 (softmax over the groups).
    prompt_x: [V + 1, P] projected prompts: the V vocabulary entities, then the background prompt.
    present: bool [B, V] entities the caption names (`entity_presence`).
    logit_scale_exp: scalar s (the shared, clamped temperature of Eq. 7).
  Returns:
    (scalar loss, dict(mil, distill, purity, foreground_share: patches whose argmax is an entity,
    group_agreement: groups whose argmax class is their patches' majority class, weighted by size)).
  """
  b, num_patches, _ = patch_x.shape
  scale = jnp.asarray(logit_scale_exp, jnp.float32)
  zt = l2_normalize(prompt_x.astype(jnp.float32))
  patch_logits = scale * jnp.einsum('blp,vp->blv', l2_normalize(patch_x.astype(jnp.float32)), zt,
                                    precision=_HIGHEST)
  p = jax.nn.softmax(patch_logits, axis=-1)                                 # [B, L, V + 1]
  top = jax.lax.top_k(jnp.swapaxes(p, 1, 2), min(top_k, num_patches))[0]    # [B, V + 1, k]
  score = jnp.clip(jnp.mean(top, axis=-1), 1e-6, 1.0 - 1e-6)
  target = jnp.concatenate([present.astype(jnp.float32), jnp.ones((b, 1), jnp.float32)], axis=1)
  mil = -jnp.mean(target * jnp.log(score) + (1.0 - target) * jnp.log1p(-score))

  a = soft.astype(jnp.float32)
  p_sg = jax.lax.stop_gradient(p)
  mass = jnp.sum(a, axis=-1)                                                 # [B, K]
  mix = jnp.einsum('bkl,blv->bkv', a, p_sg, precision=_HIGHEST) / (mass[..., None] + 1e-6)
  group_logits = scale * jnp.einsum('bkp,vp->bkv', l2_normalize(group_x.astype(jnp.float32)), zt,
                                    precision=_HIGHEST)
  group_logp = jax.nn.log_softmax(group_logits, axis=-1)
  share = jax.lax.stop_gradient(mass) / num_patches                          # [B, K], sums to 1 per image
  distill = -jnp.sum(share * jnp.sum(jax.lax.stop_gradient(mix) * group_logp, axis=-1)) / b
  patch_vs_group = -jnp.einsum('blv,bkv->bkl', p_sg, jnp.log(mix + 1e-6), precision=_HIGHEST)
  purity = jnp.sum(a * patch_vs_group) / (b * num_patches)

  loss = mil + distill_weight * distill + purity_weight * purity
  v = prompt_x.shape[0] - 1
  agree = (jnp.argmax(group_logits, -1) == jnp.argmax(mix, -1)).astype(jnp.float32)
  aux = {'mil': mil, 'distill': distill, 'purity': purity,
         'foreground_share': jnp.mean((jnp.argmax(p, -1) < v).astype(jnp.float32)),
         'group_agreement': jnp.sum(share * agree) / b}
  return loss, aux


# --------------------------------------------------------------------------------------------- total

def paper_single_mask_start(total_steps: int, mask_start_fraction: float) -> int:
  """First step with lambda > 0 under 'paper_single': ceil(mask_start_fraction * total_steps)."""
  return int(math.ceil(mask_start_fraction * total_steps))


def mask_loss_weight(step: jax.Array | int, total_steps: int, recipe: str, mask_weight: float,
                     mask_start_fraction: float, stage: int = 1) -> jax.Array:
  """lambda of Eq. 13 at `step`.

  'paper_single' (paper Sec. 4.1): 0 while step < mask_start_fraction * total_steps, then mask_weight.
  'two_stage' (official): mask_weight in stage 2, 0 in stage 1 (the caller passes its stage).

  Args:
    step: current optimizer step (int or traced scalar).
    total_steps: steps of the run.
    recipe: 'paper_single' | 'two_stage' (config.recipe).
    mask_weight: config.loss.mask_weight.
    mask_start_fraction: config.loss.mask_start_fraction.
    stage: config.stage (two_stage only).
  Returns:
    float32 scalar.
  """
  if recipe == 'paper_single':
    start = paper_single_mask_start(total_steps, mask_start_fraction)
    return jnp.where(jnp.asarray(step) >= start, jnp.float32(mask_weight), jnp.float32(0.0))
  if recipe == 'two_stage':
    if stage not in (1, 2):
      raise ValueError(f'stage={stage}: expected 1 or 2')
    return jnp.float32(mask_weight if stage == 2 else 0.0)
  raise ValueError(f"recipe={recipe!r}: expected 'two_stage' or 'paper_single'")


def total_loss(contrast: jax.Array, entity: jax.Array, mask: jax.Array | None, *,
               entity_weight: float = 1.0, mask_lambda: jax.Array | float = 0.0,
               extra: tuple[tuple[float, jax.Array], ...] = ()) -> jax.Array:
  """L_total = L_contrast + entity_weight * L_entity + lambda * L_mask (paper Eq. 13; official L705-710)
  + sum of weight * L over `extra`, the (weight, loss) pairs of the terms not in the paper
  (`group_match_loss`, `patch_grounding_loss`).

  `mask=None` (no teacher in stage 1) drops the term; otherwise it is added as lambda * L_mask even when
  lambda is 0 (so a NaN in L_mask is not hidden).
  """
  total = contrast + entity_weight * entity
  if mask is not None:
    total = total + mask_lambda * mask
  for weight, term in extra:
    total = total + weight * term
  return total
