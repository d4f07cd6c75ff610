"""COCO Object labels from instance annotations (GroupViT's mapping), on a generated two-image fixture."""

import json
import os

import numpy as np
from PIL import Image

from ovseg_jax import eval_datasets
from ovseg_jax.data import coco_object


def _box(x, y, w, h):
  return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def test_mapping_is_contiguous_in_coco_thing_order():
  assert len(coco_object.COCO_THING_IDS) == 80
  assert coco_object.CATEGORY_TO_TRAIN_ID[1] == 1                # person
  assert coco_object.CATEGORY_TO_TRAIN_ID[13] == 12              # stop sign (id 12 is unused)
  assert coco_object.CATEGORY_TO_TRAIN_ID[90] == 80              # toothbrush
  assert eval_datasets.COCO_OBJECT_CLASSES[coco_object.CATEGORY_TO_TRAIN_ID[67]] == 'dining table'
  assert eval_datasets.COCO_OBJECT_CLASSES[coco_object.CATEGORY_TO_TRAIN_ID[72]] == 'tv'


def test_convert_paints_instances(tmp_path, capsys):
  ann = {
      'images': [{'id': 7, 'file_name': '000000000007.jpg', 'height': 20, 'width': 30},
                 {'id': 9, 'file_name': '000000000009.jpg', 'height': 10, 'width': 10}],
      'categories': [{'id': 1, 'name': 'person'}, {'id': 18, 'name': 'dog'}, {'id': 90, 'name': 'toothbrush'}],
      'annotations': [
          {'id': 1, 'image_id': 7, 'category_id': 18, 'segmentation': _box(2, 2, 10, 8), 'area': 80,
           'bbox': [2, 2, 10, 8], 'iscrowd': 0},
          {'id': 2, 'image_id': 7, 'category_id': 1, 'segmentation': _box(8, 4, 10, 10), 'area': 100,
           'bbox': [8, 4, 10, 10], 'iscrowd': 0},                     # overlaps the dog: painted later, wins
          {'id': 3, 'image_id': 7, 'category_id': 90, 'area': 4, 'bbox': [25, 15, 2, 2], 'iscrowd': 1,
           'segmentation': {'counts': [15 * 20 + 15, 2, 18, 2, 263], 'size': [20, 30]}},
      ],
  }
  os.makedirs(tmp_path / 'annotations')
  (tmp_path / 'annotations' / 'instances_val2017.json').write_text(json.dumps(ann))
  assert coco_object.main(['--coco_dir', str(tmp_path)]) == 0
  out = tmp_path / 'annotations' / 'val2017_cocoobject'
  assert sorted(os.listdir(out)) == ['000000000007_instanceTrainIds.png', '000000000009_instanceTrainIds.png']
  lab = np.asarray(Image.open(out / '000000000007_instanceTrainIds.png'))
  assert lab.shape == (20, 30) and lab.dtype == np.uint8
  assert lab[5, 4] == 17                                          # dog (id 18) -> 17
  assert lab[8, 10] == 1                                          # person over the dog
  assert lab[16, 16] == 80 and lab[15, 15] == 80                 # crowd toothbrush (RLE, column-major)
  assert lab[0, 0] == 0 and lab[19, 29] == 0
  assert set(np.unique(lab)) == {0, 1, 17, 80}
  assert not np.asarray(Image.open(out / '000000000009_instanceTrainIds.png')).any()

  assert coco_object.main(['--coco_dir', str(tmp_path), '--no_crowd']) == 0
  lab = np.asarray(Image.open(out / '000000000007_instanceTrainIds.png'))
  assert lab[16, 16] == 0

  assert coco_object.main(['--coco_dir', str(tmp_path / 'missing')]) == 2
  assert 'instances_val2017.json' in capsys.readouterr().err
