"""Readers for the zero-shot segmentation benchmarks in their standard on-disk layouts.

Class names and labels as the authors evaluate them: docs/paper_vs_authors.md Q27, Q28.

  voc          PASCAL VOC2012 val (1449):  ImageSets/Segmentation/val.txt, JPEGImages/, SegmentationClass/
  context      PASCAL Context-59 (5105):    VOC2010 + ImageSets/SegmentationContext/val.txt,
                                            SegmentationClassContext/ (mmseg's conversion: 0 = background)
  coco_object  COCO Object val2017 (5000):  images/val2017/*.jpg,
                                            annotations/val2017_cocoobject/*_instanceTrainIds.png
                                            (written by `python -m ovseg_jax.data.coco_object`)
  folder       the VOC layout written by `python -m ovseg_jax.data.synthetic --format voc`, plus
               class_names.txt (one name per line, 'background' first when there is a background class)

The class names are the exact prompt strings the authors use; the background thresholds are theirs
(`test_cfg.bg_thresh`). Label maps are palette ('P') or greyscale PNGs of class indices, 255 = ignore.
"""

import dataclasses
import os

import numpy as np
from PIL import Image

VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
               'cow', 'table', 'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train',
               'monitor')
CONTEXT_CLASSES = (
    'background', 'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup',
    'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard',
    'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'plant', 'road', 'rock', 'sheep',
    'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
    'monitor', 'wall', 'water', 'window', 'wood')
COCO_OBJECT_CLASSES = (
    'background', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'backpack', 'umbrella', 'handbag', 'tie',
    'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
    'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut',
    'cake', 'chair', 'couch', 'potted plant', 'bed', 'dining table', 'toilet', 'tv', 'laptop', 'mouse',
    'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush')

# The authors' per-dataset background thresholds (docs/paper_vs_authors.md Q26). 'folder' uses config.eval.
BG_THRESHOLDS = {'voc': 0.95, 'context': 0.35, 'coco_object': 0.9}
DATASETS = ('voc', 'context', 'coco_object', 'folder')
CLASS_NAMES_FILE = 'class_names.txt'


@dataclasses.dataclass(frozen=True)
class Sample:
  name: str
  image_path: str
  label_path: str


@dataclasses.dataclass
class EvalDataset:
  """A benchmark split: its samples, class names (background first when `with_background`), threshold."""
  name: str
  root: str
  class_names: tuple
  samples: list
  bg_threshold: float | None = None

  @property
  def with_background(self) -> bool:
    return bool(self.class_names) and self.class_names[0] == 'background'

  @property
  def foreground_names(self) -> list:
    return list(self.class_names[1:] if self.with_background else self.class_names)


# ------------------------------------------------------------------------------------------------------------
# Label PNGs.
# ------------------------------------------------------------------------------------------------------------

def voc_palette(n: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (bit-interleaved class index) -> uint8 [n, 3]; entry 0 is black."""
  pal = np.zeros((n, 3), np.uint8)
  for i in range(n):
    c, r, g, b = i, 0, 0, 0
    for j in range(8):
      r |= ((c >> 0) & 1) << (7 - j)
      g |= ((c >> 1) & 1) << (7 - j)
      b |= ((c >> 2) & 1) << (7 - j)
      c >>= 3
    pal[i] = (r, g, b)
  return pal


def write_label_png(path: str, labels: np.ndarray, palette: np.ndarray | None = None) -> None:
  """Writes int [H, W] labels in [0, 255] as a palette PNG (VOC colours by default)."""
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(f'label values must lie in [0, 255] for a PNG; got [{labels.min()}, {labels.max()}]')
  img = Image.fromarray(labels.astype(np.uint8), mode='P')
  img.putpalette((voc_palette() if palette is None else np.asarray(palette, np.uint8)).reshape(-1).tolist())
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  img.save(path)


def read_label_png(path: str) -> np.ndarray:
  """Reads a palette / greyscale label PNG -> int [H, W] class indices (the raw indices, not colours)."""
  with Image.open(path) as img:
    if img.mode in ('RGB', 'RGBA'):
      raise ValueError(f'{path} is an {img.mode} image; label maps must be palette (P) or greyscale (L) PNGs '
                       'holding class indices')
    return np.asarray(img).astype(np.int64 if img.mode.startswith('I') else np.uint8)


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image -> uint8 RGB [H, W, 3]."""
  with Image.open(path) as img:
    return np.asarray(img.convert('RGB'))


# ------------------------------------------------------------------------------------------------------------
# Readers.
# ------------------------------------------------------------------------------------------------------------

def _require(path: str, hint: str = '') -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f'expected {path}' + (f' ({hint})' if hint else ''))
  return path


def _read_split(path: str, hint: str = '') -> list:
  with open(_require(path, hint)) as f:
    names = [line.split()[0] for line in f if line.strip()]
  if not names:
    raise ValueError(f'{path} lists no images')
  return names


def read_class_names(path: str) -> tuple:
  """One class name per line (blank lines skipped; inner spaces kept: 'potted plant')."""
  with open(_require(path)) as f:
    names = tuple(line.strip() for line in f if line.strip())
  if not names:
    raise ValueError(f'{path} holds no class names')
  return names


def _voc_layout(root: str, split_file: str, label_dir: str, hint: str = '') -> list:
  names = _read_split(os.path.join(root, split_file), hint)
  return [Sample(n, os.path.join(root, 'JPEGImages', n + '.jpg'), os.path.join(root, label_dir, n + '.png'))
          for n in names]


def _coco_object(root: str) -> list:
  img_dir = _require(os.path.join(root, 'images', 'val2017'))
  label_dir = os.path.join(root, 'annotations', 'val2017_cocoobject')
  _require(label_dir, 'build it with `python -m ovseg_jax.data.coco_object --coco_dir ' + root + '`')
  stems = sorted(os.path.splitext(f)[0] for f in os.listdir(img_dir) if f.lower().endswith('.jpg'))
  if not stems:
    raise FileNotFoundError(f'expected .jpg images in {img_dir}')
  return [Sample(s, os.path.join(img_dir, s + '.jpg'), os.path.join(label_dir, s + '_instanceTrainIds.png'))
          for s in stems]


def load_dataset(name: str, data_dir: str, class_names_file: str | None = None,
                 max_images: int | None = None) -> EvalDataset:
  """Lists a benchmark split and checks that every image and label file exists.

  Raises FileNotFoundError naming the first missing path ("expected .../SegmentationClass/x.png").
  """
  root = os.path.abspath(data_dir)
  _require(root)
  if name == 'voc':
    samples = _voc_layout(root, os.path.join('ImageSets', 'Segmentation', 'val.txt'), 'SegmentationClass',
                          'data_dir must be the VOC2012 folder')
    classes = VOC_CLASSES
  elif name == 'context':
    samples = _voc_layout(root, os.path.join('ImageSets', 'SegmentationContext', 'val.txt'),
                          'SegmentationClassContext', "data_dir must be VOC2010 with mmseg's Context-59 labels")
    classes = CONTEXT_CLASSES
  elif name == 'coco_object':
    samples = _coco_object(root)
    classes = COCO_OBJECT_CLASSES
  elif name == 'folder':
    samples = _voc_layout(root, os.path.join('ImageSets', 'Segmentation', 'val.txt'), 'SegmentationClass')
    classes = None if class_names_file else read_class_names(os.path.join(root, CLASS_NAMES_FILE))
  else:
    raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')
  if class_names_file:
    classes = read_class_names(class_names_file)
  if max_images:
    samples = samples[:max_images]
  missing = [p for s in samples for p in (s.image_path, s.label_path) if not os.path.exists(p)]
  if missing:
    more = f' (and {len(missing) - 1} more missing files)' if len(missing) > 1 else ''
    raise FileNotFoundError(f'expected {missing[0]}{more}')
  return EvalDataset(name, root, tuple(classes), samples, BG_THRESHOLDS.get(name))
