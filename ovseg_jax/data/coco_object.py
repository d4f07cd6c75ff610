"""COCO Object labels (81 classes: background + the 80 COCO things) from COCO instance annotations.

  python -m ovseg_jax.data.coco_object --coco_dir D [--split val2017] [--no_crowd] [--max_images N]

reads  D/annotations/instances_<split>.json   (COCO 2017 instance annotations)
writes D/annotations/<split>_cocoobject/<image stem>_instanceTrainIds.png   (uint8 greyscale)

This is the labelling GroupViT's `convert_coco_object.py` produces (docs/paper_vs_authors.md Q28: the authors'
own script writes COCO-Stuff labels instead): COCO category ids 1..90 (80 used) map to contiguous 1..80 in
ascending id order, which is the class order of `eval_datasets.COCO_OBJECT_CLASSES`; everything else (stuff
and unlabelled pixels) is 0 = background. GroupViT starts from the COCO-Stuff pixel maps, whose thing pixels
are the instance masks; here the masks are painted straight from the instance annotations with pycocotools,
in annotation order (a later instance overwrites an earlier one where they overlap). Crowd regions are
painted too (they are objects of their class); --no_crowd leaves them background.
"""

import json
import os
import sys

from absl import flags
import numpy as np
from PIL import Image

from ovseg_jax import cli

# The 80 COCO thing category ids in ascending order; position + 1 is the COCO Object class index.
COCO_THING_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
    33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
    60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)
CATEGORY_TO_TRAIN_ID = {cid: i + 1 for i, cid in enumerate(COCO_THING_IDS)}
SUFFIX = '_instanceTrainIds.png'


def label_map(coco, image_id: int, include_crowd: bool = True) -> np.ndarray:
  """uint8 [H, W] COCO Object labels of one image (0 = background, 1..80 = things)."""
  info = coco.imgs[image_id]
  out = np.zeros((info['height'], info['width']), np.uint8)
  ann_ids = coco.getAnnIds(imgIds=[image_id], iscrowd=None if include_crowd else False)
  for ann in coco.loadAnns(ann_ids):
    train_id = CATEGORY_TO_TRAIN_ID.get(ann['category_id'], 0)
    out[coco.annToMask(ann).astype(bool)] = train_id
  return out


def convert(coco_dir: str, split: str = 'val2017', include_crowd: bool = True, max_images: int | None = None,
            annotations: str | None = None) -> str:
  """Writes every label PNG of the split; returns the output folder."""
  from pycocotools.coco import COCO  # pylint: disable=g-import-not-at-top
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  ann_file = annotations or os.path.join(coco_dir, 'annotations', f'instances_{split}.json')
  if not os.path.exists(ann_file):
    raise FileNotFoundError(f'expected COCO instance annotations at {ann_file} '
                            '(annotations_trainval2017.zip from the COCO site, unpacked into --coco_dir)')
  with open(ann_file) as f:
    cats = {c['id']: c['name'] for c in json.load(f).get('categories', [])}
  unknown = sorted(set(cats) - set(COCO_THING_IDS))
  if unknown:
    raise ValueError(f'{ann_file} has categories outside the 80 COCO things: {unknown[:5]}; '
                     'expected an instances_*.json file')
  coco = COCO(ann_file)
  out_dir = os.path.join(coco_dir, 'annotations', f'{split}_cocoobject')
  os.makedirs(out_dir, exist_ok=True)
  image_ids = sorted(coco.imgs)[:max_images] if max_images else sorted(coco.imgs)
  for image_id in tqdm(image_ids, desc='coco_object', unit='img', file=sys.stderr):
    stem = os.path.splitext(coco.imgs[image_id]['file_name'])[0]
    Image.fromarray(label_map(coco, image_id, include_crowd), mode='L').save(os.path.join(out_dir, stem + SUFFIX))
  return out_dir


@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_string('coco_dir', None, 'COCO root holding annotations/ (and images/<split>/)', flag_values=fv)
  flags.DEFINE_string('split', 'val2017', 'COCO split', flag_values=fv)
  flags.DEFINE_string('annotations', None, 'instances JSON (default annotations/instances_<split>.json)',
                      flag_values=fv)
  flags.DEFINE_bool('no_crowd', False, 'leave crowd regions as background', flag_values=fv)
  flags.DEFINE_integer('max_images', None, 'convert the first N images only', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m ovseg_jax.data.coco_object', doc=__doc__, required=('coco_dir',))
  try:
    out = convert(args.coco_dir, args.split, not args.no_crowd, args.max_images, args.annotations)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f'wrote COCO Object labels to {out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
