"""The tfds dataset of image-caption-entity records (CC4M and the synthetic captions), array_record format.

One record (tfds features, read back with `tfds.builder_from_directory(dir).as_data_source()`):
  image      tfds Image, JPEG bytes (kept byte-exact by the builder when within its max side)
  caption    Text, the caption as given
  entities   Sequence(Text), the vocabulary surface words found ("men", "dog")
  canonical  Sequence(Text), their canonical entities ("people", "dog"; 73 for CC4M)
  key        Text, the input's own id (img2dataset key, TSV image path, synthetic index)

Layout (tfds's own): `<data_dir>/<name>/1.0.0/{dataset_info.json, features.json,
<name>-<split>.array_record-0000i-of-0000n}` plus two files of this project beside them:
`ovseg_meta.json` (entity vocabulary and mode used to filter, per-split build reports) and
`entity_index-<split>.npz` (canonical entity and surface word -> example ids, for cross-image partners).

Two ways to write it:
  * `CaptionDataset(..., examples=...).download_and_prepare()`: tfds's own writer, in process, for small
    example lists;
  * `build_cc4m` (and `synthetic --format tfds`): parallel, resumable shard workers that serialize with the
    same `features()` and array_record options as tfds, then `finalize_split` registers the shards in the
    builder's DatasetInfo. Both produce what `builder_from_directory` reads.
"""

import json
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from ovseg_jax import errors

_VERSION = '1.0.0'
ARRAY_RECORD_OPTIONS = 'group_size:1'   # what tfds's ArrayRecordFileAdapter writes (random access)
META_FILE = 'ovseg_meta.json'


def features() -> tfds.features.FeaturesDict:
  """The record schema (see the module docstring)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(encoding_format='jpeg'),
      'caption': tfds.features.Text(),
      'entities': tfds.features.Sequence(tfds.features.Text()),
      'canonical': tfds.features.Sequence(tfds.features.Text()),
      'key': tfds.features.Text(),
  })


class CaptionDataset(tfds.core.GeneratorBasedBuilder):
  """Image-caption-entity triplets (paper Sec. 3.1.2) in array_record shards.

  `examples` (optional): an iterable of (key, example dict) written by `download_and_prepare()` into `split`.
  """

  VERSION = tfds.core.Version(_VERSION)
  RELEASE_NOTES = {_VERSION: 'JPEG image, caption, surface and canonical entities, key.'}

  def __init__(self, *, examples=None, split: str = 'train', vocab: dict | None = None, **kwargs):
    self._examples = examples
    self._split = split
    self._vocab = vocab
    kwargs.setdefault('file_format', 'array_record')
    super().__init__(**kwargs)

  def download_and_prepare(self, *args, **kwargs):
    """tfds's own writer, then the entity index and ovseg_meta.json the input pipeline reads."""
    super().download_and_prepare(*args, **kwargs)
    if self._examples is not None:
      write_entity_index(self.data_dir, self._split)
      meta = read_meta(self.data_dir)
      if self._vocab is not None:
        meta['vocab'] = self._vocab
      meta.setdefault('splits', {})[self._split] = {'writer': 'tfds download_and_prepare'}
      write_json_atomic(os.path.join(self.data_dir, META_FILE), meta)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Image-caption pairs kept when the caption names an entity of the vocabulary '
                    '(OVSegmentor CC4M filter), with the entities found.',
        features=features(),
        homepage='https://github.com/Jazzcharles/OVSegmentor',
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._examples is None:
      raise ValueError(f'{self.name}: download_and_prepare() needs examples=...; large inputs are built with '
                       '`python -m ovseg_jax.data.build_cc4m --input ... --output DIR`')
    return {self._split: self._generate_examples(self._examples)}

  def _generate_examples(self, examples):
    yield from examples


class Cc4m(CaptionDataset):
  """CC12M filtered by the paper's 100 entities."""
  name = 'cc4m'


class SyntheticCaptions(CaptionDataset):
  """The embedded procedural shapes with captions (ovseg_jax.data.synthetic)."""
  name = 'synthetic_captions'


_CLASSES = {'cc4m': Cc4m, 'synthetic_captions': SyntheticCaptions}


def builder_class(name: str):
  """The builder class for a dataset name (other names get a subclass of `CaptionDataset`)."""
  if name not in _CLASSES:
    if not name.replace('_', '').isalnum() or not name[0].isalpha() or name.lower() != name:
      raise ValueError(f'dataset name {name!r} must be lower_snake_case (letters, digits, _)')
    camel = ''.join(p.capitalize() for p in name.split('_'))
    _CLASSES[name] = type(camel, (CaptionDataset,), {'name': name, '__doc__': CaptionDataset.__doc__})
  return _CLASSES[name]


def dataset_dir(data_dir: str, name: str) -> str:
  """`<data_dir>/<name>/<version>` (the directory `tfds.builder_from_directory` takes)."""
  return os.path.join(data_dir, name, _VERSION)


def shard_filename(name: str, split: str, index: int, num_shards: int) -> str:
  return f'{name}-{split}.array_record-{index:05d}-of-{num_shards:05d}'


def read_meta(version_dir: str) -> dict:
  path = os.path.join(version_dir, META_FILE)
  if not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.UsageError(f'{path} is unreadable ({type(e).__name__}: {e}); rebuild the dataset in '
                            f'{version_dir}') from None
  if not isinstance(meta, dict):
    raise errors.UsageError(f'{path} is not a JSON object; rebuild the dataset in {version_dir}')
  return meta


def write_json_atomic(path: str, obj) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def _info(version_dir: str):
  """The tfds DatasetInfo of `version_dir`; a damaged dataset_info.json / features.json is a UsageError."""
  try:
    return tfds.builder_from_directory(version_dir).info
  except Exception as e:  # pylint: disable=broad-except  (tfds raises json, protobuf and its own errors)
    detail = ' '.join(str(e).split())[:200]
    raise errors.UsageError(f'{version_dir}: dataset_info.json / features.json cannot be read '
                            f'({type(e).__name__}: {detail}); delete that folder and build the dataset '
                            'again') from None


def existing_splits(version_dir: str) -> dict:
  """split name -> tfds SplitInfo of a dataset already in `version_dir` ({} if none)."""
  if not os.path.exists(os.path.join(version_dir, 'dataset_info.json')):
    return {}
  return dict(_info(version_dir).splits.items())


def check_split(version_dir: str, split: str):
  """The split's tfds SplitInfo once every shard file is there and whole; else one UsageError line naming
  the dataset folder and the first bad file (deleted, emptied, truncated, or another record count).

  Opening an array_record file reads only its footer (~0.1 ms a file), so this runs before every read.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if not os.path.exists(os.path.join(version_dir, 'dataset_info.json')):
    raise errors.UsageError(f'{version_dir} holds no dataset (no dataset_info.json); build it with '
                            '`python -m ovseg_jax.data.build_cc4m --input ... --output DATA_DIR`')
  splits = existing_splits(version_dir)
  if split not in splits:
    raise errors.UsageError(f'{version_dir} has no split {split!r} (it has {sorted(splits)})')
  info = splits[split]
  hint = 'rebuild the split (build_cc4m / synthetic with --overwrite)'
  for path, expected in zip(info.filepaths, info.shard_lengths):
    path = os.fspath(path)
    fname = os.path.basename(path)
    if not os.path.isfile(path):
      raise errors.UsageError(f'dataset {version_dir}: shard file {fname} of split {split!r} is missing; '
                              f'{hint}')
    reader = array_record_module.ArrayRecordReader(path, 'readahead_buffer_size:0')
    ok, n = reader.ok(), reader.num_records()
    try:
      reader.close()
      problem = None if ok else 'unreadable'
    except Exception as e:  # pylint: disable=broad-except  (riegeli's RuntimeError names the damage)
      problem = ' '.join(str(e).split())[:160]
    if problem is None and n != expected:
      problem = f'{n} records, dataset_info.json says {expected}'
    if problem is not None:
      raise errors.UsageError(f'dataset {version_dir}: shard file {fname} of split {split!r} is truncated or '
                              f'damaged ({problem}); {hint}')
  return info


def open_source(version_dir: str, split: str, decoders=None):
  """`tfds.builder_from_directory(version_dir).as_data_source(split)` after `check_split`: a deleted or
  truncated shard is one UsageError line at open, not an error deep inside a read."""
  check_split(version_dir, split)
  return tfds.builder_from_directory(version_dir).as_data_source(split, decoders=decoders)


def remove_split(version_dir: str, name: str, split: str) -> None:
  """Deletes one split's shards, index and report (used by --overwrite)."""
  if not os.path.isdir(version_dir):
    return
  prefix = f'{name}-{split}.array_record-'
  for f in os.listdir(version_dir):
    if f.startswith(prefix) or f in (f'entity_index-{split}.npz', f'build_report-{split}.json'):
      os.remove(os.path.join(version_dir, f))


def _index_arrays(prefix: str, index: dict) -> dict:
  """{entity: [ids]} -> CSR arrays `<prefix>_names`, `<prefix>_offsets`, `<prefix>_ids`."""
  names = sorted(index)
  offsets = np.zeros(len(names) + 1, np.int64)
  ids = []
  for i, n in enumerate(names):
    v = index[n]
    ids.append(np.sort(np.concatenate(v).astype(np.int64) if v and isinstance(v[0], np.ndarray)
                       else np.asarray(v, np.int64)))
    offsets[i + 1] = offsets[i] + len(ids[-1])
  return {f'{prefix}_names': np.asarray(names, dtype=str), f'{prefix}_offsets': offsets,
          f'{prefix}_ids': np.concatenate(ids) if ids else np.zeros(0, np.int64)}


def write_entity_index(version_dir: str, split: str) -> None:
  """Scans a split's records and writes `entity_index-<split>.npz` (the shard writers build it on the fly)."""
  source = tfds.builder_from_directory(version_dir).as_data_source(
      split, decoders={'image': tfds.decode.SkipDecoding()})
  canonical, surface = {}, {}
  for i in range(len(source)):
    rec = source[i]
    for dst, field in ((canonical, 'canonical'), (surface, 'entities')):
      for e in rec[field]:
        dst.setdefault(e.decode('utf-8') if isinstance(e, bytes) else str(e), []).append(i)
  np.savez(os.path.join(version_dir, f'entity_index-{split}.npz'),
           **_index_arrays('canonical', canonical), **_index_arrays('surface', surface))


def load_entity_index(version_dir: str, split: str, kind: str = 'canonical') -> dict:
  """{entity: int64 [n] example ids} of a split; kind 'canonical' or 'surface'."""
  path = os.path.join(version_dir, f'entity_index-{split}.npz')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing; rebuild the dataset with '
                            '`python -m ovseg_jax.data.build_cc4m`')
  try:
    with np.load(path, allow_pickle=False) as z:
      names, offsets, ids = z[f'{kind}_names'], z[f'{kind}_offsets'], z[f'{kind}_ids']
  except Exception as e:  # pylint: disable=broad-except  (zipfile / numpy errors of a damaged file)
    raise errors.UsageError(f'dataset {version_dir}: {os.path.basename(path)} is unreadable '
                            f'({type(e).__name__}: {e}); rebuild the split') from None
  return {str(n): ids[offsets[i]:offsets[i + 1]] for i, n in enumerate(names)}


def finalize_split(*, data_dir: str, name: str, split: str, parts: list, meta: dict, report: dict) -> str:
  """Moves finished shard files into tfds's layout and registers the split in dataset_info.json.

  parts: in shard order, dicts with `path` (an array_record file), `num_examples`, `num_bytes`,
    `canonical` / `surface` ({entity: [local ids]}). Empty parts are dropped.
  meta: written to ovseg_meta.json (vocabulary, entity mode); the split's report goes under meta['splits'].
  Returns the dataset directory for `tfds.builder_from_directory`.
  """
  builder = builder_class(name)(data_dir=data_dir)
  vdir = builder.data_dir
  os.makedirs(vdir, exist_ok=True)
  parts = [p for p in parts if p['num_examples'] > 0]
  old = read_meta(vdir)
  if old and old.get('vocab') and old.get('vocab') != meta.get('vocab'):
    raise ValueError(f'{vdir} holds splits built with entity vocabulary {old["vocab"]["name"]!r}; '
                     f'write {meta["vocab"]["name"]!r} data to another --output or dataset name')
  if not parts:
    raise ValueError(f'no record of split {split!r} was kept (every record was dropped): nothing to register')
  splits = existing_splits(vdir)
  remove_split(vdir, name, split)  # also the leftovers of a run killed while finalizing
  canonical, surface, offset, lengths, num_bytes = {}, {}, 0, [], 0
  for i, p in enumerate(parts):
    shutil.move(p['path'], os.path.join(vdir, shard_filename(name, split, i, len(parts))))
    for dst, src in ((canonical, p['canonical']), (surface, p['surface'])):
      for ent, ids in src.items():  # numpy chunks: the index of millions of records stays compact
        dst.setdefault(ent, []).append(offset + np.asarray(ids, np.int64))
    offset += p['num_examples']
    lengths.append(p['num_examples'])
    num_bytes += p['num_bytes']
  np.savez(os.path.join(vdir, f'entity_index-{split}.npz'),
           **_index_arrays('canonical', canonical), **_index_arrays('surface', surface))
  template = tfds.core.ShardedFileTemplate(data_dir=vdir, dataset_name=name, split=split,
                                           filetype_suffix='array_record')
  splits[split] = tfds.core.SplitInfo(name=split, shard_lengths=lengths, num_bytes=num_bytes,
                                      filename_template=template)
  if str(getattr(builder.info.file_format, 'value', builder.info.file_format)) != 'array_record':
    builder.info.set_file_format('array_record', override=True)
  builder.info.set_splits(tfds.core.SplitDict(list(splits.values())))
  builder.info.write_to_directory(vdir)
  merged = dict(old, **{k: v for k, v in meta.items() if k != 'splits'})
  merged.setdefault('splits', {})[split] = report
  write_json_atomic(os.path.join(vdir, META_FILE), merged)
  write_json_atomic(os.path.join(vdir, f'build_report-{split}.json'), report)
  return vdir
