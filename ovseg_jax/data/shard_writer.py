"""Shard writer: tasks (one input shard each) -> array_record part files -> one tfds split.

  report = shard_writer.run_build(tasks, read, output=DATA_DIR, name='cc4m', split='train', opts=Options(),
                                  num_workers=8)

Shared by the CC4M builder (build_cc4m.py: tar / files / table readers) and the synthetic dataset
(synthetic.py), which differ only in `read(task) -> iterable of RawRecord`. Each task is one job of a process
pool: it streams its records (memory stays flat), keeps a record when its caption names an entity (paper
Sec. 3.1.2, `entities.py`), keeps the JPEG bytes when the longest side is within `opts.max_side` (else
re-encodes to it), and writes one array_record file with tfds's serialization. A finished task leaves a
marker, so a restart skips it; anything a killed run left half-written is redone. When all are done the
shards are registered as the tfds split and the entity -> example index is written (`tfds_builder.py`).

No record stops a build: each one that is not kept is counted by reason (`build_report.REASONS`, with its
location under `examples`), and the report also holds the caption token-length histogram.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from typing import Callable, Iterable

from ovseg_jax import errors
from ovseg_jax import images
from ovseg_jax.data import build_report
from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import tfds_builder
from ovseg_jax.data.build_report import REASONS, format_report  # pylint: disable=unused-import  (re-exported)

MAX_CAPTION_BYTES = 16 * 1024     # far above any web caption (BERT reads 77 tokens); longer is broken input
MAX_IMAGE_BYTES = 256 * 1024 * 1024   # an image file larger than this is not read (image_too_large)
MAX_JSON_BYTES = 1024 * 1024      # img2dataset's per-sample .json is a few KB


class TooLarge(int):
  """Stands for an input member that was not read because it has this many bytes."""


@dataclasses.dataclass
class RawRecord:
  """One input record before filtering. image/caption are None when the input has none.

  image: bytes, None, or TooLarge; caption: bytes, str, None, TooLarge, or (from a .json) any JSON value.
  reason: a problem the reader found (a build_report reason), or None; where: the record's location for the
  report (file:line, shard:key); detail: a sentence for warnings.
  """
  key: str
  image: bytes | None
  caption: bytes | str | None
  reason: str | None = None
  where: str = ''
  detail: str = ''


@dataclasses.dataclass(frozen=True)
class Task:
  """One input shard -> one output shard. kind: 'tar' | 'files' | 'table' | 'synthetic'."""
  index: int
  kind: str
  path: str
  start: int = 0            # table: byte offset of the first row; synthetic: first image index
  count: int = 0            # table: rows; synthetic: images
  args: tuple = ()          # table: (delimiter, image_col, caption_col, image_root, first_line, columns)


@dataclasses.dataclass(frozen=True)
class Options:
  max_side: int = 512
  min_side: int = 64
  vocab: str = 'cc4m'
  entity_mode: str = 'fixed'
  lemmatizer: str = 'rules'
  jpeg_quality: int = 95
  max_pixels: int = 0       # the pixel budget; 0: images.default_max_pixels() (resolved by run_build)


# ----------------------------------------------------------------------------------------------- worker
def process_image(data, opts: Options, name: str = '<image>'):
  """-> (jpeg bytes, None, reencoded) or (None, reason, False). Byte-exact when JPEG within max_side.

  The header is checked against the pixel budget before any pixel is decoded (ovseg_jax/images.py).
  """
  if isinstance(data, TooLarge):
    return None, 'image_too_large', False
  try:
    im = images.open_image(data, max_pixels=opts.max_pixels or None, name=name)
  except images.ImageError as e:
    return None, 'image_too_large' if e.reason == 'too_large' else 'corrupt_image', False
  fmt, (w, h) = im.format, im.size
  if max(w, h) > 2 * opts.max_side and fmt == 'JPEG':
    scale = opts.max_side / max(w, h)
    im.draft('RGB', (math.ceil(w * scale), math.ceil(h * scale)))  # DCT-domain downscale: fast decode
  try:
    im = images.decode(im, max_pixels=opts.max_pixels or None, name=name)
  except images.ImageError:
    return None, 'corrupt_image', False
  if min(w, h) < opts.min_side:
    return None, 'image_too_small', False
  if max(w, h) <= opts.max_side and fmt == 'JPEG':
    return data, None, False
  try:
    im = images.to_rgb(im, max_pixels=opts.max_pixels or None, name=name)
  except images.ImageError:
    return None, 'corrupt_image', False
  if max(w, h) > opts.max_side:
    scale = opts.max_side / max(w, h)
    im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), images.Image.BICUBIC)
  out = io.BytesIO()
  im.save(out, 'JPEG', quality=opts.jpeg_quality)
  return out.getvalue(), None, True


def _caption_text(caption):
  """-> (str, None) or (None, reason)."""
  if isinstance(caption, TooLarge):
    return None, 'caption_too_long'
  if isinstance(caption, bytes):
    if len(caption) > MAX_CAPTION_BYTES:
      return None, 'caption_too_long'
    try:
      caption = caption.decode('utf-8')
    except UnicodeDecodeError:
      return None, 'undecodable_text'
  if caption is not None and not isinstance(caption, str):
    return None, 'caption_not_text'
  if caption is None or not caption.strip():
    return None, 'empty_caption'
  if len(caption.encode('utf-8', 'surrogatepass')) > MAX_CAPTION_BYTES:
    return None, 'caption_too_long'
  return caption, None


def filter_record(rec: RawRecord, extractor, opts: Options):
  """-> (example dict, None, reencoded) or (None, reason, False); the order is build_report's."""
  if rec.reason is not None:  # what the reader found taking the record apart comes first
    return None, rec.reason, False
  if rec.image is None:
    return None, 'missing_image', False
  caption, reason = _caption_text(rec.caption)
  if reason:
    return None, reason, False
  surface = extractor.entities(caption)
  if not surface:
    return None, 'no_entity', False
  image, reason, reenc = process_image(rec.image, opts, name=rec.where or rec.key)
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
  counts = build_report.new_counts()
  examples, warnings, meter = {}, [], build_report.LengthMeter()
  canonical, surface, num_bytes = {}, {}, 0

  def drop(rec, reason, detail=''):
    counts[reason] += 1
    where = rec.where or f'{task.path}:{rec.key}'
    if len(examples.setdefault(reason, [])) < build_report.MAX_EXAMPLES:
      examples[reason].append(where)
    if reason in build_report.WARN_REASONS and len(warnings) < build_report.MAX_WARNINGS:
      warnings.append(detail or rec.detail or f'{where}: {reason}')

  records = None
  try:
    while True:
      try:  # only the reader's own errors are the input's fault (a full disk below is not)
        records = iter(read(task)) if records is None else records
        rec = next(records)
      except StopIteration:
        break
      except Exception as e:  # pylint: disable=broad-except  (the reader broke: keep what was read, say where)
        counts['seen'] += 1
        drop(RawRecord('', None, None, where=task.path), 'unreadable_input',
             f'{task.path}: input unreadable after {counts["seen"] - 1} records ({type(e).__name__}: {e}); '
             'the rest of this shard is not read')
        break
      counts['seen'] += 1
      try:
        ex, reason, reenc = filter_record(rec, extractor, opts)
        blob = None if reason else feats.serialize_example(ex)
      except Exception as e:  # pylint: disable=broad-except  (one record never stops the build)
        drop(rec, 'unexpected_error', f'{rec.where or rec.key}: {type(e).__name__}: {e}')
        continue
      if reason:
        drop(rec, reason)
        continue
      writer.write(blob)
      num_bytes += len(blob)
      local = counts['kept']
      counts['kept'] += 1
      counts['re_encoded'] += int(reenc)
      meter.add(ex['caption'])
      for c in ex['canonical']:
        canonical.setdefault(c, []).append(local)
      for s in ex['entities']:
        surface.setdefault(s, []).append(local)
  finally:
    writer.close()
  meter.flush()
  if meter.error and len(warnings) < build_report.MAX_WARNINGS:
    warnings.append(f'{task.path}: {meter.error}')
  os.replace(tmp, data_path)
  done = {'task': dataclasses.asdict(task), 'num_examples': counts['kept'], 'num_bytes': num_bytes,
          'file_bytes': os.path.getsize(data_path), 'counts': counts, 'examples': examples,
          'warnings': warnings, 'token_lengths': None if meter.error else meter.lengths,
          'canonical': canonical, 'surface': surface, 'seconds': time.time() - t0, 'path': data_path}
  tfds_builder.write_json_atomic(marker, done)
  return done


def _worker_init():
  # Ctrl-C goes to the whole process group: the driver stops the pool, workers must not print tracebacks
  signal.signal(signal.SIGINT, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------------- driver
def _fmt_time(s: float) -> str:
  s = int(max(0, s))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}'


def _signature(tasks, opts: Options) -> str:
  blob = json.dumps([[dataclasses.asdict(t) for t in tasks], dataclasses.asdict(opts)], sort_keys=True,
                    default=str)
  return hashlib.sha256(blob.encode()).hexdigest()


def _finished(work_dir: str, index: int):
  """The marker of a finished task, or None when the task must be (re)done: no marker, an unreadable one,
  or a part file that is missing or not the size the marker recorded (a killed run's leftovers)."""
  data_path, marker = part_paths(work_dir, index)
  if not (os.path.exists(marker) and os.path.exists(data_path)):
    return None
  try:
    with open(marker) as f:
      done = json.load(f)
    ok = isinstance(done, dict) and 'counts' in done and 'num_examples' in done
    ok = ok and done.get('file_bytes', os.path.getsize(data_path)) == os.path.getsize(data_path)
  except (OSError, ValueError):
    ok = False
  return done if ok else None


def check_output(output: str) -> None:
  """A one-line UsageError when --output cannot be a folder (it, or a parent, is a regular file)."""
  p = os.path.abspath(output)
  while True:
    if os.path.exists(p) and not os.path.isdir(p):
      raise errors.UsageError(f'--output {output}: {p} is a file, not a folder')
    parent = os.path.dirname(p)
    if parent == p:
      return
    p = parent


def _work_signature(work_dir: str):
  """The signature of the partial build in work_dir; None when there is none, '' when it is unreadable."""
  sig_path = os.path.join(work_dir, 'signature.json')
  if not os.path.exists(sig_path):
    return None
  try:
    with open(sig_path) as f:
      return str(json.load(f)['signature'])
  except (OSError, ValueError, KeyError, TypeError):
    return ''


def _start_work_dir(work_dir: str, sig: str, opts: Options, overwrite: bool, log) -> None:
  """Creates or reuses the partial build in work_dir (refused when it was started with other settings)."""
  if overwrite:
    shutil.rmtree(work_dir, ignore_errors=True)
  old = _work_signature(work_dir)
  if old == '':
    print(f'{work_dir}/signature.json is unreadable: that partial build is discarded', file=log)
    shutil.rmtree(work_dir, ignore_errors=True)
    old = None
  os.makedirs(work_dir, exist_ok=True)
  sig_path = os.path.join(work_dir, 'signature.json')
  if old is not None and old != sig:
    raise errors.UsageError(f'{work_dir} holds a partial build from other inputs/options; rerun with the '
                            'same ones to resume, or pass --overwrite')
  if old is None:
    tfds_builder.write_json_atomic(sig_path, {'signature': sig, 'options': dataclasses.asdict(opts)})
  for f in os.listdir(work_dir):  # half-written files of a killed run
    if f.endswith('.tmp'):
      os.remove(os.path.join(work_dir, f))


def _run_tasks(jobs, num_workers: int):
  """Yields each job's result as it finishes: in this process, or in a forkserver process pool."""
  if num_workers <= 1 or len(jobs) <= 1:
    yield from map(process_task, jobs)
    return
  # forkserver, not fork: the parent may already run JAX's threads (fork would copy held locks)
  pool = concurrent.futures.ProcessPoolExecutor(min(num_workers, len(jobs)),
                                                mp_context=multiprocessing.get_context('forkserver'),
                                                initializer=_worker_init)
  futures = [pool.submit(process_task, j) for j in jobs]
  finished = False
  try:
    for fut in concurrent.futures.as_completed(futures):
      try:
        result = fut.result()
      except concurrent.futures.process.BrokenProcessPool:
        raise RuntimeError('a worker process died (killed, or out of memory?); the shards finished so far '
                           'are kept: rerun to resume, or lower --num_workers') from None
      yield result
    finished = True
  finally:
    if finished:
      pool.shutdown(wait=True)
    else:  # Ctrl-C or an error: do not wait for the shards still running
      pool.shutdown(wait=False, cancel_futures=True)
      for p in list((getattr(pool, '_processes', None) or {}).values()):
        p.terminate()


def run_build(tasks, read: Reader, *, output: str, name: str, split: str, opts: Options, num_workers: int,
              overwrite: bool = False, log=None) -> dict:
  """Runs every unfinished task (in parallel), then finalizes the split. Returns the report dict.

  read(task) -> the task's RawRecords (build_cc4m.iter_task, synthetic.iter_raw_records). It is not part
  of the build signature: a resumed build must pass the same reader.
  Raises UsageError (one line) for settings the user must change, and when no record was kept (the report
  is written first; the error names it).
  """
  log = log or sys.stderr  # looked up now: a caller may have redirected sys.stderr
  check_output(output)
  tfds_builder.builder_class(name)  # a bad dataset name fails before any work
  opts = dataclasses.replace(opts, max_pixels=images.resolve_max_pixels(opts.max_pixels or None))
  vdir = tfds_builder.dataset_dir(output, name)
  work_dir = os.path.join(output, name, f'_build_{split}')
  sig = _signature(tasks, opts)
  old_meta = tfds_builder.read_meta(vdir)
  vocab = entities_lib.get_vocabulary(opts.vocab).to_json()
  if old_meta.get('vocab') and old_meta['vocab'] != vocab:
    raise errors.UsageError(f'{vdir} holds splits built with entity vocabulary '
                            f'{old_meta["vocab"].get("name")!r}; write {opts.vocab!r} data to another '
                            '--output or dataset name')
  splits = tfds_builder.existing_splits(vdir)  # a damaged dataset_info.json is one line, before any work
  if not overwrite and split in splits:
    old = old_meta.get('splits', {}).get(split, {})
    if old.get('signature') == sig:
      try:
        tfds_builder.check_split(vdir, split)
      except errors.UsageError as e:
        print(f'{e}: rebuilding the split', file=log)
      else:
        shutil.rmtree(work_dir, ignore_errors=True)  # a run killed after finalizing left it behind
        print(f'split {split!r} of {vdir} is already built from these inputs and options; nothing to do',
              file=log)
        return dict(old, up_to_date=True, dataset_dir=vdir)
    elif _work_signature(work_dir) != sig:  # (an interrupted --overwrite rebuild resumes without it)
      raise errors.UsageError(f'split {split!r} of {vdir} is already built from other inputs or options; '
                              'pass --overwrite to rebuild it')
  _start_work_dir(work_dir, sig, opts, overwrite, log)

  done, pending = {}, []
  for t in tasks:
    marker = _finished(work_dir, t.index)
    if marker is not None:
      done[t.index] = marker
    else:
      pending.append(t)
  skipped = len(done)
  if skipped:
    print(f'resuming: {skipped}/{len(tasks)} shards already finished, {len(pending)} to go', file=log)
  t0, n_new, recs = time.time(), 0, 0
  jobs = [(t, opts, work_dir, read) for t in pending]
  for r in _run_tasks(jobs, num_workers):
    done[r['task']['index']] = r
    n_new += 1
    recs += r['counts']['seen']
    el = time.time() - t0
    eta = el / n_new * (len(jobs) - n_new)
    print(f'\r[{len(done)}/{len(tasks)} shards] {recs} records in {_fmt_time(el)} '
          f'({recs / max(el, 1e-9):.0f} rec/s), ETA {_fmt_time(eta)}   ', end='', file=log, flush=True)
  if jobs:
    print(file=log)
  elapsed = time.time() - t0

  markers = [done[i] for i in sorted(done)]
  report = {'dataset': name, 'split': split, **build_report.merge(markers), 'num_shards_in': len(tasks),
            'shards_skipped_on_resume': skipped, 'seconds_this_run': elapsed,
            'records_per_second_this_run': recs / elapsed if elapsed > 0 else 0.0,
            'options': dataclasses.asdict(opts), 'signature': sig}
  if report['counts']['kept'] == 0:
    # beside the version folder: no dataset folder is made, and an existing split's report stays its own
    report_path = os.path.join(output, name, f'build_report-{split}.json')
    report['dataset_dir'] = None
    tfds_builder.write_json_atomic(report_path, report)
    shutil.rmtree(work_dir, ignore_errors=True)
    c = report['counts']
    top = sorted(((c[r], r) for r in REASONS if c[r]), reverse=True)[:3]
    why = ', '.join(f'{r} {n}' for n, r in top)
    raise errors.UsageError(f'no record of split {split!r} was kept: all {c["seen"]} were dropped'
                            f'{" (" + why + ")" if why else ""}; report: {report_path}')
  meta = {'vocab': vocab, 'entity_mode': opts.entity_mode, 'lemmatizer': opts.lemmatizer}
  parts = [dict(m, path=part_paths(work_dir, m['task']['index'])[0]) for m in markers]
  report['num_shards_out'] = sum(1 for p in parts if p['num_examples'] > 0)
  report['dataset_dir'] = vdir  # (also in the report file finalize_split writes)
  report['dataset_dir'] = tfds_builder.finalize_split(data_dir=output, name=name, split=split, parts=parts,
                                                      meta=meta, report=report)
  shutil.rmtree(work_dir, ignore_errors=True)
  return report
