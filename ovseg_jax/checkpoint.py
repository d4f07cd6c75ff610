"""Orbax checkpoints: the inference-params format (exported / converted models).

An inference checkpoint is a folder:
    DIR/model_config.json   the `config.model` ConfigDict it was built with (JSON)
    DIR/variables/          Orbax StandardCheckpointer tree {'params': ..., 'batch_stats': ...} of `OVSegmentor`
    DIR/meta.json           provenance (source file, converter, step), free-form
`save_inference` / `load_inference` are its only writer and reader; `convert`, `export`, `inference` and
`evaluate` all go through them.
"""

import json
import os

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

MODEL_CONFIG = 'model_config.json'
VARIABLES = 'variables'
META = 'meta.json'


def _is_remote(path: str) -> bool:
  return '://' in path


def save_inference(directory: str, model_config: ml_collections.ConfigDict, variables, meta=None) -> str:
  """Writes an inference checkpoint (see module doc). Returns the absolute folder path."""
  directory = directory if _is_remote(directory) else os.path.abspath(directory)
  os.makedirs(directory, exist_ok=True) if not _is_remote(directory) else None
  var_dir = os.path.join(directory, VARIABLES)
  variables = jax.tree.map(np.asarray, variables)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(var_dir, variables, force=True)
    ckptr.wait_until_finished()
  with open(os.path.join(directory, MODEL_CONFIG), 'w') as f:
    f.write(model_config.to_json(indent=1))
  with open(os.path.join(directory, META), 'w') as f:
    json.dump(meta or {}, f, indent=1, default=str)
  return directory


def load_model_config(directory: str) -> ml_collections.ConfigDict:
  path = os.path.join(directory, MODEL_CONFIG)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} is not an ovseg_jax inference checkpoint: expected {path} '
                            '(write one with `python -m ovseg_jax.export` or `python -m ovseg_jax.convert`)')
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def load_inference(directory: str):
  """Reads an inference checkpoint -> (model_config ConfigDict, variables dict of numpy arrays)."""
  directory = directory if _is_remote(directory) else os.path.abspath(directory)
  model_config = load_model_config(directory)
  var_dir = os.path.join(directory, VARIABLES)
  if not os.path.exists(var_dir):
    raise FileNotFoundError(f'expected Orbax variables at {var_dir}')
  with ocp.StandardCheckpointer() as ckptr:
    variables = ckptr.restore(var_dir)
  return model_config, variables
