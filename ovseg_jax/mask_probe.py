r"""Mask probing: how well the group masks cover the ground-truth objects, whatever the class (paper Table 11).

  python -m ovseg_jax.mask_probe --checkpoint DIR --dataset voc --data_dir VOCdevkit/VOC2012 \
      --output probe.json [--max_images N] [--binarize argmax|mass] [--mass 0.6] [--include_background] \
      [--eval.short_side=448]

The paper (appendix, "Mask Probing"), after DINO and GroupViT: "For grouping-based methods GroupViT [52] and
our proposed OVSegmentor, the pixel-to-group affinity A in R^{HW x K} is considered as the attention masks.
We directly choose one of the K groups that has the highest Jaccard similarity to the ground-truth mask."
For the ViTs: "The Jaccard similarity is computed between the attention mask for each head and the
ground-truth mask, and the one with the highest similarity is taken as the mask probing result." The
averaging is DINO's (facebookresearch/dino issue 54; GroupViT issue 34 says GroupViT's is "the same as
DINO"). For each ground-truth object, take the best Jaccard over the heads (here: groups). Average over the
image's objects, then over the images. In symbols, with G_o the mask of object o of image n, O_n its objects
and M_k the binary mask of group k:

    J(M, G)     = |M & G| / |M | G|            (ignored pixels (255, no class) count in neither)
    probe(n)    = 1/|O_n| sum_{o in O_n} max_k J(M_k, G_o)
    mask probe  = 100 * mean over the images with at least one object of probe(n)

Choices where the paper is silent, stated here:
  * The objects are the distinct labels of the ground-truth map: one mask per class present, as in VOC's
    SegmentationClass. Background (label 0 of a dataset with a background class) and ignore (255) are not
    objects; `--include_background` makes the background one.
  * A [K, H, W] is the soft pixel->group assignment of the model's final grouping, the `soft` map of
    `encode_image` (the map Eq. 1 uses), on the whole image resized to short side `eval.short_side` (no
    sliding windows: the groups of different windows are not the same groups), each side rounded to a
    multiple of two patches (`network_size`). It is resized bilinearly to the ground truth's size, as GroupViT
    resizes its attention maps.
  * Binary group masks: `argmax` (default) gives pixel x to group argmax_k A[k, x], the hard assignment the
    segmentation uses. The paper's "directly choose" for groups reads as no further thresholding. `mass`
    binarises each group's map as DINO does its heads: keep the largest values that hold `mass` (0.6) of
    the map's total.

Paper Table 12 (per-class IoU on VOC) is the per-class table `python -m ovseg_jax.evaluate --dataset voc`
prints and writes (`per_class`).
"""

import functools
import json
import os
import sys
import time

from absl import flags
import jax
import numpy as np

from ovseg_jax import cli
from ovseg_jax import eval_datasets
from ovseg_jax import resize as resize_lib

IGNORE_LABEL = 255
BINARIZE = ('argmax', 'mass')


# ------------------------------------------------------------------------------------------------------------
# The measure, on arrays.
# ------------------------------------------------------------------------------------------------------------

def binarize(affinity: np.ndarray, mode: str = 'argmax', mass: float = 0.6) -> np.ndarray:
  """Group affinity maps [K, H, W] -> binary group masks bool [K, H, W].

  argmax: pixel x belongs to group argmax_k affinity[k, x] (ties: the lowest k).
  mass: per group, the largest values whose sum reaches `mass` of the map's sum (DINO's head threshold:
    sorted ascending, the pixels whose cumulative share exceeds 1 - mass).
  """
  a = np.asarray(affinity, np.float64)
  k = a.shape[0]
  if mode == 'argmax':
    return np.arange(k)[:, None, None] == a.argmax(axis=0)[None]
  if mode == 'mass':
    flat = a.reshape(k, -1)
    order = np.argsort(flat, axis=1, kind='stable')
    vals = np.take_along_axis(flat, order, axis=1)
    share = np.cumsum(vals, axis=1) / np.maximum(vals.sum(axis=1, keepdims=True), 1e-30)
    keep = np.zeros_like(flat, bool)
    np.put_along_axis(keep, order, share > 1.0 - mass, axis=1)
    return keep.reshape(a.shape)
  raise ValueError(f'binarize mode {mode!r}: expected one of {BINARIZE}')


def jaccard(masks: np.ndarray, target: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Jaccard of each mask with the target over the valid pixels: bool [K, H, W], [H, W], [H, W] -> [K]."""
  m = masks & valid[None]
  t = (target & valid)[None]
  inter = (m & t).sum(axis=(1, 2))
  union = (m | t).sum(axis=(1, 2))
  return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def objects_of(gt: np.ndarray, background: int | None = 0, ignore: int = IGNORE_LABEL) -> list[int]:
  """The labels of the ground-truth map that are objects: every class index but ignore, a negative value (a
  stored value with no class) and `background`."""
  return [int(v) for v in np.unique(gt) if v != ignore and v >= 0 and (background is None or v != background)]


def probe_image(group_masks: np.ndarray, gt: np.ndarray, background: int | None = 0,
                ignore: int = IGNORE_LABEL) -> dict[int, float]:
  """{object label: max over groups of the Jaccard with that object's mask} for one image."""
  valid = (gt != ignore) & (gt >= 0)
  return {o: float(jaccard(group_masks, gt == o, valid).max()) for o in objects_of(gt, background, ignore)}


class MaskProbe:
  """Accumulates images; `compute()` -> the mask-probing score (module docstring) and its breakdown."""

  def __init__(self, class_names=None):
    self.class_names = class_names
    self.per_image: list[float] = []
    self.per_label: dict[int, list[float]] = {}

  def update(self, best: dict[int, float]) -> None:
    """best: `probe_image`'s output. An image without objects is not counted."""
    if not best:
      return
    self.per_image.append(float(np.mean(list(best.values()))))
    for label, j in best.items():
      self.per_label.setdefault(label, []).append(j)

  def compute(self) -> dict:
    name = lambda c: self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)
    n_obj = sum(len(v) for v in self.per_label.values())
    return {
        'mask_probe': 100.0 * float(np.mean(self.per_image)) if self.per_image else float('nan'),
        'num_images': len(self.per_image),
        'num_objects': n_obj,
        # every object weighted alike (not the paper's number; shows how much the averaging matters)
        'object_mean': 100.0 * float(np.mean([j for v in self.per_label.values() for j in v])) if n_obj
                       else float('nan'),
        'per_class': {name(c): {'mean_best_jaccard': 100.0 * float(np.mean(v)), 'objects': len(v)}
                      for c, v in sorted(self.per_label.items())},
    }


# ------------------------------------------------------------------------------------------------------------
# The model's group maps.
# ------------------------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=('model',))
def _group_maps(variables, image, *, model):
  """image [1, h, w, 3] -> the soft pixel->group assignment on the patch grid [1, K, gh, gw]."""
  from ovseg_jax.models.ovsegmentor import OVSegmentor  # pylint: disable=g-import-not-at-top
  out = model.apply(variables, image, train=False, method=OVSegmentor.encode_image)
  b, k, _ = out['soft'].shape
  return out['soft'].reshape(b, k, *out['grid'])


def network_size(h: int, w: int, short_side: int, long_side: int, step: int) -> tuple[int, int]:
  """The network-input size of an h x w image: the inference rescale (short side `short_side`, long side at
  most `long_side`), each side then rounded to a multiple of `step` (at least `step`)."""
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  nh, nw = inference.rescale_size(h, w, short_side, long_side)
  return max(step, step * round(nh / step)), max(step, step * round(nw / step))


def group_affinity(segmenter, image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> A [K, H, W]: the soft group maps of the whole image, resized bilinearly
  (align_corners=False) to H x W.

  The image goes in whole at `network_size` with step = 2 patches (32 px for ViT-B/16, under 4 % of the
  aspect at short side 448): the model is compiled once per input shape, and the rounding keeps the number
  of shapes of a benchmark small.
  """
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  h, w = image.shape[:2]
  segmenter.check_size(h, w)
  cfg = segmenter.eval_config
  size = network_size(h, w, int(cfg.short_side), int(cfg.long_side), 2 * segmenter.patch_size)
  x = (resize_lib.resize_hw(image.astype(np.float32), size, axes=(0, 1)) - inference.MEAN) / inference.STD
  maps = np.asarray(_group_maps(segmenter.variables, x[None], model=segmenter.model))[0]
  return resize_lib.resize_hw(maps.astype(np.float32), (h, w), axes=(1, 2))


def probe_dataset(segmenter, ds, *, mode: str = 'argmax', mass: float = 0.6, include_background: bool = False,
                  progress=None) -> dict:
  """Mask probing of `segmenter`'s model on an `eval_datasets.EvalDataset`."""
  background = None if include_background or not ds.with_background else 0
  probe = MaskProbe(ds.class_names)
  for sample in (progress(ds.samples) if progress else ds.samples):
    gt = eval_datasets.read_labels(sample)
    a = group_affinity(segmenter, eval_datasets.read_image(sample.image_path))
    if a.shape[1:] != gt.shape:
      raise ValueError(f'{sample.image_path} is {a.shape[1]}x{a.shape[2]} but {sample.label_path} is '
                       f'{gt.shape[0]}x{gt.shape[1]}')
    probe.update(probe_image(binarize(a, mode, mass), gt, background))
  return probe.compute()


# ------------------------------------------------------------------------------------------------------------
# CLI.
# ------------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string('checkpoint', None, 'inference checkpoint folder (convert official / export)', flag_values=fv)
  flags.DEFINE_enum('dataset', None, eval_datasets.DATASETS, 'benchmark layout', flag_values=fv)
  flags.DEFINE_string('data_dir', None, 'dataset root', flag_values=fv)
  flags.DEFINE_string('output', None, 'results JSON path', flag_values=fv)
  flags.DEFINE_integer('max_images', None, 'probe the first N images only', flag_values=fv)
  flags.DEFINE_enum('binarize', 'argmax', BINARIZE, 'group mask: argmax (hard assignment) or mass (DINO)',
                    flag_values=fv)
  flags.DEFINE_float('mass', 0.6, 'binarize=mass: share of each group map kept (DINO: 0.6)', flag_values=fv)
  flags.DEFINE_bool('include_background', False, 'count the background region as an object', flag_values=fv)
  return cli.parse(fv, cli.argv_or_sys(argv), prog='python -m ovseg_jax.mask_probe', doc=__doc__,
                   required=('checkpoint', 'dataset', 'data_dir', 'output'), eval_settings=True)


@cli.entry_point
def main(argv=None) -> int:
  args = parse_args(argv)
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top  (a dependency of transformers)
  from ovseg_jax import inference  # pylint: disable=g-import-not-at-top
  start = time.time()
  try:
    ds = eval_datasets.load_dataset(args.dataset, args.data_dir, max_images=args.max_images)
    segmenter = inference.Segmenter.from_checkpoint(args.checkpoint, **args.eval)
    bar = lambda s: tqdm(s, desc=f'mask probe {ds.name}', unit='img', file=sys.stderr, dynamic_ncols=True)
    res = probe_dataset(segmenter, ds, mode=args.binarize, mass=args.mass,
                        include_background=args.include_background, progress=bar)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  res = {'dataset': ds.name, 'data_dir': ds.root, 'source': os.path.abspath(args.checkpoint), 'units': 'percent',
         **res, 'binarize': args.binarize, 'mass': args.mass if args.binarize == 'mass' else None,
         'include_background': args.include_background, 'short_side': int(segmenter.eval_config.short_side),
         'seconds': round(time.time() - start, 2)}
  os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
  with open(args.output, 'w') as f:
    json.dump(res, f, indent=1)
  print(f'{ds.name}: mask probe {res["mask_probe"]:.2f} (mean over {res["num_images"]} images of the mean over '
        f'their objects of the best group Jaccard; {res["num_objects"]} objects) -> {args.output}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
