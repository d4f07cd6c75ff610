"""CC12M -> CC4M: filter image-caption pairs by the entity set and write the tfds array_record dataset.

  python -m ovseg_jax.data.build_cc4m --input /data/cc12m_wds --output /data/tfds \
      [--num_workers 8 --max_side 512 --min_side 64 --shard_size 10000 --entity_mode fixed]

Inputs (one or more --input, each a path or a glob):
  * img2dataset webdataset shards: `*.tar` with `<key>.jpg` + `<key>.txt` (or a `caption` in `<key>.json`);
  * img2dataset "files" folders: `<dir>/00000/<key>.jpg|.txt|.json` (one output shard per subfolder);
  * a TSV/CSV of (image path, caption): a header naming the columns (image/image_path/filepath/image_id/
    file and caption/text) or, without a header, image in column 0 and caption in column 1; relative image
    paths are resolved against --image_root (default: the table's folder).

Each input shard (a tar, a subfolder, `--shard_size` table rows) is one task of a process pool. A task
streams its records (memory stays flat), keeps a record when its caption names an entity (paper Sec. 3.1.2,
`entities.py`), keeps the JPEG bytes when the longest side is within --max_side (else re-encodes to it), and
writes one array_record file with tfds's serialization. A finished task leaves a marker, so a restart skips
it. When all are done the shards are registered as the tfds split and the entity -> example index is written
(`tfds_builder.py`). Dropped records are counted by reason, in this order of precedence:
missing_image, undecodable_text, empty_caption, no_entity, corrupt_image, image_too_small.
"""

import argparse
import csv
import dataclasses
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import sys
import tarfile
import time

from PIL import Image

from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import tfds_builder

REASONS = ('missing_image', 'undecodable_text', 'empty_caption', 'no_entity', 'corrupt_image',
           'image_too_small')
IMAGE_EXTS = ('jpg', 'jpeg', 'png', 'webp', 'bmp')
_IMAGE_COLS = ('image', 'image_path', 'filepath', 'image_id', 'file', 'path', 'filename', 'img')
_CAPTION_COLS = ('caption', 'text', 'captions', 'title')


class UsageError(ValueError):
  """A problem with the command line or the inputs; printed as one `error: ...` line."""


@dataclasses.dataclass
class RawRecord:
  """One input record before filtering. image/caption are None when the input has none."""
  key: str
  image: bytes | None
  caption: bytes | str | None


@dataclasses.dataclass(frozen=True)
class Task:
  """One input shard -> one output shard. kind: 'tar' | 'files' | 'table' | 'synthetic'."""
  index: int
  kind: str
  path: str
  start: int = 0            # table: byte offset of the first row; synthetic: first image index
  count: int = 0            # table: rows; synthetic: images
  args: tuple = ()          # table: (delimiter, image_col, caption_col, image_root); synthetic: its spec


@dataclasses.dataclass(frozen=True)
class Options:
  max_side: int = 512
  min_side: int = 64
  vocab: str = 'cc4m'
  entity_mode: str = 'fixed'
  lemmatizer: str = 'rules'
  jpeg_quality: int = 95


# ----------------------------------------------------------------------------------------------- readers
def _split_key(name: str):
  base = os.path.basename(name)
  if '.' not in base:
    return None, None
  stem, ext = base.split('.', 1)
  return os.path.join(os.path.dirname(name), stem), ext.lower()


def _record_from_members(key: str, members: dict) -> RawRecord:
  """Builds a record from {ext: bytes} of one webdataset/files key."""
  image = next((members[e] for e in IMAGE_EXTS if e in members), None)
  caption = members.get('txt')
  if caption is None and 'json' in members:
    try:
      caption = json.loads(members['json'].decode('utf-8')).get('caption')
    except (UnicodeDecodeError, ValueError, AttributeError):
      caption = b'\xff'  # the caption exists but cannot be read: counted as undecodable text
  return RawRecord(os.path.basename(key), image, caption)


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
    raise UsageError(f'--input {path} is empty')
  low = [c.strip().lower() for c in first]
  img = next((low.index(c) for c in _IMAGE_COLS if c in low), None)
  cap = next((low.index(c) for c in _CAPTION_COLS if c in low), None)
  if img is not None and cap is not None:
    return delim, img, cap, True
  if len(first) < 2:
    raise UsageError(f'--input {path}: expected two columns (image path, caption) separated by {delim!r}')
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


def iter_table(task: Task):
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
      yield RawRecord(rel or f'row{task.start}+{i}', image, caption)


def iter_task(task: Task):
  if task.kind == 'tar':
    return iter_tar(task.path)
  if task.kind == 'files':
    return iter_files(task.path)
  if task.kind == 'table':
    return iter_table(task)
  if task.kind == 'synthetic':
    from ovseg_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.iter_raw_records(task)
  raise ValueError(f'unknown task kind {task.kind!r}')


def discover_tasks(inputs, shard_size: int, image_root: str | None = None) -> list:
  """Expands --input paths/globs into ordered tasks (one per output shard)."""
  tasks = []
  for spec in inputs:
    paths = sorted(glob.glob(spec)) if any(c in spec for c in '*?[') else [spec]
    if not paths:
      raise UsageError(f'--input {spec} matches no file')
    for p in paths:
      if not os.path.exists(p):
        raise UsageError(f'--input {p} does not exist')
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
            raise UsageError(f'--input {p} holds no .tar shards, TSV/CSV or img2dataset files folders')
          tasks += [('files', d, 0, 0, ()) for d in dirs]
      elif p.endswith('.tar'):
        tasks.append(('tar', p, 0, 0, ()))
      elif p.lower().endswith(('.tsv', '.csv', '.txt')):
        tasks += _table_tasks(p, shard_size, image_root)
      else:
        raise UsageError(f'--input {p}: expected a .tar shard, a .tsv/.csv table or a folder')
  return [Task(i, *t) for i, t in enumerate(tasks)]


def _table_tasks(path: str, shard_size: int, image_root: str | None):
  delim, img_col, cap_col, header = _table_format(path)
  starts, counts = _table_row_offsets(path, delim, header, shard_size)
  root = image_root or os.path.dirname(os.path.abspath(path))
  return [('table', path, s, c, (delim, img_col, cap_col, root)) for s, c in zip(starts, counts)]


# ----------------------------------------------------------------------------------------------- worker
def process_image(data: bytes, opts: Options):
  """-> (jpeg bytes, None, reencoded) or (None, reason, False). Byte-exact when JPEG within max_side."""
  try:
    im = Image.open(io.BytesIO(data))
    fmt, (w, h) = im.format, im.size
    if max(w, h) > 2 * opts.max_side and fmt == 'JPEG':
      scale = opts.max_side / max(w, h)
      im.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))  # DCT-domain downscale: fast decode
    im.load()
  except Exception:  # pylint: disable=broad-except  (PIL raises many types on bad data)
    return None, 'corrupt_image', False
  if min(w, h) < opts.min_side:
    return None, 'image_too_small', False
  if max(w, h) <= opts.max_side and fmt == 'JPEG':
    return data, None, False
  if im.mode != 'RGB':
    im = im.convert('RGBA').convert('RGB') if 'A' in im.getbands() or im.mode == 'P' else im.convert('RGB')
  if max(w, h) > opts.max_side:
    scale = opts.max_side / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
  out = io.BytesIO()
  im.save(out, 'JPEG', quality=opts.jpeg_quality)
  return out.getvalue(), None, True


def filter_record(rec: RawRecord, extractor, opts: Options):
  """-> (example dict, None, reencoded) or (None, reason, False)."""
  if rec.image is None:
    return None, 'missing_image', False
  caption = rec.caption
  if isinstance(caption, bytes):
    try:
      caption = caption.decode('utf-8')
    except UnicodeDecodeError:
      return None, 'undecodable_text', False
  if caption is None or not caption.strip():
    return None, 'empty_caption', False
  surface = extractor.entities(caption)
  if not surface:
    return None, 'no_entity', False
  image, reason, reenc = process_image(rec.image, opts)
  if reason:
    return None, reason, False
  canonical = []
  for w in surface:
    c = extractor.vocab.canonical_of(w)
    if c not in canonical:
      canonical.append(c)
  return {'image': image, 'caption': caption, 'entities': surface, 'canonical': canonical,
          'key': rec.key}, None, reenc


def part_paths(work_dir: str, index: int):
  return (os.path.join(work_dir, f'part-{index:05d}.array_record'),
          os.path.join(work_dir, f'part-{index:05d}.json'))


def process_task(args):
  """Worker: one task -> one array_record part file + a json marker (written last, atomically)."""
  task, opts, work_dir = args
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  t0 = time.time()
  extractor = entities_lib.get_extractor(opts.vocab, opts.entity_mode, opts.lemmatizer)
  feats = tfds_builder.features()
  data_path, marker = part_paths(work_dir, task.index)
  tmp = data_path + '.tmp'
  writer = array_record_module.ArrayRecordWriter(tmp, tfds_builder.ARRAY_RECORD_OPTIONS)
  counts = dict.fromkeys(('seen', 'kept', 're_encoded') + REASONS, 0)
  canonical, surface, num_bytes, warning = {}, {}, 0, None
  try:
    for rec in iter_task(task):
      counts['seen'] += 1
      ex, reason, reenc = filter_record(rec, extractor, opts)
      if reason:
        counts[reason] += 1
        continue
      blob = feats.serialize_example(ex)
      writer.write(blob)
      num_bytes += len(blob)
      local = counts['kept']
      counts['kept'] += 1
      counts['re_encoded'] += int(reenc)
      for c in ex['canonical']:
        canonical.setdefault(c, []).append(local)
      for s in ex['entities']:
        surface.setdefault(s, []).append(local)
  except (tarfile.TarError, EOFError, OSError) as e:
    # a truncated/corrupt input shard: keep what was read, report the rest as unreadable
    warning = f'{task.path}: input unreadable after {counts["seen"]} records ({type(e).__name__}: {e})'
  finally:
    writer.close()
  os.replace(tmp, data_path)
  done = {'task': dataclasses.asdict(task), 'num_examples': counts['kept'], 'num_bytes': num_bytes,
          'counts': counts, 'canonical': canonical, 'surface': surface, 'seconds': time.time() - t0,
          'warning': warning, 'path': data_path}
  tfds_builder.write_json_atomic(marker, done)
  return done


# ----------------------------------------------------------------------------------------------- driver
def _fmt_time(s: float) -> str:
  s = int(max(0, s))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def _signature(tasks, opts: Options) -> str:
  blob = json.dumps([[dataclasses.asdict(t) for t in tasks], dataclasses.asdict(opts)], sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def run_build(tasks, *, output: str, name: str, split: str, opts: Options, num_workers: int,
              overwrite: bool = False, log=sys.stderr) -> dict:
  """Runs every unfinished task (in parallel), then finalizes the split. Returns the report dict."""
  vdir = tfds_builder.dataset_dir(output, name)
  work_dir = os.path.join(output, name, f'_build_{split}')
  sig = _signature(tasks, opts)
  if overwrite:
    shutil.rmtree(work_dir, ignore_errors=True)
  elif split in tfds_builder.existing_splits(vdir) and not os.path.isdir(work_dir):
    old = tfds_builder.read_meta(vdir).get('splits', {}).get(split, {})
    if old.get('signature') == sig:
      print(f'split {split!r} of {vdir} is already built from these inputs and options; nothing to do',
            file=log)
      return dict(old, up_to_date=True, dataset_dir=vdir)
    raise UsageError(f'split {split!r} of {vdir} is already built from other inputs or options; pass '
                     '--overwrite to rebuild it')
  os.makedirs(work_dir, exist_ok=True)
  sig_path = os.path.join(work_dir, 'signature.json')
  if os.path.exists(sig_path):
    with open(sig_path) as f:
      old = json.load(f)
    if old['signature'] != sig:
      raise UsageError(f'{work_dir} holds a partial build from other inputs/options; rerun with the same '
                       'ones to resume, or pass --overwrite')
  else:
    tfds_builder.write_json_atomic(sig_path, {'signature': sig, 'options': dataclasses.asdict(opts)})

  done, pending = {}, []
  for t in tasks:
    data_path, marker = part_paths(work_dir, t.index)
    if os.path.exists(marker) and os.path.exists(data_path):
      with open(marker) as f:
        done[t.index] = json.load(f)
    else:
      pending.append(t)
  skipped = len(done)
  if skipped:
    print(f'resuming: {skipped}/{len(tasks)} shards already finished, {len(pending)} to go', file=log)
  t0, n_new, recs = time.time(), 0, 0
  jobs = [(t, opts, work_dir) for t in pending]
  if num_workers <= 1 or len(jobs) <= 1:
    results = map(process_task, jobs)
    pool = None
  else:
    # forkserver, not fork: the parent may already run JAX's threads (fork would copy held locks).
    pool = multiprocessing.get_context('forkserver').Pool(min(num_workers, len(jobs)))
    results = pool.imap_unordered(process_task, jobs)
  try:
    for r in results:
      done[r['task']['index']] = r
      n_new += 1
      recs += r['counts']['seen']
      el = time.time() - t0
      eta = el / n_new * (len(jobs) - n_new)
      print(f'\r[{len(done)}/{len(tasks)} shards] {recs} records in {_fmt_time(el)} '
            f'({recs / max(el, 1e-9):.0f} rec/s), ETA {_fmt_time(eta)}   ', end='', file=log, flush=True)
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  if jobs:
    print(file=log)
  elapsed = time.time() - t0

  counts = dict.fromkeys(('seen', 'kept', 're_encoded') + REASONS, 0)
  for d in done.values():
    for k in counts:
      counts[k] += d['counts'][k]
  report = {'dataset': name, 'split': split, 'counts': counts,
            'dropped': {r: counts[r] for r in REASONS}, 'num_shards_in': len(tasks),
            'shards_skipped_on_resume': skipped, 'seconds_this_run': elapsed,
            'records_per_second_this_run': recs / elapsed if elapsed > 0 else 0.0,
            'warnings': [d['warning'] for d in done.values() if d.get('warning')],
            'options': dataclasses.asdict(opts), 'signature': sig}
  vocab = entities_lib.get_vocabulary(opts.vocab)
  meta = {'vocab': vocab.to_json(), 'entity_mode': opts.entity_mode, 'lemmatizer': opts.lemmatizer}
  parts = [dict(done[i], path=part_paths(work_dir, i)[0]) for i in sorted(done)]
  report['dataset_dir'] = tfds_builder.finalize_split(data_dir=output, name=name, split=split, parts=parts,
                                                      meta=meta, report=report)
  report['num_shards_out'] = sum(1 for p in parts if p['num_examples'] > 0)
  tfds_builder.write_json_atomic(os.path.join(report['dataset_dir'], f'build_report-{split}.json'), report)
  shutil.rmtree(work_dir, ignore_errors=True)
  return report


def format_report(report: dict) -> str:
  """The kept/dropped table printed at the end of a build."""
  c = report['counts']
  seen = max(c['seen'], 1)
  rows = [('kept', c['kept'])] + [(f'dropped: {r}', c[r]) for r in REASONS]
  width = max(len(r[0]) for r in rows)
  lines = [f'{"":{width}}  {"records":>10}  {"share":>7}']
  for k, v in rows:
    lines.append(f'{k:{width}}  {v:>10}  {100 * v / seen:6.2f}%')
  lines.append(f'{"total":{width}}  {c["seen"]:>10}')
  lines.append(f're-encoded (longer side > {report["options"]["max_side"]}): {c["re_encoded"]}')
  for w in report['warnings']:
    lines.append(f'warning: {w}')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
  p.add_argument('--input', action='append', required=True,
                 help='tar shard(s), a files folder, a TSV/CSV, a folder of these, or a glob (repeatable)')
  p.add_argument('--output', required=True, help='tfds data_dir; the dataset goes to OUTPUT/NAME/1.0.0')
  p.add_argument('--name', default='cc4m', help='tfds dataset name (config.data.dataset)')
  p.add_argument('--split', default='train')
  p.add_argument('--num_workers', type=int, default=os.cpu_count() or 1)
  p.add_argument('--max_side', type=int, default=512, help='longer side above which images are re-encoded')
  p.add_argument('--min_side', type=int, default=64, help='images with a shorter side below this are dropped')
  p.add_argument('--shard_size', type=int, default=10000, help='rows per shard for TSV/CSV inputs')
  p.add_argument('--image_root', default=None, help='base of relative image paths in a TSV/CSV')
  p.add_argument('--entity_mode', default='fixed', choices=('fixed', 'official'))
  p.add_argument('--lemmatizer', default='rules', choices=('rules', 'wordnet'))
  p.add_argument('--vocab', default='cc4m', choices=sorted(entities_lib.VOCABULARIES))
  p.add_argument('--overwrite', action='store_true', help='rebuild the split from scratch')
  a = p.parse_args(argv)
  try:
    if a.shard_size <= 0 or a.max_side <= 0 or a.min_side < 0:
      raise UsageError('--shard_size and --max_side must be positive, --min_side >= 0')
    if a.min_side > a.max_side:
      raise UsageError(f'--min_side {a.min_side} is larger than --max_side {a.max_side}')
    opts = Options(max_side=a.max_side, min_side=a.min_side, vocab=a.vocab, entity_mode=a.entity_mode,
                   lemmatizer=a.lemmatizer)
    entities_lib.get_extractor(a.vocab, a.entity_mode, a.lemmatizer)  # fail fast (e.g. WordNet missing)
    tasks = discover_tasks(a.input, a.shard_size, a.image_root)
    print(f'{len(tasks)} input shards, {a.num_workers} worker processes -> '
          f'{tfds_builder.dataset_dir(a.output, a.name)}', file=sys.stderr)
    report = run_build(tasks, output=a.output, name=a.name, split=a.split, opts=opts,
                       num_workers=a.num_workers, overwrite=a.overwrite)
  except (UsageError, RuntimeError, ValueError, FileNotFoundError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(format_report(report))
  print(f'dataset: {report["dataset_dir"]}  (report: build_report-{a.split}.json)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
