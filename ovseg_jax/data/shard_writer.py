"""Shard writer: tasks (one input shard each) -> array_record part files -> one tfds split.

  report = shard_writer.run_build(tasks, read, output=DATA_DIR, name='cc4m', split='train', opts=Options(),
                                  num_workers=8)

Shared by the CC4M builder (build_cc4m.py: tar / files / table readers) and the synthetic dataset
(synthetic.py), which differ only in `read(task) -> iterable of RawRecord`. Each task is one job of a process
pool: it streams its records (memory stays flat), keeps a record when its caption names an entity (paper
Sec. 3.1.2, `entities.py`), keeps the JPEG bytes when the longest side is within `opts.max_side` (else
re-encodes to it), and writes one array_record file with tfds's serialization. A finished task leaves a
marker, so a restart skips it. When all are done the shards are registered as the tfds split and the entity
-> example index is written (`tfds_builder.py`). Dropped records are counted by reason, in this order of
precedence: missing_image, undecodable_text, empty_caption, no_entity, corrupt_image, image_too_small.
"""

import dataclasses
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
from typing import Callable, Iterable

from PIL import Image

from ovseg_jax import errors
from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import tfds_builder

REASONS = ('missing_image', 'undecodable_text', 'empty_caption', 'no_entity', 'corrupt_image',
           'image_too_small')


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


Reader = Callable[[Task], Iterable[RawRecord]]


def process_task(args):
  """Worker: one task -> one array_record part file + a json marker (written last, atomically).

  args: (task, opts, work_dir, read); `read` is a module-level function, so it pickles by name.
  """
  task, opts, work_dir, read = args
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
    for rec in read(task):
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


def run_build(tasks, read: Reader, *, output: str, name: str, split: str, opts: Options, num_workers: int,
              overwrite: bool = False, log=sys.stderr) -> dict:
  """Runs every unfinished task (in parallel), then finalizes the split. Returns the report dict.

  read(task) -> the task's RawRecords (build_cc4m.read_task, synthetic.iter_raw_records). It is not part
  of the build signature: a resumed build must pass the same reader.
  """
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
    raise errors.UsageError(f'split {split!r} of {vdir} is already built from other inputs or options; '
                            'pass --overwrite to rebuild it')
  os.makedirs(work_dir, exist_ok=True)
  sig_path = os.path.join(work_dir, 'signature.json')
  if os.path.exists(sig_path):
    with open(sig_path) as f:
      old = json.load(f)
    if old['signature'] != sig:
      raise errors.UsageError(f'{work_dir} holds a partial build from other inputs/options; rerun with the '
                              'same ones to resume, or pass --overwrite')
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
  jobs = [(t, opts, work_dir, read) for t in pending]
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
