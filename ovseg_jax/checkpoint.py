"""Orbax checkpoints: the inference-params format (exported / converted models).

An inference checkpoint is a folder:
    DIR/model_config.json   the `config.model` ConfigDict it was built with (JSON)
    DIR/variables/          Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...} of `OVSegmentor`
    DIR/meta.json           provenance (source file, converter, step), free-form
`save_inference` / `load_inference` are its only writer and reader; `convert`, `export`, `inference` and
`evaluate` all go through them.
"""

import json

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ovseg_jax import fileio

MODEL_CONFIG = 'model_config.json'
VARIABLES = 'variables'
META = 'meta.json'


def _save_variables(var_dir: str, variables) -> None:
  """Orbax write of an inference variables tree (local or remote: tensorstore)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(var_dir, variables, force=True)
    ckptr.wait_until_finished()


def _restore_variables(var_dir: str):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(var_dir)


def save_inference(directory: str, model_config: ml_collections.ConfigDict, variables, meta=None) -> str:
  """Writes an inference checkpoint (see module doc). Returns the absolute folder path."""
  directory = fileio.abspath(directory)
  fileio.makedirs(directory)
  _save_variables(fileio.join(directory, VARIABLES), jax.tree.map(np.asarray, variables))
  fileio.write_text(fileio.join(directory, MODEL_CONFIG), model_config.to_json(indent=1))
  fileio.write_text(fileio.join(directory, META), json.dumps(meta or {}, indent=1, default=str))
  return directory


def load_model_config(directory: str) -> ml_collections.ConfigDict:
  path = fileio.join(directory, MODEL_CONFIG)
  if not fileio.exists(path):
    raise FileNotFoundError(f'{directory} is not an ovseg_jax inference checkpoint: expected {path} '
                            '(write one with `python -m ovseg_jax.export` or `python -m ovseg_jax.convert`)')
  return ml_collections.ConfigDict(json.loads(fileio.read_text(path)))


def load_meta(directory: str) -> dict:
  """DIR/meta.json of an inference checkpoint ({} when absent); `eval` holds the exporter's eval settings."""
  path = fileio.join(directory, META)
  if not fileio.exists(path):
    return {}
  return json.loads(fileio.read_text(path))


def load_inference(directory: str):
  """Reads an inference checkpoint -> (model_config ConfigDict, variables dict of numpy arrays)."""
  directory = fileio.abspath(directory)
  model_config = load_model_config(directory)
  var_dir = fileio.join(directory, VARIABLES)
  if not fileio.exists(var_dir):
    raise FileNotFoundError(f'expected Orbax variables at {var_dir}')
  return model_config, _restore_variables(var_dir)


# ----------------------------------------------------------------------------------------------------------
# Training checkpoints (Orbax CheckpointManager).
# ----------------------------------------------------------------------------------------------------------
# A training workdir holds WORKDIR/config.json and WORKDIR/checkpoints/<step>/ with three items:
#   state      the train-state dict (train_step.py), saved from its sharded arrays (every host its shards)
#   data_iter  JSON state of the input iterator, so a resumed run continues with the next batch
#   meta       JSON: step, base rng key data, wall time, config digest
# Saves are asynchronous (the step loop continues while Orbax writes); the manager keeps the latest
# `keep` checkpoints (preservation policy LatestN).
CHECKPOINTS = 'checkpoints'


class TrainCheckpointer:
  """Orbax CheckpointManager for the train state + data-iterator state + meta.

  Example:
    ckpt = TrainCheckpointer(fileio.join(workdir, 'checkpoints'), save_every=1000, keep=3)
    if ckpt.latest_step() is not None:
      state, data_state, meta = ckpt.restore(abstract_state_with_shardings)
    ckpt.save(step, state, data_state, meta)          # no-op unless step % save_every == 0 (or force)
    ckpt.close()                                      # waits for the async writes
  """

  def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
    directory = fileio.abspath(directory)
    fileio.check_backend(directory)   # Orbax lists and creates folders through epath too
    self.directory = directory
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
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data_iter=ocp.args.JsonSave(data_state or {}),
        meta=ocp.args.JsonSave(dict(meta or {}, step=int(step))))
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
