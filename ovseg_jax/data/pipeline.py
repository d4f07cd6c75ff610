"""Training input pipeline: tfds array_record data source + grain, per host, checkpointable.

  it = make_train_iterator(config)                       # jax.process_index()/process_count() by default
  batch = next(it)                                       # dict of numpy arrays (DEVELOPERS.md)
  state = it.get_state(); ...; it2 = make_train_iterator(config, start_state=state)   # exact resume

The stream is a function of the data config alone (config.data.shuffle_seed), not of the host or worker
counts:
  global stream position g = epoch * N + i  ->  example perm_epoch(i)   (grain `shuffle` before `repeat`: a
  fresh global permutation every epoch; the authors never called `set_epoch`, docs/paper_vs_authors.md Q22)
  -> every random draw of that example (crop, flip, RandAugment, erasing, channel order, cross-image partner
  and its augmentation, answer template) from one generator keyed by (seed, g) (`example_rng`)
  -> global batch s = positions s*B .. s*B + B-1 in this order (B = train.global_batch_size)
  -> host h assembles rows h*b .. h*b + b-1 of it (b = B / P for P hosts; the trainer passes the rows its
  devices hold, `host_rows`) -> grain worker processes (config.data.num_workers, 0 = in-process) each
  assemble whole host batches: worker w builds batches w, w + W, ..., read back in batch order.
So the P hosts' batches, concatenated by row, are the one-host batch bit for bit for any P and W, and the
iterator state is one number, the stream position reached: a run saved on N hosts resumes on M hosts (and
with another worker count) and continues the same stream. Workers are spawned processes: the entry script
needs `if __name__ == '__main__':`.

Per example (paper Sec. 3.1.2; docs/paper_vs_authors.md Q23, Q24): the augmented image; the caption; the masked
caption g(T) (every entity -> [MASK]); the prompted entity sentence h(E) (random ImageNet template prefix
+ ' and '.join(entities)); a cross-image partner drawn uniformly from the examples sharing an entity e drawn
uniformly from this example's entities (the entity -> example index written by the builder; it may be the
example itself, as in the official pair construction), augmented with its own draws, and the prompt
'A photo of {e}'. Entity mode 'fixed' pairs and prompts by canonical entity; 'official' by the raw surface
word and uses the authors' masking quirks.

The partner is read only by the mask branch (`needs_cross_image`): a run that never uses it (stage 1 of the
authors' recipe) neither reads, decodes nor augments one, and its batch has no cross keys. The partner's draws
come after the main image's, so the image, caption, masked caption and their draws are the same with and
without it; only the answer's template prefix (drawn after the partner, when there is one, so that a run
with partners keeps its stream) comes from another draw (tests/test_device_images.py).

Images leave the workers as uint8, before normalisation; the train step normalises them on the device, and
fills the stage-1 random-erasing box the worker drew (ovseg_jax/device_images.py; data/augment.py).

A record that fails to read, decode or augment is replaced and counted (`it.counters['skipped_records']`,
this host's count): position g then takes the example of position g + 1 (then g + 2, ...) with draws of its
own (attempt t: key (seed, g, t)), so shapes never change, a run never stops on bad data, and the
replacement is the same on every host count. (Only when more than half of a process's records fail, which
is a broken dataset or a bug, does it raise.)

Batch (per host, b = global_batch / process_count, T = config.model.text.max_length, S = image_size):
  image [b,S,S,3] uint8 (augmented, not normalised), text_ids / text_mask [b,T] i32,
  question_ids / question_mask [b,T] i32, answer_ids / answer_mask [b,T] i32;
  with the cross-image partner (`needs_cross_image`): cross_image [b,S,S,3] uint8,
  cross_entity_ids / cross_entity_mask [b,T] i32;
  with the DeiT recipe (data.deit_aug): image_erase_box (and cross_image_erase_box) [b,4] i32, the random-erasing
  box (top, left, h, w; h = w = 0: none) that the device fills with N(0, 1) after normalising.
"""

import json
import logging
import os
import threading

import grain
import numpy as np

from ovseg_jax import fileio
from ovseg_jax import recipe
from ovseg_jax.data import augment
from ovseg_jax.data import entities as entities_lib
from ovseg_jax.data import tfds_builder

_MAX_LOGGED_ERRORS = 20
_PARTNER_TRIES = 3
# Stream positions tried for one batch slot before giving up (each failure is also counted by the transform).
_MAX_REPLACEMENTS = 16
# More bad records than this share (after _MIN_CALLS_FOR_RATIO) is a broken dataset or a bug, not bad data.
_MAX_BAD_RATIO, _MIN_CALLS_FOR_RATIO = 0.5, 64
STATE_VERSION = 2


def needs_cross_image(config) -> bool:
  """Whether the run may use the mask branch, the one reader of the cross-image partner (`recipe.uses_teacher`,
  the rule train_step reads too: stage 2, or paper_single with a mask loss, which switches on late)."""
  return recipe.uses_teacher(config)


def dataset_path(config) -> str:
  """The tfds dataset directory of a config, with an actionable error when it is missing."""
  d = config.data
  path = tfds_builder.dataset_dir(d.data_dir, d.dataset)
  if not os.path.exists(os.path.join(path, 'dataset_info.json')):
    hint = ('python -m ovseg_jax.data.synthetic --output {} --split train --num_images 4000 --format tfds'
            if d.dataset == 'synthetic_captions' else
            'python -m ovseg_jax.data.build_cc4m --input CC12M_SHARDS --output {}').format(d.data_dir or '.')
    raise FileNotFoundError(f'--config.data.data_dir={d.data_dir!r}: {path} does not exist; build it with '
                            f'`{hint}`')
  return path


class ExampleTransform:
  """Stream position's example id -> one training example (runs in grain worker processes).

  Holds only paths and settings when pickled; the data source, entity index and tokenizer are opened lazily
  in each process.
  """

  def __init__(self, *, path: str, split: str, image_size: int, crop_scale, deit_aug: bool, entity_mode: str,
               vocab: dict, max_length: int, prompt_template: str = entities_lib.CROSS_PROMPT,
               answer_template: str = '', with_ids: bool = False, channel_shuffle: bool = False,
               cross_image: bool = True):
    self.path, self.split = path, split
    self.cross_image = bool(cross_image)   # False: no partner is read (`needs_cross_image`)
    self.image_size, self.crop_scale, self.deit_aug = int(image_size), tuple(crop_scale), bool(deit_aug)
    self.entity_mode, self.vocab, self.max_length, self.with_ids = entity_mode, vocab, max_length, with_ids
    self.prompt_template = prompt_template
    self.channel_shuffle = bool(channel_shuffle)
    self.answer_template = answer_template  # '' = a random ImageNet template prefix per example (official)
    self._source = self._index = self._tok = self._ex = None
    self._errors = self._calls = 0
    self._lock = threading.Lock()

  def __getstate__(self):
    s = dict(self.__dict__)
    s['_source'] = s['_index'] = s['_tok'] = s['_ex'] = s['_lock'] = None
    return s

  def __setstate__(self, s):
    self.__dict__.update(s)
    self._lock = threading.Lock()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from ovseg_jax import tokenizer  # pylint: disable=g-import-not-at-top
    builder = tfds.builder_from_directory(self.path)
    self._source = builder.as_data_source(self.split, decoders={'image': tfds.decode.SkipDecoding()})
    kind = 'surface' if self.entity_mode == 'official' else 'canonical'
    self._index = tfds_builder.load_entity_index(self.path, self.split, kind)
    self._tok = tokenizer.get_tokenizer(max_length=self.max_length)
    self._ex = entities_lib.get_extractor(entities_lib.Vocabulary.from_json(self.vocab), self.entity_mode)

  def _read(self, idx: int):
    rec = self._source[int(idx)]
    caption = rec['caption'].decode('utf-8')
    field = 'entities' if self.entity_mode == 'official' else 'canonical'
    ents = [e.decode('utf-8') if isinstance(e, bytes) else str(e) for e in rec[field]]
    return rec['image'], caption, ents

  def _image(self, data, rng):
    return augment.train_image(data, rng, self.image_size, deit=self.deit_aug, crop_scale=self.crop_scale,
                               channel_shuffle=self.channel_shuffle)

  def _partner(self, idx: int, data, ents, rng):
    """-> ((cross image uint8 [S,S,3], its erase box or None), the shared entity, partner index), drawn after
    the main image's draws."""
    cross, entity, partner = None, None, -1
    for _ in range(_PARTNER_TRIES):
      entity = ents[int(rng.integers(len(ents)))]
      cands = self._index.get(entity)
      partner = int(cands[rng.integers(len(cands))]) if cands is not None and len(cands) else int(idx)
      try:
        cross = self._image(self._read(partner)[0], rng)
        break
      except Exception as e:  # pylint: disable=broad-except  (a bad partner: draw another)
        self._log(partner, e)
    if cross is None:
      cross, partner = self._image(data, rng), int(idx)
    return cross, entity, partner

  def __call__(self, idx, rng: np.random.Generator):
    if self._ex is None:
      with self._lock:  # grain calls from several threads; open once (imports are not thread-safe)
        if self._ex is None:
          self._open()
    self._calls += 1
    try:
      data, caption, ents = self._read(idx)
      image, box = self._image(data, rng)
      if not ents:
        raise ValueError('record has no entity')
      if self.cross_image:
        (cross, cross_box), entity, partner = self._partner(idx, data, ents, rng)
      question, masked = self._ex.mask(caption)
      template_index = int(rng.integers(len(entities_lib.TEMPLATE_PREFIXES)))  # drawn always: same stream
      answer = (self.answer_template.format(' and '.join(masked)) if self.answer_template
                else self._ex.answer(masked, template_index))
      texts = [caption, question, answer] + ([self.prompt_template.format(entity)] if self.cross_image else [])
      ids, mask = self._tok(texts)
    except Exception as e:  # pylint: disable=broad-except  (skip and count any unreadable record)
      self._log(idx, e)
      return {'_bad': np.int64(idx)}
    out = {'image': image, 'text_ids': ids[0], 'text_mask': mask[0], 'question_ids': ids[1],
           'question_mask': mask[1], 'answer_ids': ids[2], 'answer_mask': mask[2]}
    if box is not None:
      out['image_erase_box'] = box
    if self.with_ids:
      out['example_id'] = np.int64(idx)
    if self.cross_image:
      out.update(cross_image=cross, cross_entity_ids=ids[3], cross_entity_mask=mask[3])
      if cross_box is not None:
        out['cross_image_erase_box'] = cross_box
      if self.with_ids:
        out['cross_example_id'] = np.int64(partner)
    return out

  def _log(self, idx, e):
    self._errors += 1
    if self._calls >= _MIN_CALLS_FOR_RATIO and self._errors > _MAX_BAD_RATIO * self._calls:
      raise RuntimeError(f'{self._errors} of {self._calls} records of {self.path} failed; last: record '
                         f'{idx}: {type(e).__name__}: {e}') from e
    if self._errors <= _MAX_LOGGED_ERRORS:
      logging.warning('skipping unreadable record %s of %s: %s: %s', idx, self.path, type(e).__name__, e)


def stream_key(seed: int) -> np.ndarray:
  """The Philox key of the augmentation draws of shuffle seed `seed` (the key grain's `random_map(seed=seed
  + 1)` uses, so the one-host stream is the one earlier versions produced)."""
  return np.random.Philox(int(seed) + 1).state['state']['key']


def example_rng(key: np.ndarray, position: int, attempt: int = 0) -> np.random.Generator:
  """The generator of every random draw of global stream position `position` (attempt t > 0: the t-th
  replacement of a bad record): Philox(key) at counter (0, 0, attempt, position). A pure function of the
  seed and the global position, never of a host, worker or thread."""
  return np.random.Generator(np.random.Philox(key=key, counter=np.array([0, 0, attempt, position], np.uint64)))


class _HostElements(grain.MapDataset):
  """This host's examples in order: element j = row `rows[j % b]` of host batch `j // b`.

  Host batch k is global batch `batch_start + k * batch_step` (a worker's share of the batches: see
  `worker_share`), which holds the global stream positions `start + s * global_batch + row`. The parent is
  the example order (stream position -> example index); each element carries `_skipped`, the number of bad
  records replaced to fill it.
  """

  def __init__(self, order: grain.MapDataset, transform: ExampleTransform, *, key: np.ndarray, start: int,
               global_batch: int, rows, batch_start: int = 0, batch_step: int = 1):
    super().__init__(order)
    self._transform, self._key = transform, key
    self._start, self._global_batch = int(start), int(global_batch)
    self._rows = np.asarray(rows, np.int64)
    self._batch_start, self._batch_step = int(batch_start), int(batch_step)

  def worker_share(self, worker: int, workers: int) -> '_HostElements':
    """The elements of host batches worker, worker + workers, ... of this dataset (whole batches)."""
    return _HostElements(self._parent, self._transform, key=self._key, start=self._start,
                         global_batch=self._global_batch, rows=self._rows,
                         batch_start=self._batch_start + worker * self._batch_step,
                         batch_step=self._batch_step * workers)

  def __len__(self) -> int:
    return len(self._parent)  # the order repeats forever (sys.maxsize)

  def __str__(self) -> str:
    return (f'_HostElements(start={self._start}, global_batch={self._global_batch}, rows={len(self._rows)}, '
            f'batches={self._batch_start}::{self._batch_step})')

  def position(self, index: int) -> int:
    """Global stream position of element `index`."""
    k, r = divmod(int(index), len(self._rows))
    step = self._batch_start + k * self._batch_step
    return self._start + step * self._global_batch + int(self._rows[r])

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g = self.position(index)
    for attempt in range(_MAX_REPLACEMENTS):
      out = self._transform(self._parent[g + attempt], example_rng(self._key, g, attempt))
      if '_bad' not in out:
        out['_skipped'] = np.int32(attempt)
        return out
    raise RuntimeError(f'{_MAX_REPLACEMENTS} consecutive records from stream position {g} of '
                       f'{self._transform.path} failed to read (see the warnings above)')


class _WholeBatchesPerWorker(grain.IterDataset):
  """`elements.to_iter_dataset(read_options)` whose grain-worker slice is whole host batches.

  grain's `mp_prefetch` gives worker w the elements w, w + W, ... of the dataset it prefetches, which would
  put other examples in each batch for every worker count W. This node takes the slice instead (`set_slice`,
  in the worker process) and reads the batches w, w + W, ...: the workers' batches, read round-robin, are the
  in-process batches in order.
  """

  def __init__(self, elements: _HostElements, read_options: grain.ReadOptions):
    super().__init__(elements.to_iter_dataset(read_options))
    self._elements, self._read_options = elements, read_options

  def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
    del sequential_slice
    workers = sl.step or 1
    if sl.stop is not None or not 0 <= (sl.start or 0) < workers:
      raise ValueError(f'unexpected grain worker slice {sl}')
    self._elements = self._elements.worker_share(sl.start or 0, workers)
    self._parents = (self._elements.to_iter_dataset(self._read_options),)

  def __iter__(self):
    return self._parents[0].__iter__()

  def __str__(self) -> str:
    return f'_WholeBatchesPerWorker({self._elements})'


def _data_fingerprint(fp: dict) -> dict:
  """What a state must match to be resumed: the same examples in the same order. Not the path (a resume may
  read the data from where it moved, checkpoint.RESUME_MAY_CHANGE), nor host or worker counts."""
  return {k: fp.get(k) for k in ('split', 'num_examples', 'seed')}


class TrainIterator:
  """Infinite iterator of per-host batches with `get_state()` / `set_state()` (JSON-serialisable dicts).

  The state is the global stream position reached (`position` = global batches consumed x global batch),
  the same on every host, so it may be restored with any host or worker count.
  Attributes: num_examples (N, one epoch), per_host_batch, steps_per_epoch (N // global_batch),
  counters ({'batches': batches read, 'skipped_records': bad records replaced on this host}).
  """

  def __init__(self, make_dataset, *, num_examples: int, per_host_batch: int, global_batch: int,
               fingerprint: dict):
    self._make_dataset = make_dataset   # start position -> grain IterDataset of host batches
    self._it = None                     # built on the first `next` (workers start then)
    self.num_examples = num_examples
    self.per_host_batch = per_host_batch
    self.global_batch = global_batch
    self.steps_per_epoch = num_examples // global_batch
    self.position = 0
    self.counters = {'batches': 0, 'skipped_records': 0}
    self._fingerprint = fingerprint

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._it is None:
      self._it = iter(self._make_dataset(self.position))
    batch = next(self._it)
    self.counters['skipped_records'] += int(np.sum(batch.pop('_skipped')))
    self.counters['batches'] += 1
    self.position += self.global_batch
    return batch

  def get_state(self) -> dict:
    return {'version': STATE_VERSION, 'position': self.position, 'counters': dict(self.counters),
            'fingerprint': dict(self._fingerprint)}

  def set_state(self, state: dict) -> None:
    """Continues at `state`'s stream position. Also takes the state of earlier versions (per-host grain
    state + batch count), resumed at the same number of global batches."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if not isinstance(state, dict) or not isinstance(state.get('fingerprint'), dict):
      raise ValueError(f'not an input-pipeline state: {str(state)[:200]}')
    saved = _data_fingerprint(state['fingerprint'])
    if saved != _data_fingerprint(self._fingerprint):
      raise ValueError(f'iterator state was saved for {saved}, this pipeline is '
                       f'{_data_fingerprint(self._fingerprint)}; resume with the same data config')
    counters = dict(state.get('counters') or {})
    version = state.get('version', 1)
    if version == STATE_VERSION:
      position = state.get('position')
    elif version == 1 and 'grain' in state:
      fp = state['fingerprint']
      position = int(counters.get('batches', 0)) * int(fp['per_host_batch']) * int(fp['process_count'])
      logging.warning('input state of an earlier version (per-host grain state): resuming at stream position '
                      '%d (%d global batches); the order from there is the host-count independent one',
                      position, counters.get('batches', 0))
    else:
      raise ValueError(f'input-pipeline state version {version!r} is not readable by this version '
                       f'({STATE_VERSION})')
    if not isinstance(position, int) or position < 0:
      raise ValueError(f'input-pipeline state has no valid stream position: {position!r}')
    self.close()
    self.position = position
    self.counters = {'batches': int(counters.get('batches', 0)),
                     'skipped_records': int(counters.get('skipped_records', 0))}

  def close(self) -> None:
    close = getattr(self._it, 'close', None)
    if close is not None:
      close()
    self._it = None


def _worker_init(worker_index: int, worker_count: int) -> None:
  """In each grain worker: the tokenizer needs no deep-learning framework; skipping transformers' torch /
  flax probing saves ~4 s of start-up per worker."""
  del worker_index, worker_count
  for var in ('USE_TORCH', 'USE_TF', 'USE_FLAX', 'USE_JAX'):
    os.environ.setdefault(var, '0')
  os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')


def _ensure_absl_flags_parsed():
  """grain's worker processes read absl flags; a library caller may not have parsed them."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(config, *, process_index: int | None = None, process_count: int | None = None,
                        host_rows=None, start_state: dict | None = None,
                        with_ids: bool = False) -> TrainIterator:
  """Per-host training batches for `config` (see the module docstring).

  config keys used: data.{data_dir, dataset, split, image_size, crop_scale, deit_aug, entity_mode,
  num_workers, read_threads, shuffle_seed, prompt_template, answer_template}, model.text.max_length,
  train.global_batch_size, and stage, recipe, loss.mask_weight (`needs_cross_image`).
  host_rows: the rows of each global batch this host assembles, ascending (default: the contiguous block
  process_index * b .. + b-1). The trainer passes the rows its devices hold (`sharding.process_batch_rows`),
  which is what `jax.make_array_from_process_local_data` expects.
  with_ids: add `example_id` (and with the partner `cross_example_id`) int64 [b] (tests and debugging).
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must be in [0, process_count={process_count})')
  d = config.data
  global_batch = int(config.train.global_batch_size)
  if global_batch % process_count:
    raise ValueError(f'--config.train.global_batch_size={global_batch} is not divisible by the '
                     f'{process_count} hosts')
  if host_rows is None:
    per_host = global_batch // process_count
    host_rows = np.arange(process_index * per_host, (process_index + 1) * per_host)
  host_rows = np.asarray(host_rows, np.int64).reshape(-1)
  if (not host_rows.size or np.any(np.diff(host_rows) <= 0) or host_rows[0] < 0
      or host_rows[-1] >= global_batch):
    raise ValueError(f'host_rows must be ascending rows of the global batch [0, {global_batch}), got '
                     f'{host_rows.tolist()[:16]}')
  per_host = int(host_rows.size)
  path = dataset_path(config)
  split = d.split
  if fileio.is_remote(path):   # the shard check below reads local footers; tfds reads remote ones itself
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    info = tfds.builder_from_directory(path).info
    if split not in info.splits:
      raise ValueError(f'--config.data.split={split!r}: {path} has splits {sorted(info.splits)}')
    n = info.splits[split].num_examples
  else:   # a deleted or truncated shard is one line here, not an error deep inside a worker's read
    n = tfds_builder.check_split(path, split).num_examples
  if n < global_batch:
    raise ValueError(f'{path} split {split!r} has {n} examples, fewer than one global batch ({global_batch})')
  meta = tfds_builder.read_meta(path)
  vocab = meta.get('vocab') or entities_lib.get_vocabulary(entities_lib.dataset_vocabulary(d.dataset)).to_json()
  transform = ExampleTransform(path=path, split=split, image_size=d.image_size, crop_scale=d.crop_scale,
                               deit_aug=d.deit_aug, entity_mode=d.entity_mode, vocab=vocab,
                               max_length=config.model.text.max_length,
                               prompt_template=d.prompt_template,
                               answer_template=d.answer_template, with_ids=with_ids,
                               channel_shuffle=d.channel_shuffle, cross_image=needs_cross_image(config))
  seed = int(d.shuffle_seed)
  order = grain.MapDataset.range(n).shuffle(seed=seed).repeat(None)   # stream position -> example index
  key = stream_key(seed)
  threads = int(d.read_threads)
  workers = int(d.num_workers)
  # a small read-ahead keeps the threads busy; elements are <= 0.3 MB at 224 px, so not a whole batch's worth
  read_options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(8, 8 * threads))

  def make_dataset(start: int):
    elements = _HostElements(order, transform, key=key, start=start, global_batch=global_batch,
                             rows=host_rows)
    ds = _WholeBatchesPerWorker(elements, read_options).batch(per_host, drop_remainder=True)
    if workers > 0:
      _ensure_absl_flags_parsed()
      # each worker assembles whole per-host batches (b x <= 2 x 0.15 MB at 224 px), so one queued batch each:
      # with W workers, W batches are in flight, which is enough read-ahead and bounds host memory
      ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1),
                          worker_init_fn=_worker_init)
    return ds

  fingerprint = {'path': os.path.abspath(path), 'split': split, 'num_examples': n, 'seed': seed}
  it = TrainIterator(make_dataset, num_examples=n, per_host_batch=per_host, global_batch=global_batch,
                     fingerprint=fingerprint)
  if start_state is not None:
    it.set_state(start_state)
  return it
