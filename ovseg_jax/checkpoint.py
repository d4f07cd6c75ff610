"""On-disk formats. This is the one module that reads and writes them, and the only one that calls Orbax.

Inference checkpoint (written by `export` and `convert official`; read by `Segmenter`, `evaluate`, init_from):
    DIR/model_config.json  the `config.model` ConfigDict it was built with (JSON)
    DIR/variables/         Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...} of `OVSegmentor`
    DIR/meta.json          provenance (source, converter or exporter, step) and `eval`, the eval settings of
                           the training config; free-form
    DIR/teacher/           optional: Orbax tree {'params': img_encoder params} of an EMA teacher (the authors'
                           stage-2 files; `export --format official` writes it back as img_encoder_momentum)
    DIR/checksums.json     {'variables': {param name: CRC-32 of its bytes}, 'teacher': ...}, checked on load
                           (folders written before it existed have none)
DINO init (`convert dino`): the same layout, holding only the img_encoder params DINO provides.
BERT init (`convert bert`): DIR/text_config.json (`config.model.text`), DIR/variables/ {'params': BertModel
    params}, DIR/meta.json, DIR/checksums.json.
Training workdir: WORKDIR/config.json (the resolved config) and WORKDIR/checkpoints/ (`TrainCheckpointer`).

Loading against a model: `check_tree` / `merge_params` name every missing, unexpected and mis-shaped
parameter in one error, as big_vision's models/common.merge_params does. Old files are upgraded when read:
`upgrade_model_config` fills the `config.model` keys added after the format was first written.
Damaged files are one-line errors naming the file or checkpoint step (`UsageError`; `CheckpointUnreadable` for
Orbax folders that do not read): a JSON file that does not parse or holds no object, a missing `variables/`,
a truncated or bit-flipped array file (inference folders carry a CRC-32 of every array in checksums.json, so a
flip that still decompresses is caught too), an output folder under a regular file.
Every path may be local or remote (gs://...): JSON goes through fileio.py, arrays through Orbax (tensorstore).
"""

import contextlib
import fnmatch
import gc
import hashlib
import json
import sys
import time
import zlib

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ovseg_jax import errors
from ovseg_jax import fileio
from ovseg_jax import param_tree

MODEL_CONFIG = 'model_config.json'
TEXT_CONFIG = 'text_config.json'
VARIABLES = 'variables'
META = 'meta.json'
CHECKSUMS = 'checksums.json'
TEACHER = 'teacher'
CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
EXPERIMENTS_TAG = 'experiments/grouping-levers'

# Keys of `config.model` added after the inference format was first written, with the value that rebuilds
# the model the older files hold. `upgrade_model_config` fills them when such a file is read.
MODEL_KEYS_ADDED = {
    'remat': 'none',                   # rematerialisation of the blocks: a training-memory switch
    'vision.stem_channels': (),        # () = the authors' linear patch embed (the conv stem came later)
    'binding.slot_iters': 3,           # read only in binding.mode='slot', which older files cannot hold
    'binding.slot_cosine': False,
    'binding.slot_values': 'context',
    'patch_head': False,
}
# Switches that were measured, not adopted and removed (git tag experiments/grouping-levers has them), with
# the one value today's model implements; None: any value (they only changed the initialisation, or
# mattered only when refine_iters > 0). A file built with another value needs that tag's code.
MODEL_KEYS_REMOVED = {
    'binding.group_token_std': None,
    'binding.refine_iters': 0,
    'binding.refine_scale': None,
    'binding.refine_init': None,
    'binding.query_residual': True,
}
# Workdir config.json: keys added after the trainer first wrote it (and the model keys above, under
# `model.`), and loss switches removed with those above (training only: an old workdir still exports).
CONFIG_KEYS_ADDED = {
    'data.answer_template': '',        # '' = the authors' random template prefix (what older runs used)
    'data.channel_shuffle': False,
    'loss.group_match_weight': 0.0,
    'loss.group_match_background_weight': 1.0,
    'loss.patch_ground_weight': 0.0,
    'loss.patch_top_k': 4,
    'loss.patch_distill_weight': 1.0,
    'loss.patch_purity_weight': 1.0,
    'eval.bg_prompt_margin': 0.0,
}
CONFIG_KEYS_REMOVED = ('loss.group_diversity_weight', 'loss.group_entity_weight', 'loss.group_entity_bg_weight',
                       'loss.group_entity_vocab', 'loss.group_entity_template')


# ----------------------------------------------------------------------------------------------------------
# Config upgrades and the workdir config.json.
# ----------------------------------------------------------------------------------------------------------
def _split(cfg: ml_collections.ConfigDict, dotted: str, create: bool = False):
  """-> (the ConfigDict holding the last key of `dotted`, that key); None when a parent is absent."""
  *parents, key = dotted.split('.')
  for p in parents:
    if p not in cfg:
      if not create:
        return None, key
      cfg[p] = ml_collections.ConfigDict()
    cfg = cfg[p]
  return cfg, key


def upgrade_model_config(cfg: ml_collections.ConfigDict, where: str = 'model config') -> ml_collections.ConfigDict:
  """Brings a `config.model` read from an older file up to date, in place; -> `cfg`.

  Fills the keys of MODEL_KEYS_ADDED that it lacks and drops the removed switches of MODEL_KEYS_REMOVED,
  raising a UsageError when one of those holds a value today's model cannot build.
  """
  for dotted, value in MODEL_KEYS_ADDED.items():
    parent, key = _split(cfg, dotted, create=True)
    if key not in parent:
      parent[key] = value
  for dotted, supported in MODEL_KEYS_REMOVED.items():
    parent, key = _split(cfg, dotted)
    if parent is None or key not in parent:
      continue
    if supported is not None and parent[key] != supported:
      raise errors.UsageError(f'{where}: model.{dotted}={parent[key]!r} was an experiment that is no longer in '
                              f'the code; `git checkout {EXPERIMENTS_TAG}` to use this checkpoint')
    del parent[key]
  return cfg


def upgrade_config(config: ml_collections.ConfigDict, where: str = 'config') -> ml_collections.ConfigDict:
  """`upgrade_model_config` for a whole run config (a workdir's config.json), in place; -> `config`."""
  for dotted, value in CONFIG_KEYS_ADDED.items():
    parent, key = _split(config, dotted)
    if parent is not None and key not in parent:
      parent[key] = value
  for dotted in CONFIG_KEYS_REMOVED:
    parent, key = _split(config, dotted)
    if parent is not None and key in parent:
      del parent[key]
  if 'model' in config:
    upgrade_model_config(config.model, where)
  return config


def config_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as WORKDIR/config.json holds it (sorted keys)."""
  return config.to_json_best_effort(indent=1, sort_keys=True)


def _sha256(text: str) -> str:
  return hashlib.sha256(text.encode()).hexdigest()


def config_digest(config: ml_collections.ConfigDict) -> str:
  """sha256 of `config_json(config)` (= of the config.json text it writes): saved in every training
  checkpoint's meta, checked on resume."""
  return _sha256(config_json(config))


def read_json_object(path: str, what: str = '') -> dict:
  """A JSON file holding an object -> dict. Missing: FileNotFoundError; unreadable, not JSON or not an
  object: a UsageError naming the file (`what` says what the file should be)."""
  if not fileio.exists(path):
    raise FileNotFoundError(f'{path} does not exist' + (f' (expected {what})' if what else ''))
  try:
    value = json.loads(fileio.read_text(path))
  except (OSError, ValueError, RecursionError) as e:   # a folder, bad UTF-8, not JSON, absurdly nested
    raise errors.UsageError(f'{path} is not a readable JSON file ({_why(e)})') from e
  if not isinstance(value, dict):
    raise errors.UsageError(f'{path} must hold a JSON object{f" ({what})" if what else ""}, not a '
                            f'{type(value).__name__}')
  return value


def _config_dict(tree: dict, where: str) -> ml_collections.ConfigDict:
  try:
    return ml_collections.ConfigDict(tree)
  except Exception as e:  # pylint: disable=broad-except  (ml_collections rejects odd keys in several ways)
    raise errors.UsageError(f'{where} is not a config ({_why(e)})') from e


def make_workdir(workdir: str) -> None:
  """Creates the run folder; a path that is (or is under) a regular file is a one-line UsageError."""
  _makedirs(workdir, '--workdir')


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config (every default and override) of this run (process 0)."""
  if jax.process_index() == 0:
    fileio.write_text(fileio.join(workdir, CONFIG), config_json(config))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json -> the run's config (upgraded, see `upgrade_config`)."""
  path = fileio.join(workdir, CONFIG)
  if fileio.exists(workdir) and not fileio.isdir(workdir):
    raise errors.UsageError(f'{workdir} is a file, not a training workdir')
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a training workdir: {path} is missing')
  return upgrade_config(_config_dict(read_json_object(path, 'the run config'), path), path)


# ----------------------------------------------------------------------------------------------------------
# Resuming a run: which config keys may change.
# ----------------------------------------------------------------------------------------------------------
# Keys of a run's config that a resume may change (fnmatch patterns of dotted keys). They say how long, where
# and on what machine the same run goes on, not what it computes, so a preempted run can come back on another
# slice or with its data moved. Any other change (model.*, seed, optim.*, loss weights, data recipe, batch
# size, ...) is refused before anything is written. Extending train.total_steps (or total_epochs) stretches the
# lr schedule from the resumed step on: the one allowed change that alters the trajectory, on purpose. A key
# the code added or dropped since the run started is applied too (its default keeps the old behaviour).
RESUME_MAY_CHANGE = (
    'train.total_steps', 'train.total_epochs',                # extend (or shorten) the run
    'train.log_every_steps', 'train.checkpoint_every_steps', 'train.keep_checkpoints',
    'train.peak_tflops_per_device',                           # the MFU denominator only
    'train.init_from', 'train.init_bert', 'train.init_teacher_from_student',   # read at step 0 only
    'data.data_dir', 'data.num_workers', 'data.read_threads',  # where the data is, how fast it is read
    'mesh', 'sharding.*', 'distributed',                      # another slice / host count
    'model.remat', 'loss.contrast_chunk', 'loss.matcher',     # memory / speed: the same values computed
    'eval.*', 'eval_during_training.*',                       # evaluation only (export carries `eval`)
)
CONFIG_CHANGES = 'config_changes.jsonl'   # WORKDIR: one record per resume that applied allowed changes
_ABSENT = object()


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict) and v:
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def config_changes(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[tuple]:
  """-> [(dotted key, saved value, new value)] for every key whose JSON value differs (`_ABSENT` for a key
  one side lacks), sorted by key."""
  a, b = _flat(json.loads(config_json(saved))), _flat(json.loads(config_json(config)))
  return [(k, a.get(k, _ABSENT), b.get(k, _ABSENT)) for k in sorted(set(a) | set(b))
          if a.get(k, _ABSENT) != b.get(k, _ABSENT)]


def may_change_on_resume(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in RESUME_MAY_CHANGE)


def _show(change: tuple) -> str:
  key, old, new = change
  fmt = lambda v: '(absent)' if v is _ABSENT else json.dumps(v)  # noqa: E731
  return f'{key}: {fmt(old)} -> {fmt(new)}'


def _listing(changes: list, limit: int = 12) -> str:
  shown = ', '.join(_show(c) for c in changes[:limit])
  return shown + (f' (+{len(changes) - limit} more)' if len(changes) > limit else '')


def check_resume(config: ml_collections.ConfigDict, workdir: str, ckpt: 'TrainCheckpointer') -> list[str] | None:
  """Checks a resume BEFORE anything is written. -> None when WORKDIR has no checkpoint (a fresh run), else
  the changed keys the resume applies (`RESUME_MAY_CHANGE`; ['train.total_steps: 6 -> 8'], [] if none).

  Raises a UsageError (one line, every refused key with both values) when another key differs. The
  reference is the config that saved the newest checkpoint whose meta reads (the meta holds it), else, for
  checkpoints written before the meta did, WORKDIR/config.json, which must still be the file that step was
  saved with (its sha256 = the meta's config_digest): one rewritten since cannot be trusted for a diff.
  """
  steps = sorted(ckpt.all_steps(), reverse=True)
  if not steps:
    return None
  meta, step = None, None
  for s in steps:
    try:
      meta, step = ckpt.read_meta(s), s
      break
    except CheckpointUnreadable:
      continue   # the restore falls back past it and says so
  digest = config_digest(config)
  if meta is not None and meta.get('config_digest') == digest:
    return []
  if meta is not None and isinstance(meta.get('config'), dict):
    where = f'the config saved with step {step} in {ckpt.directory}'
    saved = upgrade_config(_config_dict(meta['config'], where), where)
  else:
    path = fileio.join(workdir, CONFIG)
    if not fileio.isfile(path):
      logging.warning('%s holds checkpoints but no %s: the resume cannot check that the config is unchanged',
                      workdir, CONFIG)
      return []
    if meta is not None and meta.get('config_digest') and _sha256(fileio.read_text(path)) != meta['config_digest']:
      raise errors.UsageError(
          f'{path} is not the config that saved step {step} (its sha256 differs from the config_digest in the '
          'checkpoint): it was rewritten after that save, e.g. by an earlier resume with another config; '
          'resume with the options of the command that trained it')
    saved = load_workdir_config(workdir)
  changes = config_changes(saved, config)
  # A key only one side has was added to (or dropped from) the code since the run started: its default keeps
  # the old behaviour (or upgrade_config fills the value that does, CONFIG_KEYS_ADDED), so it is applied.
  refused = [c for c in changes if not (may_change_on_resume(c[0]) or c[1] is _ABSENT or c[2] is _ABSENT)]
  if refused:
    raise errors.UsageError(
        f'{workdir} holds a run of another config; a resume may not change {_listing(refused)} (nothing was '
        'written; train this config in a new --workdir)')
  return [_show(c) for c in changes]


def record_resume(config: ml_collections.ConfigDict, workdir: str, step: int, changes: list[str]) -> None:
  """After a successful restore: WORKDIR/config.json <- the config the run goes on with, and the applied
  changes appended to WORKDIR/config_changes.jsonl ({step, time, changes}) (process 0)."""
  write_config(config, workdir)
  if not changes or jax.process_index() != 0:
    return
  path = fileio.join(workdir, CONFIG_CHANGES)
  old = fileio.read_text(path) if fileio.exists(path) else ''
  if old and not old.endswith('\n'):
    old += '\n'
  record = json.dumps({'step': int(step), 'time': time.time(), 'changes': changes})
  fileio.write_text(path, old + record + '\n')   # object stores cannot append: the whole (small) file


# ----------------------------------------------------------------------------------------------------------
# Checking a loaded tree against the model's (big_vision's merge_params).
# ----------------------------------------------------------------------------------------------------------
def _shape(x) -> tuple:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def check_tree(loaded, target, what: str, *, allow_missing: bool = False, limit: int | None = None) -> None:
  """Raises one UsageError naming every parameter of `loaded` that does not fit `target`.

  Lists the unexpected ones (in `loaded`, not in `target`), the ones whose shape differs, and, unless
  `allow_missing` (a partial init such as DINO's), the missing ones. Leaves may be arrays or
  `jax.ShapeDtypeStruct`s; names are param_tree paths ('img_encoder/norm/scale'). `limit`: at most that many
  names per list, then '(+N more)' (a train state of another model differs in hundreds of arrays).
  """
  want = {n: _shape(x) for n, x in param_tree.named_leaves(target)}
  have = {n: _shape(x) for n, x in param_tree.named_leaves(loaded)}
  unexpected = sorted(set(have) - set(want))
  missing = [] if allow_missing else sorted(set(want) - set(have))
  reshaped = sorted(n for n in set(have) & set(want) if have[n] != want[n])
  if not (unexpected or missing or reshaped):
    return
  reshaped = [f'{n} {have[n]} (model {want[n]})' for n in reshaped]
  cut = lambda names: names if limit is None or len(names) <= limit else (  # noqa: E731
      names[:limit] + [f'(+{len(names) - limit} more)'])
  lists = [f'{label} ({len(names)}): {", ".join(cut(names))}' for label, names in (
      ('missing', missing), ('unexpected', unexpected), ('another shape', reshaped)) if names]
  # One line, so the CLIs (which print the first line of an error) show all of it.
  raise errors.UsageError(f'{what} does not fit the model (model config mismatch?): ' + '; '.join(lists))


def merge_params(target, loaded, what: str, *, allow_missing: bool = False):
  """`target` with every leaf that `loaded` holds replaced by it (cast to the target's dtype; placed with the
  target's sharding when the target leaf is a jax.Array). `check_tree` first: nothing is silently dropped."""
  check_tree(loaded, target, what, allow_missing=allow_missing)
  flat = dict(param_tree.named_leaves(loaded))

  def one(path, x):
    name = param_tree.path_str(path)
    if name not in flat:
      return x
    value = np.asarray(flat[name], x.dtype)
    return jax.device_put(value, x.sharding) if isinstance(x, jax.Array) else value
  return jax.tree_util.tree_map_with_path(one, target)


# ----------------------------------------------------------------------------------------------------------
# Param folders: inference checkpoints, DINO and BERT inits.
# ----------------------------------------------------------------------------------------------------------
class CheckpointUnreadable(errors.UsageError):
  """An Orbax folder (training step, variables/) whose files do not read: truncated, damaged, half-deleted."""


def _why(e: BaseException) -> str:
  """'Type: first line' of a library's error (tensorstore's can run to pages)."""
  line = next((x.strip() for x in str(e).splitlines() if x.strip()), '')
  return f'{type(e).__name__}: {line[:240]}' if line else type(e).__name__


@contextlib.contextmanager
def _reading(what: str):
  """An Orbax / JSON read; any failure becomes CheckpointUnreadable('{what} is unreadable (Type: ...)').

  Orbax's aborted reads leave coroutines that print their exception with pages of tensorstore spec when
  they are collected ('Exception ignored in ...'), and reads still in flight that call back into its closed
  event loop ('Event loop is closed'); both are let through here, silently, so the user sees one line.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda u: logging.debug('during a checkpoint read: %s', u.exc_value)
  try:
    yield
  except errors.UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (Orbax, tensorstore, json and the OS: many types)
    gc.collect()
    time.sleep(0.2)   # the failure path only: the in-flight reads finish while their reports are swallowed
    gc.collect()
    raise CheckpointUnreadable(f'{what} is unreadable ({_why(e)})') from e
  finally:
    sys.unraisablehook = hook


def _save_variables(var_dir: str, variables) -> None:
  """Orbax write of a variables tree (local or remote: tensorstore)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(var_dir, variables, force=True)
    ckptr.wait_until_finished()


def _restore_variables(var_dir: str):
  if not fileio.isdir(var_dir):
    raise errors.UsageError(f'expected the Orbax arrays folder {var_dir}: it is missing (write the checkpoint '
                            'again with `python -m ovseg_jax.export` or `python -m ovseg_jax.convert`)')
  with _reading(var_dir), ocp.StandardCheckpointer() as ckptr:
    return _to_numpy(ckptr.restore(var_dir))


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _require(path: str, hint: str) -> None:
  if not fileio.exists(path):
    raise FileNotFoundError(f'expected {path}; {hint}')


def _makedirs(directory: str, flag: str = '') -> None:
  """An output folder; one that is (or is under) a regular file is a one-line UsageError (naming `flag`, e.g.
  '--workdir', when the folder came from one)."""
  if fileio.exists(directory) and not fileio.isdir(directory):
    raise errors.UsageError(f'cannot write to {flag + " " if flag else ""}{directory}: it is a file, not a folder')
  try:
    fileio.makedirs(directory)
  except OSError as e:
    raise errors.UsageError(f'cannot create {flag or "the folder"} {directory} ({_why(e)})') from e


def crc32s(tree) -> dict[str, int]:
  """{param_tree name: CRC-32 of the array's bytes}: checksums.json keeps them, the loaders check them
  (Orbax stores no checksum, and a flipped bit in a compressed chunk can decode to other numbers)."""
  return {name: zlib.crc32(np.ascontiguousarray(x).view(np.uint8)) for name, x in param_tree.named_leaves(tree)}


def _check_crc32s(tree, expected: dict, where: str) -> None:
  got = crc32s(tree)
  bad = sorted(n for n, c in expected.items() if n in got and got[n] != c)
  if bad:
    raise CheckpointUnreadable(f'{where} is damaged: {len(bad)} array(s) do not match the CRC-32 in '
                               f'{CHECKSUMS} ({", ".join(bad[:4])}{", ..." if len(bad) > 4 else ""})')


def save_inference(directory: str, model_config: ml_collections.ConfigDict, variables, meta=None,
                   teacher=None) -> str:
  """Writes an inference checkpoint (module doc); `teacher`: img_encoder params for DIR/teacher, or None.

  Also the writer of `convert dino` folders (variables = {'params': {'img_encoder': partial params}}).
  Returns the absolute folder path.
  """
  directory = fileio.abspath(directory)
  _makedirs(directory)
  variables = _to_numpy(variables)
  sums = {VARIABLES: crc32s(variables)}
  _save_variables(fileio.join(directory, VARIABLES), variables)
  if teacher is not None:
    teacher = {'params': _to_numpy(teacher)}
    sums[TEACHER] = crc32s(teacher)
    _save_variables(fileio.join(directory, TEACHER), teacher)
  fileio.write_text(fileio.join(directory, MODEL_CONFIG), ml_collections.ConfigDict(model_config).to_json(indent=1))
  fileio.write_text(fileio.join(directory, META), json.dumps(meta or {}, indent=1, default=str))
  fileio.write_text(fileio.join(directory, CHECKSUMS), json.dumps(sums))
  return directory


def _is_folder(directory: str) -> None:
  if fileio.exists(directory) and not fileio.isdir(directory):
    raise errors.UsageError(f'{directory} is a file, not a checkpoint folder')


def load_model_config(directory: str) -> ml_collections.ConfigDict:
  """DIR/model_config.json of an inference checkpoint, upgraded (`upgrade_model_config`)."""
  _is_folder(directory)
  path = fileio.join(directory, MODEL_CONFIG)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{directory} is not an ovseg_jax inference checkpoint: expected {path} '
                            '(write one with `python -m ovseg_jax.export` or `python -m ovseg_jax.convert`)')
  cfg = _config_dict(read_json_object(path, 'the config.model of the checkpoint'), path)
  try:
    return upgrade_model_config(cfg, path)
  except (TypeError, AttributeError, KeyError) as e:   # e.g. "vision": 3
    raise errors.UsageError(f'{path} is not a model config ({_why(e)})') from e


def load_meta(directory: str) -> dict:
  """DIR/meta.json of an inference checkpoint ({} when absent); `eval` holds the exporter's eval settings."""
  path = fileio.join(directory, META)
  if not fileio.exists(path):
    return {}
  return read_json_object(path, 'the provenance of the checkpoint')


def _expected_crc32(directory: str, item: str) -> dict:
  """DIR/checksums.json's CRC-32s of `item` ({} for folders written before it existed)."""
  path = fileio.join(directory, CHECKSUMS)
  if not fileio.exists(path):
    return {}
  sums = read_json_object(path, 'the CRC-32s of the arrays').get(item)
  return sums if isinstance(sums, dict) else {}


def load_inference(directory: str, target=None):
  """Reads an inference checkpoint -> (model_config ConfigDict, variables dict of numpy arrays).

  target: the model's variables tree (arrays or `jax.eval_shape` structs); when given, the loaded tree must
  match it exactly (`check_tree`: every missing, unexpected and mis-shaped parameter in one error). The
  arrays are checked against checksums.json when there is one (folders written before it have none).
  """
  directory = fileio.abspath(directory)
  model_config = load_model_config(directory)
  var_dir = fileio.join(directory, VARIABLES)
  variables = _restore_variables(var_dir)
  _check_crc32s(variables, _expected_crc32(directory, VARIABLES), var_dir)
  if target is not None:
    check_tree(variables, target, directory)
  return model_config, variables


def load_teacher(directory: str):
  """DIR/teacher of an inference checkpoint -> img_encoder params (numpy), or None when it has none."""
  directory = fileio.abspath(directory)
  teacher_dir = fileio.join(directory, TEACHER)
  if not fileio.isdir(teacher_dir):
    return None
  teacher = _restore_variables(teacher_dir)
  _check_crc32s(teacher, _expected_crc32(directory, TEACHER), teacher_dir)
  if not isinstance(teacher, dict) or 'params' not in teacher:
    raise errors.UsageError(f'{teacher_dir} holds no params tree')
  return teacher['params']


def save_text_init(directory: str, text_config: ml_collections.ConfigDict, params, meta=None) -> str:
  """Writes a BERT init folder (module doc); -> its absolute path."""
  directory = fileio.abspath(directory)
  _makedirs(directory)
  variables = {'params': _to_numpy(params)}
  _save_variables(fileio.join(directory, VARIABLES), variables)
  fileio.write_text(fileio.join(directory, TEXT_CONFIG), ml_collections.ConfigDict(text_config).to_json(indent=1))
  fileio.write_text(fileio.join(directory, META), json.dumps(meta or {}, indent=1, default=str))
  fileio.write_text(fileio.join(directory, CHECKSUMS), json.dumps({VARIABLES: crc32s(variables)}))
  return directory


def load_text_init(directory: str):
  """Reads a BERT init folder -> (text_config ConfigDict, BertModel params as numpy arrays)."""
  directory = fileio.abspath(directory)
  _is_folder(directory)
  config_path = fileio.join(directory, TEXT_CONFIG)
  _require(config_path, 'write it with `python -m ovseg_jax.convert bert --src HF_DIR --dst DIR`')
  text_config = _config_dict(read_json_object(config_path, 'the config.model.text of the init'), config_path)
  var_dir = fileio.join(directory, VARIABLES)
  _require(var_dir, 'the Orbax BERT params are missing; write them again with `python -m ovseg_jax.convert bert`')
  variables = _restore_variables(var_dir)
  _check_crc32s(variables, _expected_crc32(directory, VARIABLES), var_dir)
  if not isinstance(variables, dict) or 'params' not in variables:
    raise errors.UsageError(f'{var_dir} holds no params tree')
  return text_config, variables['params']


def read_init(path: str):
  """An init source -> (params partial tree, batch_stats or None, teacher img_encoder params or None).

  Accepts a training workdir (its latest checkpoint), an inference checkpoint (`convert official`,
  `export`; its `teacher/` is the EMA teacher), a `convert dino` folder, or a `convert bert` folder (whose
  params become {'text_encoder': ...}). Place the trees with `merge_params(..., allow_missing=True)`.
  """
  if not fileio.exists(path):
    raise errors.UsageError(f'--config.train.init_from / init_bert: {path} does not exist')
  ckpt_dir = train_checkpoint_dir(path)
  if fileio.isdir(ckpt_dir):
    ckpt = TrainCheckpointer(ckpt_dir, save_every=1, keep=0)
    try:
      _, raw, _ = ckpt.restore_newest(ckpt.restore_params)
    finally:
      ckpt.close()
    return raw['params'], raw.get('batch_stats'), raw.get('ema') or None
  var_dir = fileio.join(path, VARIABLES)
  if not fileio.isdir(var_dir):
    raise errors.UsageError(f'{path} is neither a training workdir nor a converted checkpoint (no {var_dir}); '
                            'write one with `python -m ovseg_jax.convert official|dino|bert --src ... --dst DIR`')
  variables = _restore_variables(var_dir)
  _check_crc32s(variables, _expected_crc32(path, VARIABLES), var_dir)
  if not isinstance(variables, dict) or 'params' not in variables:
    raise errors.UsageError(f'{var_dir} holds no params tree')
  params = variables['params']
  if fileio.isfile(fileio.join(path, TEXT_CONFIG)) or 'embeddings' in params:
    params = {'text_encoder': params}   # `convert bert` writes the bare BertModel tree
  return params, variables.get('batch_stats'), load_teacher(path)


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints (Orbax CheckpointManager).
# ----------------------------------------------------------------------------------------------------------
# A training workdir holds WORKDIR/config.json and WORKDIR/checkpoints/<step>/ with three items:
#   state      the train-state dict (train_step.py), saved from its sharded arrays (every host its shards)
#   data_iter  JSON state of the input iterator, so a resumed run continues with the next batch
#   meta       JSON: step, base rng key data, wall time, config_digest (`config_digest`) and config (the
#              resolved config that saved it: `check_resume` diffs a resume's config against it)
# Saves are asynchronous (the step loop continues while Orbax writes); the manager keeps the latest
# `keep` checkpoints (preservation policy LatestN). A step that does not read (a truncated file, ...) is
# skipped for the newest one that does (`restore_newest`, with a warning naming it); the trainer then moves it
# to WORKDIR/checkpoints_unreadable/<step> (`set_aside`), out of the way of new saves and of LatestN, and
# never deletes it.
UNREADABLE = 'checkpoints_unreadable'


class TrainCheckpointer:
  """Orbax CheckpointManager for the train state + data-iterator state + meta.

  Example:
    ckpt = TrainCheckpointer(train_checkpoint_dir(workdir), save_every=1000, keep=3, config=config)
    if ckpt.latest_step() is not None:
      step, (state, data_state, meta), unreadable = ckpt.restore_newest(
          lambda s: ckpt.restore(abstract_state_with_shardings, s))
    ckpt.save(step, state, data_state, meta)          # no-op unless step % save_every == 0 (or force)
    ckpt.close()                                      # waits for the async writes

  `config` (the run's resolved config) puts its digest and itself into every meta; `config_digest` alone
  only the digest.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
               config_digest: str | None = None, config: ml_collections.ConfigDict | None = None):
    directory = fileio.abspath(directory)
    fileio.check_backend(directory)   # Orbax lists and creates folders through epath too
    self.directory = directory
    self.config = None if config is None else json.loads(config_json(config))
    self.config_digest = _sha256(config_json(config)) if config is not None else config_digest
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.FixedIntervalPolicy(max(int(save_every), 1)),
        preservation_policy=policies.LatestN(n=int(keep) if keep > 0 else None),
        enable_async_checkpointing=async_save,
        create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=('state', 'data_iter', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, data_state: dict | None = None, meta: dict | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of `state` at `step` when the policy says so or `force`; -> saved?"""
    meta = dict(meta or {}, step=int(step))
    if self.config_digest:
      meta['config_digest'] = self.config_digest
    if self.config is not None:
      meta['config'] = self.config
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(meta))
    return self.manager.save(int(step), args=args, force=force)

  def restore(self, abstract_state, step: int | None = None):
    """-> (state, data_state, meta) of `step` (default latest).

    `abstract_state` is a tree of `jax.ShapeDtypeStruct`s carrying the *target* shardings (e.g.
    `sharding.with_shardings(jax.eval_shape(...), shardings)`), so the arrays are read straight into the
    current mesh, whatever mesh wrote them.
    """
    step = self._step(step)
    what = self._what(step)
    with _reading(what):
      saved = self._state_metadata(step)
    # Another model (or stage) is named as such, not as a damaged file: every older step would fail alike.
    check_tree(saved, abstract_state, what, limit=6)
    with _reading(what):
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data_iter=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    saved = out['meta'].get('config_digest')
    if self.config_digest and saved and saved != self.config_digest:
      logging.warning('resuming step %d of %s with another config than the one that saved it (config digest '
                      '%s..., saved %s...)', step, self.directory, self.config_digest[:12], saved[:12])
    return out['state'], out['data_iter'], out['meta']

  def _step(self, step: int | None) -> int:
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no training checkpoint in {self.directory}')
    return int(step)

  def _what(self, step: int) -> str:
    return f'checkpoint step {step} in {self.directory}'

  def _state_metadata(self, step: int):
    """The saved state's tree of array metadata (shapes, dtypes), without reading an array."""
    path = fileio.join(self.directory, str(step), 'state')
    # Straight from the item's handler: Checkpointer.metadata() would also look for a step-level
    # _CHECKPOINT_METADATA inside the item folder and warn that it is missing.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return handler.metadata(epath.Path(path)).tree
    finally:
      handler.close()

  def read_meta(self, step: int | None = None) -> dict:
    """Only the meta JSON of `step` (config, digest, rng, time)."""
    step = self._step(step)
    with _reading(self._what(step)):
      meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    if not isinstance(meta, dict):
      raise CheckpointUnreadable(f'{self._what(step)} is unreadable (its meta is not a JSON object)')
    return meta

  def restore_data_state(self, step: int | None = None) -> dict:
    """Only the data-iterator state of `step` (the input is opened before the train state is built)."""
    step = self._step(step)
    with _reading(self._what(step)):
      return self.manager.restore(step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore()))['data_iter']

  def restore_params(self, step: int | None = None) -> dict:
    """The raw saved state tree (numpy, host memory) without a target: for init_from and export."""
    step = self._step(step)
    path = fileio.join(self.directory, str(step), 'state')
    with _reading(self._what(step)):
      tree = self._state_metadata(step)
      with ocp.PyTreeCheckpointer() as ckptr:
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, restore_args=restore_args)

  def restore_newest(self, read, newest: int | None = None):
    """`read(step)` on the newest step (at most `newest`) that reads -> (step, what it read, [the newer
    unreadable steps]).

    A step whose read raises CheckpointUnreadable is skipped for the one before it, and named in a warning
    once an older one has read; nothing is deleted (see `set_aside`). No step: FileNotFoundError; none
    readable: one CheckpointUnreadable naming each with its reason. Other errors (e.g. a checkpoint of
    another model) are raised as they are.
    """
    steps = [s for s in sorted(self.all_steps(), reverse=True) if newest is None or s <= newest]
    if not steps:
      raise FileNotFoundError(f'no training checkpoint in {self.directory}')
    failed = []
    for step in steps:
      try:
        out = read(step)
      except CheckpointUnreadable as e:
        failed.append((step, e))
        continue
      for _, e in failed:
        logging.warning('%s; using step %d instead', e, step)
      return step, out, [s for s, _ in failed]
    raise CheckpointUnreadable(f'no readable checkpoint in {self.directory}: ' + '; '.join(
        str(e).replace(f' in {self.directory}', '') for _, e in failed))

  def set_aside(self, steps) -> str:
    """Moves the folders of unreadable `steps` to WORKDIR/checkpoints_unreadable/<step> (process 0): out of
    the way of a new save of that step and of LatestN, which would delete it; kept for the user to inspect.
    -> the folder they are in. A move that fails (e.g. an object store without folder renames) is a one-line
    UsageError asking the user to move them, before the run writes anything."""
    root = fileio.join(fileio.path(self.directory).parent, UNREADABLE)
    if jax.process_index() == 0 and steps:
      for step in steps:
        src = fileio.path(fileio.join(self.directory, str(step)))
        dst, n = fileio.path(fileio.join(root, str(step))), 1
        while dst.exists():
          dst, n = fileio.path(fileio.join(root, f'{step}.{n}')), n + 1
        try:
          dst.parent.mkdir(parents=True, exist_ok=True)
          src.rename(dst)
        except Exception as e:  # pylint: disable=broad-except  (epath backends raise their own types)
          raise errors.UsageError(f'{self._what(step)} is unreadable and could not be moved to {dst} '
                                  f'({_why(e)}); move it out of {self.directory} yourself, then resume') from e
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('ovseg_jax.checkpoint.set_aside')
    self.manager.reload()
    return root

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train_checkpoint_dir(workdir: str) -> str:
  return fileio.join(workdir, CHECKPOINTS)


def saved_steps(workdir: str) -> list[int]:
  """The step folders in WORKDIR/checkpoints, sorted, read from the listing alone (no Orbax): for a line
  printed on the way out (Ctrl-C). Orbax's unfinished saves ('6.orbax-checkpoint-tmp-...') are not steps."""
  try:
    return sorted(int(n) for n in fileio.listdir(train_checkpoint_dir(workdir)) if n.isdigit())
  except Exception:  # pylint: disable=broad-except  (no folder, no backend: nothing to report)
    return []


def read_workdir(workdir: str, step: int | None = None):
  """A training workdir -> (the config that saved the step (upgraded), the raw saved train state (numpy),
  step).

  Default step: the newest that reads (an unreadable newer one is named in a warning); a given `step` that
  does not read is a one-line CheckpointUnreadable. The config is the one in the step's meta, else (older
  checkpoints) WORKDIR/config.json.
  """
  config_path, ckpt_dir = fileio.join(workdir, CONFIG), train_checkpoint_dir(workdir)
  if fileio.exists(workdir) and not fileio.isdir(workdir):
    raise errors.UsageError(f'{workdir} is a file, not a training workdir')
  if not fileio.isdir(ckpt_dir):
    if not fileio.isfile(config_path):
      raise FileNotFoundError(f'{workdir} is not a training workdir: {config_path} is missing')
    raise FileNotFoundError(f'no training checkpoint in {ckpt_dir}')
  ckpt = TrainCheckpointer(ckpt_dir, save_every=1, keep=0)
  try:
    if step is None:
      step, state, _ = ckpt.restore_newest(ckpt.restore_params)
    else:
      if int(step) not in ckpt.all_steps():
        raise FileNotFoundError(f'no checkpoint step {step} in {ckpt.directory} (steps: '
                                f'{", ".join(map(str, ckpt.all_steps())) or "none"})')
      state = ckpt.restore_params(step)
    try:
      meta = ckpt.read_meta(step)
    except CheckpointUnreadable as e:
      logging.warning('%s; the weights are paired with %s', e, config_path)
      meta = {}
  finally:
    ckpt.close()
  if isinstance(meta.get('config'), dict):
    where = f'the config saved with step {step} in {workdir}'
    return upgrade_config(_config_dict(meta['config'], where), where), state, int(step)
  config = load_workdir_config(workdir)
  if meta.get('config_digest') and meta['config_digest'] != _sha256(fileio.read_text(config_path)):
    logging.warning('%s was rewritten after step %d was saved (its sha256 differs from the digest in the '
                    'checkpoint); the weights are checked against the model it describes', config_path, step)
  return config, state, int(step)
