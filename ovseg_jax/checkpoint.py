"""On-disk formats. This is the one module that reads and writes them, and the only one that calls Orbax.

Inference checkpoint (written by `export` and `convert official`; read by `Segmenter`, `evaluate`, init_from):
    DIR/model_config.json  the `config.model` ConfigDict it was built with (JSON)
    DIR/variables/         Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...} of `OVSegmentor`
    DIR/meta.json          provenance (source, converter or exporter, step) and `eval`, the eval settings of
                           the training config; free-form
    DIR/teacher/           optional: Orbax tree {'params': img_encoder params} of an EMA teacher (the authors'
                           stage-2 files; `export --format official` writes it back as img_encoder_momentum)
DINO init (`convert dino`): the same layout, holding only the img_encoder params DINO provides.
BERT init (`convert bert`): DIR/text_config.json (`config.model.text`), DIR/variables/ {'params': BertModel
    params}, DIR/meta.json.
Training workdir: WORKDIR/config.json (the resolved config) and WORKDIR/checkpoints/ (`TrainCheckpointer`).

Loading against a model: `check_tree` / `merge_params` name every missing, unexpected and mis-shaped
parameter in one error, as big_vision's models/common.merge_params does. Old files are upgraded when read:
`upgrade_model_config` fills the `config.model` keys added after the format was first written.
Every path may be local or remote (gs://...): JSON goes through fileio.py, arrays through Orbax (tensorstore).
"""

import hashlib
import json

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
TEACHER = 'teacher'
CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
EXPERIMENTS_TAG = 'experiments/grouping-levers'

# Keys of `config.model` added after the inference format was first written, with the value that rebuilds
# the model the older files hold. `upgrade_model_config` fills them when such a file is read.
MODEL_KEYS_ADDED = {
    'remat': 'none',                   # rematerialisation of the blocks: a training-memory switch
    'vision.stem_channels': (),        # () = the authors' linear patch embed (the conv stem came later)
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


def config_digest(config: ml_collections.ConfigDict) -> str:
  """sha256 of `config_json(config)`: saved in every training checkpoint's meta, checked on resume."""
  return hashlib.sha256(config_json(config).encode()).hexdigest()


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """WORKDIR/config.json: the resolved config (every default and override) of this run (process 0)."""
  if jax.process_index() == 0:
    fileio.write_text(fileio.join(workdir, CONFIG), config_json(config))


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  """WORKDIR/config.json -> the run's config (upgraded, see `upgrade_config`)."""
  path = fileio.join(workdir, CONFIG)
  if not fileio.isfile(path):
    raise FileNotFoundError(f'{workdir} is not a training workdir: {path} is missing')
  return upgrade_config(ml_collections.ConfigDict(json.loads(fileio.read_text(path))), path)


# ----------------------------------------------------------------------------------------------------------
# Checking a loaded tree against the model's (big_vision's merge_params).
# ----------------------------------------------------------------------------------------------------------
def _shape(x) -> tuple:
  return tuple(x.shape) if hasattr(x, 'shape') else np.shape(x)


def check_tree(loaded, target, what: str, *, allow_missing: bool = False) -> None:
  """Raises one UsageError naming every parameter of `loaded` that does not fit `target`.

  Lists the unexpected ones (in `loaded`, not in `target`), the ones whose shape differs, and, unless
  `allow_missing` (a partial init such as DINO's), the missing ones. Leaves may be arrays or
  `jax.ShapeDtypeStruct`s; names are param_tree paths ('img_encoder/norm/scale').
  """
  want = {n: _shape(x) for n, x in param_tree.named_leaves(target)}
  have = {n: _shape(x) for n, x in param_tree.named_leaves(loaded)}
  unexpected = sorted(set(have) - set(want))
  missing = [] if allow_missing else sorted(set(want) - set(have))
  reshaped = sorted(n for n in set(have) & set(want) if have[n] != want[n])
  if not (unexpected or missing or reshaped):
    return
  reshaped = [f'{n} {have[n]} (model {want[n]})' for n in reshaped]
  lists = [f'{label} ({len(names)}): {", ".join(names)}' for label, names in (
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
def _save_variables(var_dir: str, variables) -> None:
  """Orbax write of a variables tree (local or remote: tensorstore)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(var_dir, variables, force=True)
    ckptr.wait_until_finished()


def _restore_variables(var_dir: str):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(var_dir)


def _to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def _require(path: str, hint: str) -> None:
  if not fileio.exists(path):
    raise FileNotFoundError(f'expected {path}; {hint}')


def save_inference(directory: str, model_config: ml_collections.ConfigDict, variables, meta=None,
                   teacher=None) -> str:
  """Writes an inference checkpoint (module doc); `teacher`: img_encoder params for DIR/teacher, or None.

  Also the writer of `convert dino` folders (variables = {'params': {'img_encoder': partial params}}).
  Returns the absolute folder path.
  """
  directory = fileio.abspath(directory)
  fileio.makedirs(directory)
  _save_variables(fileio.join(directory, VARIABLES), _to_numpy(variables))
  if teacher is not None:
    _save_variables(fileio.join(directory, TEACHER), {'params': _to_numpy(teacher)})
  fileio.write_text(fileio.join(directory, MODEL_CONFIG), ml_collections.ConfigDict(model_config).to_json(indent=1))
  fileio.write_text(fileio.join(directory, META), json.dumps(meta or {}, indent=1, default=str))
  return directory


def load_model_config(directory: str) -> ml_collections.ConfigDict:
  """DIR/model_config.json of an inference checkpoint, upgraded (`upgrade_model_config`)."""
  path = fileio.join(directory, MODEL_CONFIG)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{directory} is not an ovseg_jax inference checkpoint: expected {path} '
                            '(write one with `python -m ovseg_jax.export` or `python -m ovseg_jax.convert`)')
  return upgrade_model_config(ml_collections.ConfigDict(json.loads(fileio.read_text(path))), path)


def load_meta(directory: str) -> dict:
  """DIR/meta.json of an inference checkpoint ({} when absent); `eval` holds the exporter's eval settings."""
  path = fileio.join(directory, META)
  if not fileio.exists(path):
    return {}
  return json.loads(fileio.read_text(path))


def load_inference(directory: str, target=None):
  """Reads an inference checkpoint -> (model_config ConfigDict, variables dict of numpy arrays).

  target: the model's variables tree (arrays or `jax.eval_shape` structs); when given, the loaded tree must
  match it exactly (`check_tree`: every missing, unexpected and mis-shaped parameter in one error).
  """
  directory = fileio.abspath(directory)
  model_config = load_model_config(directory)
  var_dir = fileio.join(directory, VARIABLES)
  if not fileio.exists(var_dir):
    raise FileNotFoundError(f'expected Orbax variables at {var_dir}')
  variables = _to_numpy(_restore_variables(var_dir))
  if target is not None:
    check_tree(variables, target, directory)
  return model_config, variables


def load_teacher(directory: str):
  """DIR/teacher of an inference checkpoint -> img_encoder params (numpy), or None when it has none."""
  teacher_dir = fileio.join(fileio.abspath(directory), TEACHER)
  if not fileio.isdir(teacher_dir):
    return None
  return _to_numpy(_restore_variables(teacher_dir))['params']


def save_text_init(directory: str, text_config: ml_collections.ConfigDict, params, meta=None) -> str:
  """Writes a BERT init folder (module doc); -> its absolute path."""
  directory = fileio.abspath(directory)
  fileio.makedirs(directory)
  _save_variables(fileio.join(directory, VARIABLES), {'params': _to_numpy(params)})
  fileio.write_text(fileio.join(directory, TEXT_CONFIG), ml_collections.ConfigDict(text_config).to_json(indent=1))
  fileio.write_text(fileio.join(directory, META), json.dumps(meta or {}, indent=1, default=str))
  return directory


def load_text_init(directory: str):
  """Reads a BERT init folder -> (text_config ConfigDict, BertModel params as numpy arrays)."""
  directory = fileio.abspath(directory)
  config_path = fileio.join(directory, TEXT_CONFIG)
  _require(config_path, 'write it with `python -m ovseg_jax.convert bert --src HF_DIR --dst DIR`')
  text_config = ml_collections.ConfigDict(json.loads(fileio.read_text(config_path)))
  var_dir = fileio.join(directory, VARIABLES)
  _require(var_dir, 'the Orbax BERT params are missing; write them again with `python -m ovseg_jax.convert bert`')
  return text_config, _to_numpy(_restore_variables(var_dir))['params']


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
      raw = ckpt.restore_params()
    finally:
      ckpt.close()
    return raw['params'], raw.get('batch_stats'), raw.get('ema') or None
  var_dir = fileio.join(path, VARIABLES)
  if not fileio.isdir(var_dir):
    raise errors.UsageError(f'{path} is neither a training workdir nor a converted checkpoint (no {var_dir}); '
                            'write one with `python -m ovseg_jax.convert official|dino|bert --src ... --dst DIR`')
  variables = _to_numpy(_restore_variables(var_dir))
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
#   meta       JSON: step, base rng key data, wall time, config_digest (`config_digest`: a resume with
#              another config logs a warning)
# Saves are asynchronous (the step loop continues while Orbax writes); the manager keeps the latest
# `keep` checkpoints (preservation policy LatestN).


class TrainCheckpointer:
  """Orbax CheckpointManager for the train state + data-iterator state + meta.

  Example:
    ckpt = TrainCheckpointer(train_checkpoint_dir(workdir), save_every=1000, keep=3,
                             config_digest=config_digest(config))
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(abstract_state_with_shardings)
    ckpt.save(step, state, data_state, meta)          # no-op unless step % save_every == 0 (or force)
    ckpt.close()                                      # waits for the async writes
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True,
               config_digest: str | None = None):
    directory = fileio.abspath(directory)
    fileio.check_backend(directory)   # Orbax lists and creates folders through epath too
    self.directory = directory
    self.config_digest = config_digest
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
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no training checkpoint in {self.directory}')
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data_iter=ocp.args.JsonRestore(),
        meta=ocp.args.JsonRestore()))
    saved = out['meta'].get('config_digest')
    if self.config_digest and saved and saved != self.config_digest:
      logging.warning('resuming step %d of %s with another config than the one that saved it (config digest '
                      '%s..., saved %s...); WORKDIR/config.json now holds the new one', step, self.directory,
                      self.config_digest[:12], saved[:12])
    return out['state'], out['data_iter'], out['meta']

  def restore_data_state(self, step: int | None = None) -> dict:
    """Only the data-iterator state of `step` (the input is opened before the train state is built)."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(data_iter=ocp.args.JsonRestore()))
    return out['data_iter']

  def restore_params(self, step: int | None = None) -> dict:
    """The raw saved state tree (numpy, host memory) without a target: for init_from and export."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no training checkpoint in {self.directory}')
    path = fileio.join(self.directory, str(step), 'state')
    # The item's tree metadata straight from its handler: Checkpointer.metadata() would also look for a
    # step-level _CHECKPOINT_METADATA inside the item folder and warn that it is missing.
    handler = ocp.PyTreeCheckpointHandler()
    try:
      tree = handler.metadata(epath.Path(path)).tree
    finally:
      handler.close()
    with ocp.PyTreeCheckpointer() as ckptr:
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
      return ckptr.restore(path, restore_args=restore_args)

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def train_checkpoint_dir(workdir: str) -> str:
  return fileio.join(workdir, CHECKPOINTS)


def read_workdir(workdir: str, step: int | None = None):
  """A training workdir -> (its config (upgraded), the raw saved train state (numpy), step (default latest))."""
  config = load_workdir_config(workdir)
  ckpt = TrainCheckpointer(train_checkpoint_dir(workdir), save_every=1, keep=0)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no training checkpoint in {ckpt.directory}')
    state = ckpt.restore_params(step)
  finally:
    ckpt.close()
  return config, state, int(step)
