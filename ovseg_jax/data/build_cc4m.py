"""CC12M -> CC4M: filter image-caption pairs by the entity set and write the tfds array_record dataset.

  python -m ovseg_jax.data.build_cc4m --input /data/cc12m_wds --output /data/tfds \
      [--num_workers 8 --max_side 512 --min_side 64 --shard_size 10000 --entity_mode fixed]

Inputs (one or more --input, each a path or a glob):
  * img2dataset webdataset shards: `*.tar` with `<key>.jpg` + `<key>.txt` (or a `caption` in `<key>.json`);
  * img2dataset "files" folders: `<dir>/00000/<key>.jpg|.txt|.json` (one output shard per subfolder);
  * a TSV/CSV of (image path, caption): a header naming the columns (image/image_path/filepath/image_id/
    file and caption/text) or, without a header, image in column 0 and caption in column 1; relative image
    paths are resolved against --image_root (default: the table's folder).

Each input shard (a tar, a subfolder, `--shard_size` table rows) is one task; this module discovers the tasks
and reads their records (`iter_task`), and `shard_writer.run_build` filters them by the entity set (paper
Sec. 3.1.2), writes one array_record file per task in a process pool, resumes after a kill and registers the
tfds split (see shard_writer.py for the filtering rules and the dropped-record reasons).
"""

import csv
import glob
import json
import os
import sys
import tarfile

from absl import flags

from ovseg_jax import cli
from ovseg_jax import errors
from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import shard_writer
from ovseg_jax.data import tfds_builder

IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp')
_IMAGE_COLS = ('image', 'image_path', 'filepath', 'image_id', 'file', 'path', 'filename', 'img')
_CAPTION_COLS = ('caption', 'text', 'captions', 'title')


# ----------------------------------------------------------------------------------------------- readers
def _split_key(name: str):
  base = os.path.basename(name)
  if '.' not in base:
    return None, None
  stem, ext = base.split('.', 1)
  return os.path.join(os.path.dirname(name), stem), ext.lower()


def _record_from_members(key: str, members: dict) -> shard_writer.RawRecord:
  """Builds a record from {ext: bytes} of one webdataset/files key."""
  image = next((members[e] for e in IMAGE_EXTS if e in members), None)
  caption = members.get('txt')
  if caption is None and 'json' in members:
    try:
      caption = json.loads(members['json'].decode('utf-8')).get('caption')
    except (UnicodeDecodeError, ValueError, AttributeError):
      caption = b'\xff'  # the caption exists but cannot be read: counted as undecodable text
  return shard_writer.RawRecord(os.path.basename(key), image, caption)


def iter_tar(path: str):
  """Streams a webdataset tar: consecutive members sharing a key form one record."""
  key, members = None, {}
  with tarfile.open(path, mode='r|*') as tar:
    for m in tar:
      if not m.isfile():
        continue
      k, ext = _split_key(m.name)
      if k is None:
        continue
      if k != key and key is not None:
        yield _record_from_members(key, members)
        members = {}
      key = k
      members[ext] = tar.extractfile(m).read()
  if key is not None:
    yield _record_from_members(key, members)


def iter_files(folder: str):
  """An img2dataset "files" subfolder: <key>.jpg + <key>.txt/.json, in key order."""
  groups = {}
  for f in os.listdir(folder):
    k, ext = _split_key(f)
    if k is not None and (ext in IMAGE_EXTS or ext in ('txt', 'json')):
      groups.setdefault(k, []).append(ext)
  for k in sorted(groups):
    members = {}
    for ext in groups[k]:
      with open(os.path.join(folder, f'{k}.{ext}'), 'rb') as fh:
        members[ext] = fh.read()
    yield _record_from_members(k, members)


def _table_format(path: str):
  """(delimiter, image_col, caption_col, has_header) of a TSV/CSV."""
  delim = '\t' if path.lower().endswith(('.tsv', '.tsv.txt')) else ','
  with open(path, newline='', encoding='utf-8', errors='replace') as f:
    first = next(csv.reader(f, delimiter=delim), None)
  if not first:
    raise errors.UsageError(f'--input {path} is empty')
  low = [c.strip().lower() for c in first]
  img = next((low.index(c) for c in _IMAGE_COLS if c in low), None)
  cap = next((low.index(c) for c in _CAPTION_COLS if c in low), None)
  if img is not None and cap is not None:
    return delim, img, cap, True
  if len(first) < 2:
    raise errors.UsageError(f'--input {path}: expected two columns (image path, caption) separated by {delim!r}')
  return delim, 0, 1, False


def _table_row_offsets(path: str, delim: str, has_header: bool, shard_size: int):
  """Byte offsets of every shard_size-th row and the row counts (one streaming pass, quoted newlines ok)."""
  starts, counts = [], []
  with open(path, 'rb') as f:
    if has_header:
      _read_row_bytes(f, delim)
    n = 0
    while True:
      pos = f.tell()
      row = _read_row_bytes(f, delim)
      if not row:
        break
      if n % shard_size == 0:
        starts.append(pos)
        counts.append(0)
      counts[-1] += 1
      n += 1
  return starts, counts


def _read_row_bytes(f, delim: str) -> bytes:
  """One CSV record's bytes: continues over newlines inside double quotes (CSV only)."""
  line = f.readline()
  if delim == ',':
    while line.count(b'"') % 2 == 1:
      more = f.readline()
      if not more:
        break
      line += more
  return line


def iter_table(task: shard_writer.Task):
  delim, img_col, cap_col, root = task.args
  with open(task.path, 'rb') as f:
    f.seek(task.start)
    for i in range(task.count):
      raw = _read_row_bytes(f, delim)
      try:
        text = raw.decode('utf-8')
      except UnicodeDecodeError:
        text = None
      # TSV fields are taken verbatim (captions may hold quotes); CSV uses standard quoting
      quoting = csv.QUOTE_NONE if delim == '\t' else csv.QUOTE_MINIMAL
      row = next(csv.reader([text.rstrip('\r\n')], delimiter=delim, quoting=quoting), []) \
          if text is not None else []
      if text is None or len(row) <= max(img_col, cap_col):
        # the image path can still be recovered from the raw bytes; the caption cannot
        fields = raw.split(delim.encode())
        rel = fields[img_col].decode('utf-8', 'replace').strip() if len(fields) > img_col else ''
        caption = b'\xff' if text is None else None
      else:
        rel, caption = row[img_col].strip(), row[cap_col]
      path = rel if os.path.isabs(rel) else os.path.join(root, rel)
      image = None
      if rel and os.path.isfile(path):
        with open(path, 'rb') as fh:
          image = fh.read()
      yield shard_writer.RawRecord(rel or f'row{task.start}+{i}', image, caption)


def iter_task(task: shard_writer.Task):
  """The shard writer's reader for the tasks of `discover_tasks`: -> the task's RawRecords."""
  if task.kind == 'tar':
    return iter_tar(task.path)
  if task.kind == 'files':
    return iter_files(task.path)
  if task.kind == 'table':
    return iter_table(task)
  raise ValueError(f'unknown task kind {task.kind!r}')


def discover_tasks(inputs, shard_size: int, image_root: str | None = None) -> list:
  """Expands --input paths/globs into ordered tasks (one per output shard)."""
  tasks = []
  for spec in inputs:
    paths = sorted(glob.glob(spec)) if any(c in spec for c in '*?[') else [spec]
    if not paths:
      raise errors.UsageError(f'--input {spec} matches no file')
    for p in paths:
      if not os.path.exists(p):
        raise errors.UsageError(f'--input {p} does not exist')
      if os.path.isdir(p):
        tars = sorted(f for f in os.listdir(p) if f.endswith('.tar'))
        tables = sorted(f for f in os.listdir(p) if f.lower().endswith(('.tsv', '.csv')))
        subdirs = sorted(d for d in os.listdir(p) if os.path.isdir(os.path.join(p, d)))
        if tars:
          tasks += [('tar', os.path.join(p, f), 0, 0, ()) for f in tars]
        elif tables:
          for f in tables:
            tasks += _table_tasks(os.path.join(p, f), shard_size, image_root)
        else:
          has_files = any(_split_key(f)[1] in IMAGE_EXTS + ('txt',) for f in os.listdir(p))
          dirs = ([p] if has_files else []) + [os.path.join(p, d) for d in subdirs]
          if not dirs:
            raise errors.UsageError(f'--input {p} holds no .tar shards, TSV/CSV or img2dataset files folders')
          tasks += [('files', d, 0, 0, ()) for d in dirs]
      elif p.endswith('.tar'):
        tasks.append(('tar', p, 0, 0, ()))
      elif p.lower().endswith(('.tsv', '.csv', '.txt')):
        tasks += _table_tasks(p, shard_size, image_root)
      else:
        raise errors.UsageError(f'--input {p}: expected a .tar shard, a .tsv/.csv table or a folder')
  return [shard_writer.Task(i, *t) for i, t in enumerate(tasks)]


def _table_tasks(path: str, shard_size: int, image_root: str | None):
  delim, img_col, cap_col, header = _table_format(path)
  starts, counts = _table_row_offsets(path, delim, header, shard_size)
  root = image_root or os.path.dirname(os.path.abspath(path))
  return [('table', path, s, c, (delim, img_col, cap_col, root)) for s, c in zip(starts, counts)]


# ----------------------------------------------------------------------------------------------- CLI
@cli.entry_point
def main(argv=None) -> int:
  fv = flags.FlagValues()
  flags.DEFINE_multi_string('input', [], 'tar shard(s), a files folder, a TSV/CSV, a folder of these, or a glob',
                            flag_values=fv)
  flags.DEFINE_string('output', None, 'tfds data_dir; the dataset goes to OUTPUT/NAME/1.0.0', flag_values=fv)
  flags.DEFINE_string('name', 'cc4m', 'tfds dataset name (config.data.dataset)', flag_values=fv)
  flags.DEFINE_string('split', 'train', 'split name', flag_values=fv)
  flags.DEFINE_integer('num_workers', os.cpu_count() or 1, 'worker processes', flag_values=fv)
  flags.DEFINE_integer('max_side', 512, 'longer side above which images are re-encoded', flag_values=fv)
  flags.DEFINE_integer('min_side', 64, 'images with a shorter side below this are dropped', flag_values=fv)
  flags.DEFINE_integer('shard_size', 10000, 'rows per shard for TSV/CSV inputs', flag_values=fv)
  flags.DEFINE_string('image_root', None, 'base of relative image paths in a TSV/CSV', flag_values=fv)
  flags.DEFINE_enum('entity_mode', 'fixed', ['fixed', 'official'], 'entity extraction (data/entities.py)',
                    flag_values=fv)
  flags.DEFINE_enum('lemmatizer', 'rules', ['rules', 'wordnet'], 'plural -> singular', flag_values=fv)
  flags.DEFINE_enum('vocab', 'cc4m', sorted(entities_lib.VOCABULARIES), 'entity vocabulary', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'rebuild the split from scratch', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m ovseg_jax.data.build_cc4m', doc=__doc__, required=('input', 'output'))
  try:
    if a.shard_size <= 0 or a.max_side <= 0 or a.min_side < 0:
      raise errors.UsageError('--shard_size and --max_side must be positive, --min_side >= 0')
    if a.min_side > a.max_side:
      raise errors.UsageError(f'--min_side {a.min_side} is larger than --max_side {a.max_side}')
    opts = shard_writer.Options(max_side=a.max_side, min_side=a.min_side, vocab=a.vocab,
                                entity_mode=a.entity_mode, lemmatizer=a.lemmatizer)
    entities_lib.get_extractor(a.vocab, a.entity_mode, a.lemmatizer)  # fail fast (e.g. WordNet missing)
    tasks = discover_tasks(a.input, a.shard_size, a.image_root)
    print(f'{len(tasks)} input shards, {a.num_workers} worker processes -> '
          f'{tfds_builder.dataset_dir(a.output, a.name)}', file=sys.stderr)
    report = shard_writer.run_build(tasks, iter_task, output=a.output, name=a.name, split=a.split, opts=opts,
                                    num_workers=a.num_workers, overwrite=a.overwrite)
  except (errors.UsageError, RuntimeError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(shard_writer.format_report(report))
  print(f'dataset: {report["dataset_dir"]}  (report: build_report-{a.split}.json)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
