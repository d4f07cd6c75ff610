"""What did a tiny run learn? Image-level and group-level zero-shot recognition on synthetic images (issue 6).

  python -m bench.e2e_diagnose --checkpoint runs/local/export                 # held-out split (seed 1)
  python -m bench.e2e_diagnose --checkpoint runs/local/export --split train    # i.i.d. images (seed 1)

For `--num_images` synthetic images rendered at the model's training size, with the class embeddings of
`Segmenter.text_embedding(SHAPES)` (the evaluation prompts):
  * image-level recall: the share of an image's classes among its top-|classes| by cos(image_x, class);
  * group-level accuracy: for each output group whose hard-assigned patches are mostly one object class, whether
    its best class by cos(group, class) is that class.
Chance is about 0.33 and 0.17. mIoU needs both high, plus a clean background/foreground split.
"""

import argparse

import numpy as np
from PIL import Image

from ovseg_jax import inference
from ovseg_jax.data import augment
from ovseg_jax.data import synthetic
from ovseg_jax.models.ovsegmentor import OVSegmentor


def unit(x: np.ndarray) -> np.ndarray:
  x = np.array(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--checkpoint', required=True)
  p.add_argument('--split', default='val')
  p.add_argument('--seed', type=int, default=1)
  p.add_argument('--num_images', type=int, default=100)
  a = p.parse_args()
  seg = inference.Segmenter.from_checkpoint(a.checkpoint)
  size, patch = int(seg.model_config.vision.img_size), seg.patch_size
  grid = size // patch
  classes = unit(seg.text_embedding(synthetic.SHAPES))
  recall, hits, groups = [], 0, 0
  for i in range(a.num_images):
    ex = synthetic.make_example(a.seed, a.split, i, 64, 96)
    x = augment.normalize(Image.fromarray(ex['image']).resize((size, size), Image.BILINEAR))[None]
    out = seg.model.apply(seg.variables, x, train=False, method=OVSegmentor.encode_image)
    present = {synthetic.SHAPES.index(o[0]) for o in ex['objects']}
    top = np.argsort(-(classes @ unit(out['image_x'][0])))[:len(present)]
    recall.append(len(present & set(top.tolist())) / len(present))
    zg = unit(out['image_feat'][0])
    owner = np.asarray(out['soft'][0]).argmax(0).reshape(grid, grid)
    label = np.asarray(Image.fromarray(ex['label']).resize((grid, grid), Image.NEAREST))
    for k in range(zg.shape[0]):
      px = label[(owner == k) & (label != synthetic.IGNORE)]
      if px.size == 0:
        continue
      major = int(np.bincount(px, minlength=len(synthetic.SHAPES) + 1).argmax())
      if major:
        groups += 1
        hits += int(np.argmax(classes @ zg[k]) + 1 == major)
  off = (classes @ classes.T)[~np.eye(len(classes), dtype=bool)].mean()
  print(f'{a.split} seed {a.seed}, {a.num_images} images: image-level recall {np.mean(recall):.3f}, '
        f'group-level accuracy {hits / max(groups, 1):.3f} over {groups} object groups, '
        f'mean cos between class embeddings {off:.3f}')


if __name__ == '__main__':
  main()
