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
tfds split (see shard_writer.py for the filtering rules).

No input record stops the build or a rerun: the readers pass each problem they find on as a counted reason
(build_report.py lists them): a repeated key, a .json caption that is not a string or a .json that does not
parse, a caption over 16 KiB (csv's own 128 KiB field limit is never reached), a CSV quote that never closes
(the row is dropped, the rows after it are read: none is swallowed), a truncated or damaged tar. The build
ends with exit code 0 and the report (kept / dropped by reason with example locations, warnings, caption
token-length histogram and suggested text padding buckets) printed and written to
OUTPUT/NAME/1.0.0/build_report-SPLIT.json. Exit code 2 with one `error:` line: missing inputs, bad flags, an
--output that cannot be a folder, or no record kept (the report is written first and named).
"""

import csv
import glob
import json
import os
import re
import sys
import tarfile
import zlib

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
_CAPS = {'txt': shard_writer.MAX_CAPTION_BYTES, 'json': shard_writer.MAX_JSON_BYTES}


def _split_key(name: str):
  base = os.path.basename(name)
  if '.' not in base:
    return None, None
  stem, ext = base.split('.', 1)
  return os.path.join(os.path.dirname(name), stem), ext.lower()


def _role(ext: str):
  """'image', 'txt', 'json', or None for a member this builder does not read."""
  return 'image' if ext in IMAGE_EXTS else ext if ext in _CAPS else None


def _cap(role: str) -> int:
  return shard_writer.MAX_IMAGE_BYTES if role == 'image' else _CAPS[role]


def _read_file(path: str, role: str):
  """bytes, TooLarge (not read), None (no such file) or the OSError of a file that cannot be read."""
  try:
    size = os.path.getsize(path)
    if size > _cap(role):
      return shard_writer.TooLarge(size)
    with open(path, 'rb') as fh:
      return fh.read()
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:  # a folder, no permission, an I/O error, a NUL in the path
    return OSError(f'{path}: {type(e).__name__}: {e}')


def _json_caption(data):
  """The `caption` of an img2dataset .json member -> (caption, None) or (None, reason)."""
  if isinstance(data, shard_writer.TooLarge):
    return None, 'invalid_json'
  try:
    obj = json.loads(data.decode('utf-8-sig'))
  except UnicodeDecodeError:
    return None, 'undecodable_text'
  except (ValueError, RecursionError):
    return None, 'invalid_json'
  if not isinstance(obj, dict):
    return None, 'invalid_json'
  if 'caption' not in obj:
    return None, None                     # no caption: empty_caption
  if not isinstance(obj['caption'], str):
    return None, 'caption_not_text'       # a number, null, a list, an object
  return obj['caption'], None


def _record(key: str, members: dict, where: str) -> shard_writer.RawRecord:
  """One record from {role: data} of one webdataset / files key (.txt wins over the .json's caption)."""
  bad = next((d for d in members.values() if isinstance(d, OSError)), None)
  if bad is not None:
    return shard_writer.RawRecord(key, None, None, reason='unreadable_file', where=where, detail=str(bad))
  caption, reason = members.get('txt'), None
  if caption is None and 'json' in members:
    caption, reason = _json_caption(members['json'])
  return shard_writer.RawRecord(key, members.get('image'), caption, reason=reason, where=where)


def _records_of_key(key: str, members: list, seen: set, where: str):
  """[(role, data)] of one key, in input order -> its record, and one duplicate_key record when the key was
  already seen in this shard or holds a second member of one role (the first of each role is kept)."""
  first, extra = {}, 0
  for role, data in members:
    if role in first:
      extra += 1
    else:
      first[role] = data
  rec = _record(os.path.basename(key), first, where)
  if key in seen:
    rec.reason, rec.detail = 'duplicate_key', f'{where}: key seen before in this shard'
    yield rec
    return
  seen.add(key)
  yield rec
  if extra:
    yield shard_writer.RawRecord(os.path.basename(key), None, None, reason='duplicate_key', where=where,
                                 detail=f'{where}: a second image or caption member of this key')


def _broken(path: str, where: str, detail: str) -> shard_writer.RawRecord:
  return shard_writer.RawRecord('', None, None, reason='unreadable_input', where=where,
                                detail=f'{path}: {detail}; the rest of this shard is not read')


_COMPRESSED = (b'\x1f\x8b', b'BZh', b'\xfd7zXZ', b'\x28\xb5\x2f\xfd')


def _tail_is_zero(f, offset: int) -> bool:
  """Whether everything after `offset` is zero (a tar's end blocks) rather than unread members."""
  f.seek(offset)
  while chunk := f.read(1 << 16):
    if chunk.count(0) != len(chunk):
      return False
  return True


def iter_tar(path: str):
  """Streams a webdataset tar: consecutive members sharing a key form one record.

  A member cut short, a damaged header or a file that is no tar ends the shard with one unreadable_input
  record that says where (tarfile stops silently at a damaged header: the unread tail is checked).
  """
  seen, key, members, where, reading = set(), None, [], path, None
  name = os.path.basename(path)
  with open(path, 'rb') as raw:
    compressed = raw.read(6).startswith(_COMPRESSED)
    raw.seek(0)
    try:
      with tarfile.open(fileobj=raw, mode='r|*') as tar:
        for m in tar:
          k, ext = _split_key(m.name) if m.isfile() else (None, None)
          role = _role(ext) if k is not None else None
          if role is None:
            continue
          if k != key:
            if key is not None:
              yield from _records_of_key(key, members, seen, where)
            key, members, where = k, [], f'{name}:{os.path.basename(k)}'
          reading = m.name
          data = shard_writer.TooLarge(m.size) if m.size > _cap(role) else tar.extractfile(m).read()
          members.append((role, data))
          reading = None
        end = tar.offset
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as e:
      if reading is None and key is not None:
        yield from _records_of_key(key, members, seen, where)
      at = f'member {reading}' if reading else (f'after member key {os.path.basename(key)}' if key else
                                                'its start')
      yield _broken(path, f'{name}:{os.path.basename(key) if key else ""}',
                    f'unreadable at {at} ({type(e).__name__}: {e})')
      return
    if key is not None:
      yield from _records_of_key(key, members, seen, where)
    if not compressed and not _tail_is_zero(raw, end):
      size = os.path.getsize(path)
      yield _broken(path, f'{name}:byte {end}', f'stops at byte {end} of {size} (a damaged or truncated member '
                    'header)')


def iter_files(folder: str):
  """An img2dataset "files" subfolder: <key>.jpg + <key>.txt/.json, in key order."""
  groups = {}
  for f in sorted(os.listdir(folder)):
    k, ext = _split_key(f)
    if k is not None and _role(ext) is not None:
      groups.setdefault(k, []).append((_role(ext), f))
  seen = set()
  for k in sorted(groups):
    members = [(role, _read_file(os.path.join(folder, f), role)) for role, f in groups[k]]
    yield from _records_of_key(k, [(r, d) for r, d in members if d is not None], seen,
                               os.path.join(folder, k))


# A table row is one line, or a CSV record whose quoted field goes on over the next lines. A quote that does
# not close within _MAX_QUOTED_LINES lines, or before a line that reads as a row of its own, or whose record
# is not valid CSV, is unterminated: that line alone is the (dropped) record and reading goes on after it, so
# no row is swallowed.
_MAX_ROW_BYTES = shard_writer.MAX_CAPTION_BYTES + 8192   # a caption and an image path
_MAX_QUOTED_LINES = 16
_BOM = b'\xef\xbb\xbf'


def _read_line(f):
  """(line bytes, too_long): a line over _MAX_ROW_BYTES is skipped without being held in memory."""
  line = f.readline(_MAX_ROW_BYTES + 1)
  if len(line) <= _MAX_ROW_BYTES:
    return line, False
  while line and not line.endswith(b'\n'):
    line = f.readline(1 << 20)
  return b'<over %d bytes>\n' % _MAX_ROW_BYTES, True


def _looks_like_row(line: bytes, delim: str, img_col: int, columns: int) -> bool:
  """A line that is a table row on its own: enough fields and a path-like image field."""
  fields = line.rstrip(b'\r\n').split(delim.encode())
  if len(fields) < columns:
    return False
  image = fields[img_col].strip().strip(b'"')
  return bool(image) and not any(c in image for c in b' \t') and (b'.' in image or b'/' in image)


def _quote_open(record: bytes) -> bool:
  """Whether a quoted CSV field is still open at the end of `record`, as the csv module reads it (a quote
  inside an unquoted field opens nothing)."""
  if b'"' not in record:
    return False
  reader = csv.reader([record.decode('utf-8', 'surrogateescape'), ''])
  try:
    next(reader)
  except (csv.Error, StopIteration):
    return False
  return reader.line_num > 1      # the row went on into the next line


def _valid_csv(record: bytes) -> bool:
  try:
    rows = list(csv.reader([record.decode('utf-8', 'surrogateescape').rstrip('\r\n')], strict=True))
  except csv.Error:
    return False
  return len(rows) == 1


def _table_rows(f, delim: str, img_col: int, columns: int, line_no: int):
  """Yields (byte offset, line number, record bytes, problem) from f's position; problem is None,
  'caption_too_long' or 'unterminated_quote'. Blank lines are no records."""
  while True:
    pos = f.tell()
    line, too_long = _read_line(f)
    if not line:
      return
    start, line_no = line_no, line_no + 1
    if too_long:
      yield pos, start, line, 'caption_too_long'
      continue
    if not line.strip():
      continue
    if delim != ',' or not _quote_open(line):
      yield pos, start, line, None
      continue
    after, parts, size, closed = f.tell(), [line], len(line), False
    while len(parts) < _MAX_QUOTED_LINES and size <= _MAX_ROW_BYTES:
      more, too_long = _read_line(f)
      if not more or too_long or _looks_like_row(more, delim, img_col, columns):
        break
      parts.append(more)
      size += len(more)
      if not _quote_open(b''.join(parts)):
        closed = True
        break
    record = b''.join(parts)
    if closed and size <= _MAX_ROW_BYTES and _valid_csv(record):
      line_no = start + len(parts)
      yield pos, start, record, None
    else:
      f.seek(after)
      yield pos, start, line, 'unterminated_quote'


def _table_format(path: str):
  """(delimiter, image_col, caption_col, has_header) of a TSV/CSV."""
  delim = '\t' if path.lower().endswith(('.tsv', '.tsv.txt')) else ','
  with open(path, 'rb') as f:
    line, too_long = _read_line(f)
  text = '' if too_long else line.decode('utf-8', 'replace').lstrip('\ufeff').rstrip('\r\n')
  if not line.strip():
    raise errors.UsageError(f'--input {path} is empty' if not line else
                            f'--input {path}: the first line is blank (expected a header or a row)')
  try:
    first = next(csv.reader([text], delimiter=delim), [])
  except csv.Error:
    first = text.split(delim)
  low = [c.strip().lower() for c in first]
  img = next((low.index(c) for c in _IMAGE_COLS if c in low), None)
  cap = next((low.index(c) for c in _CAPTION_COLS if c in low), None)
  if img is not None and cap is not None:
    return delim, img, cap, True
  if len(first) < 2 and not too_long:
    raise errors.UsageError(f'--input {path}: expected two columns (image path, caption) separated by {delim!r}')
  return delim, 0, 1, False


def _table_row_offsets(path: str, delim: str, has_header: bool, shard_size: int, img_col: int, columns: int):
  """Byte offsets, first line numbers and row counts of every shard_size rows (one streaming pass)."""
  starts, lines, counts = [], [], []
  with open(path, 'rb') as f:
    line_no = 1
    if has_header:
      _read_line(f)
      line_no = 2
    for n, (pos, start, _, _) in enumerate(_table_rows(f, delim, img_col, columns, line_no)):
      if n % shard_size == 0:
        starts.append(pos)
        lines.append(start)
        counts.append(0)
      counts[-1] += 1
  return starts, lines, counts


def iter_table(task: shard_writer.Task):
  """The task's rows as RawRecords: key = the image path; `where` = file:line."""
  delim, img_col, cap_col, root, first_line, columns = task.args
  # TSV fields are taken verbatim (captions may hold quotes); CSV uses standard quoting
  quoting = csv.QUOTE_NONE if delim == '\t' else csv.QUOTE_MINIMAL
  name, seen = os.path.basename(task.path), set()
  with open(task.path, 'rb') as f:
    f.seek(task.start)
    rows = _table_rows(f, delim, img_col, columns, first_line)
    for _, (pos, line_no, raw, problem) in zip(range(task.count), rows):
      where = f'{name}:{line_no}'
      if problem:
        detail = (f'{task.path} line {line_no}: a quote opened in this row never closes; the row is skipped '
                  'and the lines after it are read as rows' if problem == 'unterminated_quote' else '')
        yield shard_writer.RawRecord(f'line{line_no}', None, None, reason=problem, where=where, detail=detail)
        continue
      if pos == 0 and raw.startswith(_BOM):
        raw = raw[len(_BOM):]
      # undecodable bytes survive as surrogates: a path still opens, a caption is counted undecodable_text
      text = raw.decode('utf-8', 'surrogateescape').rstrip('\r\n')
      try:
        row = next(csv.reader([text], delimiter=delim, quoting=quoting), [])
      except csv.Error:
        row = []
      if len(row) <= max(img_col, cap_col):
        yield shard_writer.RawRecord(f'line{line_no}', None, None, reason='malformed_row', where=where)
        continue
      rel, caption = row[img_col].strip(), row[cap_col].encode('utf-8', 'surrogateescape')
      if (rel, caption) in seen:
        yield shard_writer.RawRecord(rel, None, None, reason='duplicate_key', where=where)
        continue
      seen.add((rel, caption))
      image = _read_file(rel if os.path.isabs(rel) else os.path.join(root, rel), 'image') if rel else None
      if isinstance(image, OSError):
        yield shard_writer.RawRecord(rel, None, None, reason='unreadable_file', where=where, detail=str(image))
        continue
      yield shard_writer.RawRecord(rel or f'line{line_no}', image, caption, where=where)


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
  """Expands --input paths/globs into ordered tasks (one per output shard). A path given twice (e.g. by two
  overlapping globs) is read once: its records would otherwise be built twice."""
  tasks, given = [], set()
  for spec in inputs:
    paths = sorted(glob.glob(spec)) if any(c in spec for c in '*?[') else [spec]
    if not paths:
      raise errors.UsageError(f'--input {spec} matches no file')
    for p in paths:
      if not os.path.exists(p):
        raise errors.UsageError(f'--input {p} does not exist')
      if os.path.realpath(p) in given:
        continue
      given.add(os.path.realpath(p))
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
  columns = max(img_col, cap_col) + 1
  starts, lines, counts = _table_row_offsets(path, delim, header, shard_size, img_col, columns)
  root = image_root or os.path.dirname(os.path.abspath(path))
  return [('table', path, s, c, (delim, img_col, cap_col, root, n, columns))
          for s, n, c in zip(starts, lines, counts)]


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
  flags.DEFINE_integer('max_pixels', 0, 'pixel budget: larger images are dropped (image_too_large) before '
                       'decoding; 0: the project default (ovseg_jax/images.py, $OVSEG_MAX_PIXELS)', flag_values=fv)
  flags.DEFINE_integer('shard_size', 10000, 'rows per shard for TSV/CSV inputs', flag_values=fv)
  flags.DEFINE_string('image_root', None, 'base of relative image paths in a TSV/CSV', flag_values=fv)
  flags.DEFINE_enum('entity_mode', 'fixed', ['fixed', 'official'], 'entity extraction (data/entities.py)',
                    flag_values=fv)
  flags.DEFINE_enum('lemmatizer', 'rules', ['rules', 'wordnet'], 'plural -> singular', flag_values=fv)
  flags.DEFINE_enum('vocab', 'cc4m', sorted(entities_lib.VOCABULARIES), 'entity vocabulary', flag_values=fv)
  flags.DEFINE_bool('overwrite', False, 'rebuild the split from scratch', flag_values=fv)
  a = cli.parse(fv, argv, prog='python -m ovseg_jax.data.build_cc4m', doc=__doc__, required=('input', 'output'))
  try:
    if a.shard_size <= 0 or a.max_side <= 0 or a.min_side < 0 or a.max_pixels < 0:
      raise errors.UsageError('--shard_size and --max_side must be positive, --min_side and --max_pixels >= 0')
    if a.min_side > a.max_side:
      raise errors.UsageError(f'--min_side {a.min_side} is larger than --max_side {a.max_side}')
    if not re.fullmatch(r'[A-Za-z0-9_]+', a.split):
      raise errors.UsageError(f'--split {a.split!r} must be letters, digits and _')
    try:
      tfds_builder.builder_class(a.name)
    except ValueError as e:
      raise errors.UsageError(f'--name: {e}') from None
    if a.image_root is not None and not os.path.isdir(a.image_root):
      raise errors.UsageError(f'--image_root {a.image_root} is not a folder')
    shard_writer.check_output(a.output)
    opts = shard_writer.Options(max_side=a.max_side, min_side=a.min_side, vocab=a.vocab,
                                entity_mode=a.entity_mode, lemmatizer=a.lemmatizer, max_pixels=a.max_pixels)
    entities_lib.get_extractor(a.vocab, a.entity_mode, a.lemmatizer)  # fail fast (e.g. WordNet missing)
    tasks = discover_tasks(a.input, a.shard_size, a.image_root)
    if not tasks:
      raise errors.UsageError(f'--input {" ".join(a.input)}: no record to read (the tables have no rows)')
    print(f'{len(tasks)} input shards, {a.num_workers} worker processes -> '
          f'{tfds_builder.dataset_dir(a.output, a.name)}', file=sys.stderr)
    report = shard_writer.run_build(tasks, iter_task, output=a.output, name=a.name, split=a.split, opts=opts,
                                    num_workers=a.num_workers, overwrite=a.overwrite)
  except KeyboardInterrupt:
    print(f'\ninterrupted: finished shards are kept in {os.path.join(a.output, a.name, "_build_" + a.split)}; '
          'rerun the same command to resume', file=sys.stderr)
    return 130
  except (errors.UsageError, RuntimeError, ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(shard_writer.format_report(report))
  path = os.path.join(report['dataset_dir'], f'build_report-{a.split}.json')
  print(f'dataset: {report["dataset_dir"]}' + (f'  (report: {path})' if os.path.exists(path) else ''))
  return 0


if __name__ == '__main__':
  sys.exit(main())
