"""Device mesh, sharding rules for the train state, and multi-host batch assembly.

Mesh: `config.mesh = (('data', -1), ('fsdp', 1))` -> a `Mesh` of shape [data, fsdp] (-1 = all remaining
devices). The batch is split over both axes (`P(('data', 'fsdp'))` on its leading dim), so every device sees
global_batch / num_devices examples.

State sharding (params, optimizer state, EMA teacher, BN stats alike) is decided per leaf by
`config.sharding.rules`, a table of (regex on the '/'-joined path, rule), first match wins:
  * 'fsdp': split the largest axis whose length is divisible by the 'fsdp' mesh size over 'fsdp'
    (ties -> the last such axis); arrays smaller than `fsdp_min_size` elements, scalars and arrays without a
    divisible axis stay replicated. With fsdp = 1 this is plain data parallelism.
  * 'replicate': a full copy on every device.
The rule is shape-driven, so an AdamW moment gets the sharding of its parameter without a second table.

Nothing large is built unsharded: `abstract_state` traces `init` with `jax.eval_shape` and derives the
shardings from the abstract tree (the restore target of a resumed run); `create_sharded_state` then
materialises each shard on its device with `jit(out_shardings=...)`.
"""

import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ovseg_jax import param_tree

BATCH_AXES = ('data', 'fsdp')


# ----------------------------------------------------------------------------------------------------------
# Multi-host.
# ----------------------------------------------------------------------------------------------------------
def maybe_initialize_distributed(config: ml_collections.ConfigDict) -> None:
  """`jax.distributed.initialize()` (coordinator, process id/count from the TPU/SLURM/env) when asked."""
  if config.distributed and not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info('jax.distributed: process %d of %d, %d local / %d global devices',
                 jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


# ----------------------------------------------------------------------------------------------------------
# Mesh.
# ----------------------------------------------------------------------------------------------------------
def mesh_shape(axes: Sequence[tuple[str, int]], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """(('data', -1), ('fsdp', 2)) with 8 devices -> (('data', 'fsdp'), (4, 2))."""
  names = tuple(a for a, _ in axes)
  sizes = [int(s) for _, s in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh={axes}: at most one axis may have size -1')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh={axes}: {num_devices} devices are not divisible by {known}')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f'mesh={axes} has {int(np.prod(sizes))} slots but there are {num_devices} devices')
  return names, tuple(sizes)


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The device mesh of `config.mesh` over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(axes, len(devices))
  # Auto axes: GSPMD propagates the shardings of params and batch through the model (jax 0.10's make_mesh
  # defaults to Explicit axes, which would need a sharding annotation on every op of the model).
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  if len(devices) == jax.device_count():
    return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=auto)


# ----------------------------------------------------------------------------------------------------------
# Rules.
# ----------------------------------------------------------------------------------------------------------
def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int) -> P:
  """PartitionSpec splitting the largest axis divisible by `fsdp_size` over 'fsdp' (else replicated)."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  best = None
  for i, n in enumerate(shape):
    if n % fsdp_size == 0 and (best is None or n >= shape[best]):
      best = i
  if best is None:
    return P()
  spec = [None] * len(shape)
  spec[best] = 'fsdp'
  return P(*spec)


def leaf_spec(name: str, shape: Sequence[int], mesh: Mesh, sharding_cfg: ml_collections.ConfigDict) -> P:
  """The PartitionSpec of one state leaf by the rules table (see module docstring)."""
  fsdp = mesh.shape.get('fsdp', 1)
  for pattern, rule in sharding_cfg.rules:
    if re.fullmatch(pattern, name) or re.search(f'(^|/){pattern}$', name):
      if rule == 'replicate':
        return P()
      if rule == 'fsdp':
        return fsdp_spec(shape, fsdp, sharding_cfg.fsdp_min_size)
      raise ValueError(f"sharding rule {rule!r} for {pattern!r}: expected 'fsdp' or 'replicate'")
  return P()


def tree_shardings(abstract_tree, mesh: Mesh, sharding_cfg: ml_collections.ConfigDict):
  """NamedShardings for every leaf of an (abstract) state tree."""
  def one(path, x):
    return NamedSharding(mesh, leaf_spec(param_tree.path_str(path), np.shape(x), mesh, sharding_cfg))
  return jax.tree_util.tree_map_with_path(one, abstract_tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over every mesh axis that exists among ('data', 'fsdp')."""
  axes = tuple(a for a in BATCH_AXES if a in mesh.shape)
  return NamedSharding(mesh, P(axes))


def with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying their target sharding (restore targets, AOT lowering)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                      abstract_tree, shardings)


def abstract_state(init_fn: Callable[..., Any], mesh: Mesh, sharding_cfg, *args):
  """-> (target, shardings): `init_fn(*args)` traced with `jax.eval_shape` (no FLOPs, no memory), as
  ShapeDtypeStructs that carry the shardings of the rules (a restore target, or input to AOT lowering)."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, sharding_cfg)
  return with_shardings(abstract, shardings), shardings


def create_sharded_state(init_fn: Callable[..., Any], mesh: Mesh, sharding_cfg, *args):
  """-> (state, shardings). `init_fn(*args)` is run under jit with its outputs born sharded."""
  _, shardings = abstract_state(init_fn, mesh, sharding_cfg, *args)
  state = jax.jit(init_fn, out_shardings=shardings)(*args)
  return state, shardings


def per_device_bytes(tree) -> int:
  """Bytes of `tree` held by the first addressable device (the FSDP check: ~ total / fsdp)."""
  dev = jax.local_devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for s in x.addressable_shards:
      if s.device == dev:
        total += s.data.size * s.data.dtype.itemsize
  return total


# ----------------------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------------------
def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch [b, ...] -> global arrays [b * process_count, ...].

  Every process passes its own disjoint `b = global_batch / process_count` examples, the global rows
  `process_batch_rows(mesh, global_batch)` in order; the local devices of the process hold them
  (`jax.make_array_from_process_local_data`). Single-process: a sharded device_put.
  """
  sharding = batch_sharding(mesh)
  n = jax.process_count()

  def one(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0] * n,) + x.shape[1:])
  return {k: one(v) for k, v in batch.items()}


def process_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """The rows of a [global_batch, ...] batch that this process's devices hold, ascending: the rows its host
  batch must contain, in this order, for `host_batch_to_global` to assemble the same global batch on any
  number of processes (data/pipeline.py `host_rows`). Contiguous unless the mesh interleaves processes."""
  index = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  rows = set()
  for idx in index.values():
    rows.update(range(*idx[0].indices(global_batch)))
  return np.asarray(sorted(rows), np.int64)


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  n = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
  if global_batch % n:
    raise ValueError(f'--config.train.global_batch_size={global_batch} must be divisible by the {n} devices '
                     f'of the batch axes {BATCH_AXES} of mesh {dict(mesh.shape)}')
  if global_batch % jax.process_count():
    raise ValueError(f'global batch {global_batch} is not divisible by {jax.process_count()} processes')


def tree_bytes(tree) -> int:
  return int(sum(np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))
