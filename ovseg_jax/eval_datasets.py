"""Readers for the zero-shot segmentation benchmarks in their standard on-disk layouts, and their protocol.

The eight benchmarks of the field's table (TCL and the papers after it), plus `folder`. docs/evaluation.md
holds the protocol table with the source of every number, the download sources and the commands.

  name         split (images)            layout under --data_dir                       label value -> class
  voc          VOC2012 val (1449)        ImageSets/Segmentation/val.txt, JPEGImages/,  0 background, 1..20
                                         SegmentationClass/
  voc20        the same                  the same                                      0 ignored, 1..20 -> 0..19
  context      PASCAL Context val (5105) VOC2010 + ImageSets/SegmentationContext/      0 background, 1..59
                                         val.txt, SegmentationClassContext/ (mmseg's
                                         conversion of trainval_merged.json)
  context59    the same                  the same                                      0 ignored, 1..59 -> 0..58
  coco_object  COCO val2017 (5000)       images/val2017/*.jpg, annotations/            0 background, 1..80
                                         val2017_cocoobject/<stem>_instanceTrainIds.png
                                         (`python -m ovseg_jax.data.coco_object`)
  coco_stuff   COCO-Stuff-164k val2017   images/val2017/*.jpg, annotations/val2017/    0..170 as they are, or
               (5000)                    <stem>_labelTrainIds.png (mmseg's conversion)  raw ids 0..181 -> 0..170
                                         or <stem>.png (the raw stuffthingmaps)        (11 unused ids: none)
  cityscapes   Cityscapes val (500)      leftImg8bit/val/<city>/*_leftImg8bit.png,     the 34 labelIds -> the 19
                                         gtFine/val/<city>/*_gtFine_labelIds.png       trainIds, the rest ignored
                                         (or *_gtFine_labelTrainIds.png)
  ade20k       ADE20K val (2000)         images/validation/*.jpg,                      0 ignored, 1..150 -> 0..149
                                         annotations/validation/*.png
  folder       any                       the VOC layout (`data.synthetic --format      as stored
                                         voc`) + class_names.txt (one name per line,
                                         'background' first when there is one)

Label maps are palette ('P') or greyscale PNGs; after the mapping, 255 is ignored and any other value
outside [0, number of classes) is "out of range" (-1 where a mapping leaves a value without a class): it is
scored as mmseg scores it (metrics.py) and `evaluate` counts and reports it. A sample's `name` is its image
file's stem; `evaluate --predictions DIR` reads DIR/<name>.png, class indices in the dataset's class order.
"""

import collections
import dataclasses
import os

import numpy as np
from PIL import Image

from ovseg_jax import errors
from ovseg_jax import images

IGNORE_LABEL = 255

# ------------------------------------------------------------------------------------------------------------
# Class names: the exact prompt strings, in label order. Each list names its source.
# ------------------------------------------------------------------------------------------------------------

# The authors' (OVSegmentor segmentation/datasets/pascal_voc.py L21-22; GroupViT's renames of mmseg's VOC
# names: 'table', 'plant', 'monitor'). docs/paper_vs_authors.md Q27.
VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair',
               'cow', 'table', 'dog', 'horse', 'motorbike', 'person', 'plant', 'sheep', 'sofa', 'train',
               'monitor')
# TCL's PascalVOCDataset20 (kakaobrain/tcl segmentation/datasets/pascal_voc.py L24-27, "burrowed from
# MaskCLIP"): VOC without background, with VOC's own names ('diningtable', 'pottedplant', 'tvmonitor').
VOC20_CLASSES = ('aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
                 'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
                 'tvmonitor')
# The authors' (OVSegmentor segmentation/datasets/pascal_context.py L21-26: mmseg's list with 'airplane',
# 'plant', 'monitor').
CONTEXT_CLASSES = (
    'background', 'airplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle',
    'building', 'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup',
    'curtain', 'dog', 'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard',
    'light', 'motorbike', 'mountain', 'mouse', 'person', 'plate', 'platform', 'plant', 'road', 'rock', 'sheep',
    'shelves', 'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck',
    'monitor', 'wall', 'water', 'window', 'wood')
# mmseg's PascalContextDataset59 (mmseg/datasets/pascal_context.py), which TCL evaluates
# (segmentation/configs/_base_/datasets/pascal_context59.py L10).
CONTEXT59_CLASSES = (
    'aeroplane', 'bag', 'bed', 'bedclothes', 'bench', 'bicycle', 'bird', 'boat', 'book', 'bottle', 'building',
    'bus', 'cabinet', 'car', 'cat', 'ceiling', 'chair', 'cloth', 'computer', 'cow', 'cup', 'curtain', 'dog',
    'door', 'fence', 'floor', 'flower', 'food', 'grass', 'ground', 'horse', 'keyboard', 'light', 'motorbike',
    'mountain', 'mouse', 'person', 'plate', 'platform', 'pottedplant', 'road', 'rock', 'sheep', 'shelves',
    'sidewalk', 'sign', 'sky', 'snow', 'sofa', 'table', 'track', 'train', 'tree', 'truck', 'tvmonitor', 'wall',
    'water', 'window', 'wood')
# GroupViT's / TCL's COCOObjectDataset (kakaobrain/tcl segmentation/datasets/coco_object.py L18-26; the
# authors' segmentation/datasets/coco_object.py is the same list).
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
# mmseg's COCOStuffDataset (mmseg/datasets/coco_stuff.py), which TCL evaluates (configs/_base_/datasets/
# stuff.py L10): the 80 things (COCO Object's names) then the 91 stuff classes.
COCO_STUFF_CLASSES = COCO_OBJECT_CLASSES[1:] + (
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage', 'cardboard',
    'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds', 'counter', 'cupboard', 'curtain',
    'desk-stuff', 'dirt', 'door-stuff', 'fence', 'floor-marble', 'floor-other', 'floor-stone', 'floor-tile',
    'floor-wood', 'flower', 'fog', 'food-other', 'fruit', 'furniture-other', 'grass', 'gravel',
    'ground-other', 'hill', 'house', 'leaves', 'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain',
    'mud', 'napkin', 'net', 'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform',
    'playingfield', 'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea',
    'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw', 'structural-other',
    'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable', 'wall-brick', 'wall-concrete',
    'wall-other', 'wall-panel', 'wall-stone', 'wall-tile', 'wall-wood', 'water-other', 'waterdrops',
    'window-blind', 'window-other', 'wood')
# mmseg's CityscapesDataset (mmseg/datasets/cityscapes.py), which TCL evaluates (cityscapes.py L10): the 19
# trainIds of cityscapesScripts' labels.py, in trainId order.
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                      'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
                      'motorcycle', 'bicycle')
# mmseg's ADE20KDataset (mmseg/datasets/ade.py; the authors' segmentation/datasets/ade20k.py L23-47 is the same
# list). mmseg spells class 7 'bed ' with a trailing space; it is stripped here: the BERT tokenizer gives
# 'a photo of a bed .' and 'a photo of a bed.' the same ids.
ADE20K_CLASSES = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand',
    'path', 'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge',
    'bookcase', 'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove',
    'palm', 'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus',
    'towel', 'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver',
    'airplane', 'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle',
    'buffet', 'poster', 'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything',
    'swimming pool', 'stool', 'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven',
    'ball', 'food', 'step', 'tank', 'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake',
    'dishwasher', 'screen', 'blanket', 'sculpture', 'hood', 'sconce', 'vase', 'traffic light', 'tray',
    'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor', 'bulletin board', 'shower', 'radiator', 'glass',
    'clock', 'flag')

# ------------------------------------------------------------------------------------------------------------
# Label encodings: stored value -> class index (a 256-entry table; -1 = a value with no class).
# ------------------------------------------------------------------------------------------------------------

# Cityscapes labelIds of the 19 trainIds, in trainId order (cityscapesScripts helpers/labels.py; every other
# id, e.g. 'parking', 'guard rail', 'caravan', is ignored, as mmseg's labelTrainIds conversion does).
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
# COCO-Stuff-164k raw stuffthingmaps hold COCO category id - 1 (0..181). The 11 ids no category uses (ten
# unused thing ids, and 90) are absent; the remaining 171 in ascending order are classes 0..170 (mmseg's
# tools/convert_datasets/coco_stuff164k.py `clsID_to_trID`).
COCO_STUFF_UNUSED_IDS = (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
COCO_STUFF_RAW_IDS = tuple(i for i in range(182) if i not in COCO_STUFF_UNUSED_IDS)


def _table(mapping: dict, default: int) -> np.ndarray:
  lut = np.full(256, default, np.int16)
  for value, cls in mapping.items():
    lut[value] = cls
  return lut


# 'reduce_zero' is mmseg's reduce_zero_label: 0 -> 255 (ignored), v -> v - 1, and 255 stays 255.
LABEL_ENCODINGS = {
    'index': None,                                                            # stored = class index
    'reduce_zero': _table({0: IGNORE_LABEL, **{v: v - 1 for v in range(1, 255)}}, IGNORE_LABEL),
    'cityscapes_ids': _table(dict(zip(CITYSCAPES_LABEL_IDS, range(19))), IGNORE_LABEL),
    'coco_stuff_raw': _table({**dict(zip(COCO_STUFF_RAW_IDS, range(171))), IGNORE_LABEL: IGNORE_LABEL}, -1),
}

# ------------------------------------------------------------------------------------------------------------
# The protocol per benchmark (docs/evaluation.md gives the source of each number).
# ------------------------------------------------------------------------------------------------------------

# Every benchmark config of both repositories: mmcv img_scale (2048, 448) (short side 448, long side at most
# 2048), slide inference with crop 448 and stride 224; the authors' single prompt "a photo of a {}."
# (OVSegmentor configs/default.yml L105 `template: simple`).
PROTOCOL = dict(short_side=448, long_side=2048, window=448, stride=224, templates='simple')


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """One column of the paper table: how to find, read and score it."""
  name: str                    # --dataset / --suite name
  title: str                   # its column in the paper table
  class_names: tuple           # 'background' first when the benchmark scores a background class
  bg_threshold: float | None   # the authors' background threshold (benchmarks with a background class)
  folders: tuple               # where `--suite` looks under --data_root (mmseg's data/ names first)
  marker: str                  # a path inside the folder that tells this benchmark is there
  split: str                   # the images it scores (VOC and VOC20 score the same ones)

  @property
  def protocol(self) -> dict:
    """The eval settings (`config.eval` keys) this benchmark is scored with."""
    out = dict(PROTOCOL)
    if self.bg_threshold is not None:
      out['bg_threshold'] = self.bg_threshold
    return out


_VOC_DIRS = ('VOCdevkit/VOC2012', 'VOC2012')
_CONTEXT_DIRS = ('VOCdevkit/VOC2010', 'VOC2010')
_COCO_DIRS = ('coco_stuff164k', 'coco')
BENCHMARKS = {b.name: b for b in (
    # Thresholds: the authors' test_cfg.bg_thresh (docs/paper_vs_authors.md Q26).
    Benchmark('voc', 'VOC', VOC_CLASSES, 0.95, _VOC_DIRS, 'SegmentationClass', 'PASCAL VOC2012 val'),
    Benchmark('voc20', 'VOC20', VOC20_CLASSES, None, _VOC_DIRS, 'SegmentationClass', 'PASCAL VOC2012 val'),
    Benchmark('context', 'Context', CONTEXT_CLASSES, 0.35, _CONTEXT_DIRS, 'SegmentationClassContext',
              'PASCAL Context val'),
    Benchmark('context59', 'Context59', CONTEXT59_CLASSES, None, _CONTEXT_DIRS, 'SegmentationClassContext',
              'PASCAL Context val'),
    Benchmark('coco_object', 'COCO-Object', COCO_OBJECT_CLASSES, 0.9, _COCO_DIRS,
              'annotations/val2017_cocoobject', 'COCO val2017'),
    Benchmark('coco_stuff', 'COCO-Stuff', COCO_STUFF_CLASSES, None, _COCO_DIRS, 'annotations/val2017',
              'COCO val2017'),
    Benchmark('cityscapes', 'Cityscapes', CITYSCAPES_CLASSES, None, ('cityscapes',), 'gtFine',
              'Cityscapes val'),
    Benchmark('ade20k', 'ADE20K', ADE20K_CLASSES, None, ('ade/ADEChallengeData2016', 'ADEChallengeData2016'),
              'annotations/validation', 'ADE20K val'),
)}
SUITE = tuple(BENCHMARKS)      # the paper table's column order
# The background thresholds by benchmark ('folder' uses config.eval.bg_threshold).
BG_THRESHOLDS = {n: b.bg_threshold for n, b in BENCHMARKS.items() if b.bg_threshold is not None}
DATASETS = SUITE + ('folder',)
CLASS_NAMES_FILE = 'class_names.txt'


def find_benchmark(name: str, data_root: str) -> tuple[str | None, list[str]]:
  """Where benchmark `name` lives under `data_root` -> (folder or None, the folders looked at).

  The first candidate folder holding the benchmark's marker wins; else the first one that exists (loading it
  then says what is missing); None when no candidate exists.
  """
  bench = BENCHMARKS[name]
  looked = [os.path.join(data_root, *f.split('/')) for f in bench.folders]
  for path in looked:
    if os.path.exists(os.path.join(path, *bench.marker.split('/'))):
      return path, looked
  return next((p for p in looked if os.path.isdir(p)), None), looked


# ------------------------------------------------------------------------------------------------------------
# Samples and datasets.
# ------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Sample:
  name: str                  # the image file's stem; a prediction is <name>.png
  image_path: str
  label_path: str
  encoding: str = 'index'    # LABEL_ENCODINGS key: how the stored label values become class indices


@dataclasses.dataclass
class EvalDataset:
  """A benchmark split: its samples, class names (background first when `with_background`), protocol.

  `warnings` are one-line notes for the user (a repeated split line, a class-names file that is not used);
  `skipped` maps a reason ('no label file') to the paths of the images left out for it.
  """
  name: str
  root: str
  class_names: tuple
  samples: list
  bg_threshold: float | None = None
  protocol: dict = dataclasses.field(default_factory=dict)
  warnings: list = dataclasses.field(default_factory=list)
  skipped: dict = dataclasses.field(default_factory=dict)

  @property
  def with_background(self) -> bool:
    return bool(self.class_names) and self.class_names[0] == 'background'

  @property
  def foreground_names(self) -> list:
    return list(self.class_names[1:] if self.with_background else self.class_names)

  @property
  def title(self) -> str:
    return BENCHMARKS[self.name].title if self.name in BENCHMARKS else self.name


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
  """Reads a palette / greyscale label PNG -> int [H, W] stored values (the raw indices, not colours).

  Under the project's pixel budget (images.load); an unreadable file is one images.ImageError line.
  """
  img = images.load(path)
  with img:
    if img.mode in ('RGB', 'RGBA') or len(img.getbands()) != 1:
      raise ValueError(f'{path} is an {img.mode} image; label maps must be palette (P) or greyscale (L) PNGs '
                       'holding class indices')
    return np.asarray(img).astype(np.int64 if img.mode.startswith('I') else np.uint8)


def read_labels(sample: Sample) -> np.ndarray:
  """The ground truth of a sample as class indices: int [H, W], 255 ignored, -1 = a value with no class."""
  raw = read_label_png(sample.label_path)
  lut = LABEL_ENCODINGS[sample.encoding]
  if lut is None:
    return raw
  if raw.dtype == np.uint8:
    return lut[raw]
  inside = (raw >= 0) & (raw < 256)
  return np.where(inside, lut[np.clip(raw, 0, 255)], -1).astype(np.int16)


def read_image(path: str, *, max_pixels: int | None = None, exif_transpose: bool = False) -> np.ndarray:
  """Any PIL-readable image -> uint8 RGB [H, W, 3] (`images.read_rgb`: pixel budget, 16-bit scaling, frame 0,
  stored orientation unless `exif_transpose`). Raises images.ImageError (one line) when it cannot be used."""
  return images.read_rgb(path, max_pixels=max_pixels, exif_transpose=exif_transpose)

# ------------------------------------------------------------------------------------------------------------
# Readers: each returns the samples of a layout (paths not checked yet) and one-line warnings.
# ------------------------------------------------------------------------------------------------------------

def _require(path: str, hint: str = '') -> str:
  if not os.path.exists(path):
    raise FileNotFoundError(f'expected {path}' + (f' ({hint})' if hint else ''))
  return path


def _read_lines(path: str, hint: str = '') -> list:
  """The non-blank lines of a text file; a folder, an unreadable or a binary file is one UsageError line."""
  _require(path, hint)
  if not os.path.isfile(path):
    raise errors.UsageError(f'{path} is a folder, not a text file')
  try:
    with open(path, encoding='utf-8') as f:
      return [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError:
    raise errors.UsageError(f'{path} is not a UTF-8 text file') from None
  except OSError as e:
    raise errors.UsageError(f'cannot read {path}: {e.strerror or e}') from None


def _dedupe(names: list, where: str) -> tuple[list, list]:
  """Drops repeated names (keeping the first), so no image is scored twice -> (names, warnings)."""
  counts = collections.Counter(names)
  repeated = [n for n, c in counts.items() if c > 1]
  if not repeated:
    return names, []
  extra = sum(counts[n] - 1 for n in repeated)
  return list(dict.fromkeys(names)), [
      f'{where} lists {len(repeated)} image name(s) more than once ({extra} extra line(s), first: '
      f'{repeated[0]}); each image is scored once']


def _read_split(path: str, hint: str = '') -> tuple[list, list]:
  names = [line.split()[0] for line in _read_lines(path, hint)]
  if not names:
    raise ValueError(f'{path} lists no images')
  return _dedupe(names, path)


def read_class_names(path: str) -> tuple:
  """One class name per line (blank lines skipped; inner spaces kept: 'potted plant')."""
  names = tuple(_read_lines(path))
  if not names:
    raise ValueError(f'{path} holds no class names')
  return names


def _voc_layout(root: str, split_file: str, label_dir: str, hint: str = '', encoding: str = 'index'):
  names, warnings = _read_split(os.path.join(root, split_file), hint)
  return [Sample(n, os.path.join(root, 'JPEGImages', n + '.jpg'), os.path.join(root, label_dir, n + '.png'),
                 encoding) for n in names], warnings


def _listed(folder: str, suffix: str, hint: str = '') -> list:
  """Sorted file names in `folder` ending with `suffix` (case-insensitive); an empty folder is an error."""
  if not os.path.isdir(_require(folder, hint)):
    raise errors.UsageError(f'expected a folder at {folder}, not a file')
  files = sorted(f for f in os.listdir(folder) if f.lower().endswith(suffix.lower()))
  if not files:
    raise FileNotFoundError(f'expected *{suffix} files in {folder}' + (f' ({hint})' if hint else ''))
  return files


def _stems(files: list) -> list:
  return [f[:-len(os.path.splitext(f)[1])] for f in files]


def _image_label_dirs(root: str, images: tuple, labels: tuple, image_hint: str, label_hint: str):
  """-> (root/images..., root/labels...), the image and the label folder of a layout, each required to exist."""
  return (_require(os.path.join(root, *images), image_hint), _require(os.path.join(root, *labels), label_hint))


def _coco_object(root: str):
  img_dir, label_dir = _image_label_dirs(
      root, ('images', 'val2017'), ('annotations', 'val2017_cocoobject'),
      'data_dir must be the COCO root holding images/val2017',
      'build it with `python -m ovseg_jax.data.coco_object --coco_dir ' + root + '`')
  stems = _stems(_listed(img_dir, '.jpg'))
  return [Sample(s, os.path.join(img_dir, s + '.jpg'), os.path.join(label_dir, s + '_instanceTrainIds.png'))
          for s in stems], []


def _coco_stuff(root: str):
  """mmseg's <stem>_labelTrainIds.png (classes 0..170) when present, else the raw <stem>.png (ids 0..181)."""
  img_dir, label_dir = _image_label_dirs(
      root, ('images', 'val2017'), ('annotations', 'val2017'),
      'data_dir must be the COCO-Stuff-164k root holding images/val2017',
      'unzip stuffthingmaps_trainval2017.zip into annotations/')
  samples = []
  for s in _stems(_listed(img_dir, '.jpg')):
    train_ids = os.path.join(label_dir, s + '_labelTrainIds.png')
    raw = os.path.join(label_dir, s + '.png')
    if not os.path.exists(train_ids) and os.path.exists(raw):
      samples.append(Sample(s, os.path.join(img_dir, s + '.jpg'), raw, 'coco_stuff_raw'))
    else:
      samples.append(Sample(s, os.path.join(img_dir, s + '.jpg'), train_ids))
  return samples, []


def _cityscapes(root: str):
  """leftImg8bit/val/<city>/X_leftImg8bit.png with gtFine/val/<city>/X_gtFine_labelIds.png (or labelTrainIds)."""
  img_root, gt_root = _image_label_dirs(
      root, ('leftImg8bit', 'val'), ('gtFine', 'val'),
      'data_dir must be the Cityscapes root holding leftImg8bit/ and gtFine/',
      'gtFine_trainvaltest.zip unpacked into data_dir')
  if not os.path.isdir(img_root):
    raise errors.UsageError(f'expected a folder at {img_root}, not a file')
  cities = sorted(c for c in os.listdir(img_root) if os.path.isdir(os.path.join(img_root, c)))
  samples = []
  for city in cities:
    for f in sorted(os.listdir(os.path.join(img_root, city))):
      if not f.endswith('_leftImg8bit.png'):
        continue
      base = f[:-len('_leftImg8bit.png')]
      ids = os.path.join(gt_root, city, base + '_gtFine_labelIds.png')
      train_ids = os.path.join(gt_root, city, base + '_gtFine_labelTrainIds.png')
      if not os.path.exists(ids) and os.path.exists(train_ids):
        label, encoding = train_ids, 'index'
      else:
        label, encoding = ids, 'cityscapes_ids'
      samples.append(Sample(f[:-len('.png')], os.path.join(img_root, city, f), label, encoding))
  if not samples:
    raise FileNotFoundError(f'expected <city>/*_leftImg8bit.png files in {img_root}')
  return samples, []


def _ade20k(root: str):
  hint = 'data_dir must be the ADEChallengeData2016 folder'
  img_dir, label_dir = _image_label_dirs(root, ('images', 'validation'), ('annotations', 'validation'), hint, hint)
  stems = _stems(_listed(img_dir, '.jpg'))
  return [Sample(s, os.path.join(img_dir, s + '.jpg'), os.path.join(label_dir, s + '.png'), 'reduce_zero')
          for s in stems], []


def _read_layout(name: str, root: str):
  voc_split = os.path.join('ImageSets', 'Segmentation', 'val.txt')
  context_split = os.path.join('ImageSets', 'SegmentationContext', 'val.txt')
  context_hint = "data_dir must be VOC2010 with mmseg's Context labels"
  if name in ('voc', 'voc20'):
    return _voc_layout(root, voc_split, 'SegmentationClass', 'data_dir must be the VOC2012 folder',
                       'index' if name == 'voc' else 'reduce_zero')
  if name in ('context', 'context59'):
    return _voc_layout(root, context_split, 'SegmentationClassContext', context_hint,
                       'index' if name == 'context' else 'reduce_zero')
  if name == 'coco_object':
    return _coco_object(root)
  if name == 'coco_stuff':
    return _coco_stuff(root)
  if name == 'cityscapes':
    return _cityscapes(root)
  if name == 'ade20k':
    return _ade20k(root)
  if name == 'folder':
    return _voc_layout(root, voc_split, 'SegmentationClass')
  raise ValueError(f'unknown dataset {name!r}; expected one of {DATASETS}')


def _class_names_conflict(name: str, root: str, classes: tuple) -> list:
  """A benchmark folder that carries its own class_names.txt: say that the benchmark's list is used."""
  path = os.path.join(root, CLASS_NAMES_FILE)
  if name == 'folder' or not os.path.isfile(path):
    return []
  try:
    own = read_class_names(path)
  except (OSError, ValueError):
    own = ()
  if own == tuple(classes):
    return []
  return [f'{path} lists {len(own)} class names ({", ".join(own[:3])}{", ..." if len(own) > 3 else ""}) '
          f'but --dataset {name} scores its own {len(classes)} classes; the file is not used (--dataset folder '
          'or --class_names FILE use it)']


def load_dataset(name: str, data_dir: str, class_names_file: str | None = None,
                 max_images: int | None = None) -> EvalDataset:
  """Lists a benchmark split and checks that its files exist.

  An image without its label file (or the reverse) is left out and counted in `skipped`; when no image is
  left, FileNotFoundError names the first missing path ("expected .../SegmentationClass/x.png").
  Repeated split lines are scored once (`warnings` says so).
  """
  if max_images is not None and max_images <= 0:
    raise ValueError(f'max_images must be a positive number of images; got {max_images}')
  root = os.path.abspath(data_dir)
  _require(root)
  if not os.path.isdir(root):
    raise FileNotFoundError(f'expected a folder at {root}, not a file')
  samples, warnings = _read_layout(name, root)
  if name == 'folder':
    classes = None if class_names_file else read_class_names(os.path.join(root, CLASS_NAMES_FILE))
  else:
    classes = BENCHMARKS[name].class_names
    if not class_names_file:
      warnings += _class_names_conflict(name, root, classes)
  if class_names_file:
    classes = read_class_names(class_names_file)
  names, more = _dedupe([s.name for s in samples], f'{root} ({name})')
  if more:   # two image files with one stem (x.jpg, x.JPG): their predictions would share one file
    warnings += more
    seen = set()
    samples = [s for s in samples if not (s.name in seen or seen.add(s.name))]
  if max_images:
    samples = samples[:max_images]
  kept, skipped, missing = [], {}, []
  for s in samples:
    lost = [(why, p) for why, p in (('no image file', s.image_path), ('no label file', s.label_path))
            if not os.path.isfile(p)]
    for why, p in lost:
      skipped.setdefault(why, []).append(p)
      missing.append(p)
    if not lost:
      kept.append(s)
  if not kept:
    more = f' (and {len(missing) - 1} more missing files)' if len(missing) > 1 else ''
    raise FileNotFoundError(f'expected {missing[0]}{more}')
  bench = BENCHMARKS.get(name)
  return EvalDataset(name, root, tuple(classes), kept, bench.bg_threshold if bench else None,
                     bench.protocol if bench else {}, warnings, skipped)
