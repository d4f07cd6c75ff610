"""What did a tiny run learn? Image-level and group-level zero-shot recognition on synthetic images.

  python -m bench.e2e_diagnose --checkpoint runs/local/export                 # held-out split (seed 1)
  python -m bench.e2e_diagnose --checkpoint runs/local/export --split train    # i.i.d. images (seed 1)

For `--num_images` synthetic images rendered at the model's training size, with the class embeddings of
`Segmenter.text_embedding(SHAPES)` (the evaluation prompts):
  * image-level recall: the share of an image's classes among its top-|classes| by cos(image_x, class);
  * group-level accuracy: for each output group whose hard-assigned patches are mostly one object class, whether
    its best class by cos(group, class) is that class.
Chance is about 0.33 and 0.17. mIoU needs both high, plus a clean background/foreground split.

It also splits the mIoU loss by stage (pixels at the training size, ignore band excluded):
  * `model`: Eq. 1 with the background threshold (`eval.bg_threshold`), as evaluate does per window;
  * `oracle groups`: every group labelled with the majority ground truth of its pixels (the grouping's ceiling);
  * `oracle fg`: groups whose majority is background stay background, the others take the model's best class;
  * `patch ceiling`: every patch labelled with its majority ground truth (the resolution's ceiling);
  * `k-means keys`: the binding's patch keys (`k`, what Eq. 4 compares with the group queries) clustered
    per image by cosine k-means into K_out clusters, each labelled with its majority ground truth. It is the
    partition the encoder's features allow with as many groups: far above `oracle groups` means the encoder
    separates the objects and the learned assignment does not use it;
  * `patch head` (models with `model.patch_head`): every patch labelled by its own projected token's best row
    among the background prompt and the classes (what `loss.patch_ground_weight` trains).
It also counts the distinct assignment queries per image (`distinct_directions` of the K_out q vectors), and
prints the binding's health signals (ovseg_jax/group_health.py: token / query cosine, groups used, assignment
entropy) on the same images, as the train log shows them.
With `--eval.background=prompt` the `model` stage reads the background prompt instead of the threshold,
lowered by `eval.bg_prompt_margin` as evaluate does.
"""

import sys

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli
from ovseg_jax import group_health
from ovseg_jax import inference
from ovseg_jax.data import augment
from ovseg_jax.data import synthetic
from ovseg_jax.models.ovsegmentor import OVSegmentor


def unit(x: np.ndarray) -> np.ndarray:
  x = np.array(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def majority(labels: np.ndarray) -> int | None:
  """Most frequent label among the non-ignore pixels (0 = background), None when there are none."""
  labels = labels[labels != synthetic.IGNORE]
  return int(np.bincount(labels, minlength=len(synthetic.SHAPES) + 1).argmax()) if labels.size else None


_SAME_DIRECTION = 0.99


def distinct_directions(vectors: np.ndarray, same: float = _SAME_DIRECTION) -> int:
  """How many directions vectors [K, C] span: greedy clusters of cosine >= `same` to a cluster's first member.

  On the binding's assignment queries q this counts the groups Eq. 4 can tell apart: collapsed queries
  (cos ~1) tie for every patch, and argmax then gives the patch to the first of them.
  """
  leaders = []
  for v in unit(vectors):
    if not any(float(v @ l) >= same for l in leaders):
      leaders.append(v)
  return len(leaders)


def kmeans_partition(features: np.ndarray, k: int, iters: int = 20, seed: int = 0) -> np.ndarray:
  """Cosine k-means of features [L, C] -> cluster index [L] (k-means++ seeding, deterministic in `seed`)."""
  x = unit(features)
  rng = np.random.default_rng(seed)
  centres = [x[rng.integers(len(x))]]
  for _ in range(1, k):
    dist = np.maximum(1.0 - np.max(x @ np.stack(centres).T, axis=1), 0.0)
    if dist.sum() <= 0:  # fewer distinct features than clusters
      break
    centres.append(x[rng.choice(len(x), p=dist / dist.sum())])
  centres = np.stack(centres)
  for _ in range(iters):
    owner = np.argmax(x @ centres.T, axis=1)
    for j in range(len(centres)):
      if np.any(owner == j):
        centres[j] = unit(x[owner == j].mean(0))
  return np.argmax(x @ centres.T, axis=1)


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint (export / convert)', flag_values=fv)
  flags.DEFINE_string('split', 'val', "synthetic split: 'val' (held-out) or 'train' (i.i.d.)", flag_values=fv)
  flags.DEFINE_integer('seed', 1, 'synthetic image seed', flag_values=fv)
  flags.DEFINE_integer('num_images', 100, 'images to render', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m bench.e2e_diagnose', doc=__doc__, required=('checkpoint',),
                eval_settings=True)
  seg = inference.Segmenter.from_checkpoint(a.checkpoint, **a.eval)
  size, patch = int(seg.model_config.vision.img_size), seg.patch_size
  grid = size // patch
  classes = unit(seg.text_embedding(synthetic.SHAPES))
  bg_prompt = np.asarray(seg.text_embedding((inference.BACKGROUND,)), np.float32)
  background = bg_prompt if seg.eval_config.background == 'prompt' else None
  patch_head = bool(seg.model_config.patch_head)
  recall, hits, groups = [], 0, 0
  n_cls = len(synthetic.SHAPES) + 1
  stages = ('model', 'oracle groups', 'oracle fg', 'patch ceiling', 'k-means keys') + (
      ('patch head',) if patch_head else ())
  cms = {k: np.zeros((n_cls, n_cls), np.int64) for k in stages}
  used, distinct, health = [], [], []
  scale = seg.model.apply(seg.variables, method=OVSegmentor.logit_scale_exp)
  for i in range(a.num_images):
    ex = synthetic.make_example(a.seed, a.split, i, 64, 96)
    x = augment.normalize(Image.fromarray(ex['image']).resize((size, size), Image.BILINEAR))[None]
    out = seg.model.apply(seg.variables, x, train=False, method=OVSegmentor.encode_image)
    health.append({k: float(v) for k, v in group_health.binding_health(out).items()})
    present = {synthetic.SHAPES.index(o[0]) for o in ex['objects']}
    top = np.argsort(-(classes @ unit(out['image_x'][0])))[:len(present)]
    recall.append(len(present & set(top.tolist())) / len(present))
    zg = unit(out['image_feat'][0])
    distinct.append(distinct_directions(np.asarray(out['q'][0])))
    owner = np.asarray(out['soft'][0]).argmax(0).reshape(grid, grid)
    label = np.asarray(Image.fromarray(ex['label']).resize((grid, grid), Image.NEAREST))
    for k in range(zg.shape[0]):
      major = majority(label[owner == k])
      if major:
        groups += 1
        hits += int(np.argmax(classes @ zg[k]) + 1 == major)
    _score_stages(cms, used, ex['label'], out, zg, classes, scale, size, patch,
                  float(seg.eval_config.bg_threshold), background, unit(bg_prompt[0]) if patch_head else None,
                  float(seg.eval_config.get('bg_prompt_margin', 0.0)))
  off = (classes @ classes.T)[~np.eye(len(classes), dtype=bool)].mean()
  print(f'{a.split} seed {a.seed}, {a.num_images} images: image-level recall {np.mean(recall):.3f}, '
        f'group-level accuracy {hits / max(groups, 1):.3f} over {groups} object groups, '
        f'mean cos between class embeddings {off:.3f}')
  print(f'distinct assignment queries per image (cos < {_SAME_DIRECTION}) {np.mean(distinct):.2f} of '
        f'{seg.model_config.binding.num_output_groups}')
  print('health: ' + ', '.join(f'{k} {np.mean([h[k] for h in health]):.3f}' for k in group_health.HEALTH_KEYS))
  print(f'groups used per image {np.mean(used):.2f}; mIoU by stage (per class: background, {", ".join(synthetic.SHAPES)}):')
  for name, cm in cms.items():
    iou = np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1) - np.diag(cm), 1)
    print(f'  {name:14s} {100 * iou.mean():5.1f}  {np.round(100 * iou, 1).tolist()}')


def _score_stages(cms, used, label, out, zg, classes, scale, size, patch, bg_threshold, background=None,
                  patch_background=None, bg_margin=0.0):
  """Adds one image to the confusion matrices of the module docstring (zg: unit group embeddings;
  background: the [1, P] background prompt embedding for eval.background='prompt', else None, and bg_margin
  its eval.bg_prompt_margin;
  patch_background: the unit [P] background prompt for the 'patch head' stage, None without model.patch_head)."""
  grid = size // patch
  lab = np.asarray(Image.fromarray(label).resize((size, size), Image.NEAREST)).astype(np.int64)
  valid = lab != synthetic.IGNORE
  owner = np.kron(np.asarray(out['soft'][0]).argmax(0).reshape(grid, grid), np.ones((patch, patch), int))
  used.append(len(np.unique(owner)))
  prompt_bg = background is not None   # the background prompt is text row 0, else Eq. 1's threshold
  text = np.asarray(classes, np.float32)
  logits = inference.eq1_logits(out['soft'], (grid, grid), out['image_feat'], out['image_x'],
                                np.concatenate([background, text]) if prompt_bg else text, scale, (size, size),
                                bg_threshold=None if prompt_bg else bg_threshold, background_row=prompt_bg,
                                background_margin=bg_margin)
  major = np.array([majority(lab[owner == g]) or 0 for g in range(zg.shape[0])])
  best = np.argmax(zg @ classes.T, axis=1) + 1
  blocks = lab.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid, grid, -1)
  patch_major = np.array([[majority(b) or 0 for b in row] for row in blocks])
  clusters = kmeans_partition(np.asarray(out['k'][0]), zg.shape[0]).reshape(grid, grid)
  clusters = np.kron(clusters, np.ones((patch, patch), int))
  cluster_major = np.array([majority(lab[clusters == j]) or 0 for j in range(zg.shape[0])])
  preds = {'model': np.asarray(logits[0]).argmax(0), 'oracle groups': major[owner],
           'oracle fg': np.where(major[owner] > 0, best[owner], 0),
           'patch ceiling': np.kron(patch_major, np.ones((patch, patch), int)),
           'k-means keys': cluster_major[clusters]}
  if patch_background is not None:   # each patch's own class among the background prompt and the classes
    rows = np.concatenate([patch_background[None], classes])
    patch_cls = np.argmax(unit(np.asarray(out['patch_x'][0])) @ rows.T, axis=1).reshape(grid, grid)
    preds['patch head'] = np.kron(patch_cls, np.ones((patch, patch), int))
  for name, pred in preds.items():
    np.add.at(cms[name], (lab[valid], pred[valid]), 1)


if __name__ == '__main__':
  sys.exit(main())
