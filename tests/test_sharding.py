"""sharding.py: mesh from config, the FSDP rule, state born sharded, per-host batch assembly (8 fake devices)."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ovseg_jax import sharding


def _rules(min_size=16, rules=(('.*', 'fsdp'),)):
  return ml_collections.ConfigDict(dict(rules=rules, fsdp_min_size=min_size))


def test_mesh_shape_resolves_minus_one_and_rejects_bad_meshes():
  assert sharding.mesh_shape((('data', -1), ('fsdp', 2)), 8) == (('data', 'fsdp'), (4, 2))
  assert sharding.mesh_shape((('data', 1), ('fsdp', -1)), 8) == (('data', 'fsdp'), (1, 8))
  with pytest.raises(ValueError, match='not divisible'):
    sharding.mesh_shape((('data', -1), ('fsdp', 3)), 8)
  with pytest.raises(ValueError, match='slots'):
    sharding.mesh_shape((('data', 2), ('fsdp', 2)), 8)
  mesh = sharding.make_mesh((('data', -1), ('fsdp', 2)))
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}
  assert dict(sharding.make_mesh((('data', -1), ('fsdp', 1)), jax.devices()[:4]).shape) == {'data': 4, 'fsdp': 1}


def test_fsdp_rule_shards_the_largest_divisible_axis_and_replicates_small_leaves():
  assert sharding.fsdp_spec((768, 3072), 4, 16) == P(None, 'fsdp')
  assert sharding.fsdp_spec((3072, 768), 4, 16) == P('fsdp', None)
  assert sharding.fsdp_spec((30522, 768), 4, 16) == P(None, 'fsdp')    # 30522 % 4 != 0 -> next largest
  assert sharding.fsdp_spec((7, 9), 4, 16) == P()                       # no divisible axis
  assert sharding.fsdp_spec((768,), 4, 1024) == P()                     # below fsdp_min_size
  assert sharding.fsdp_spec((), 4, 0) == P()
  assert sharding.fsdp_spec((768, 3072), 1, 16) == P()                  # fsdp = 1: data parallel
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))
  cfg = _rules(rules=(('text_encoder/.*', 'replicate'), ('.*', 'fsdp')))
  assert sharding.leaf_spec('text_encoder/x/kernel', (64, 64), mesh, cfg) == P()
  # optimizer-state paths end with the param path: the same rule applies
  assert sharding.leaf_spec('opt_state/0/mu/text_encoder/x/kernel', (64, 64), mesh, cfg) == P()
  assert sharding.leaf_spec('opt_state/0/mu/img_encoder/x/kernel', (64, 64), mesh, cfg) == P(None, 'fsdp')


def test_state_is_born_sharded_and_fsdp_divides_memory():
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))

  def init(rng):
    return {'w': jax.random.normal(rng, (64, 256)), 'b': jnp.zeros((256,)), 's': jnp.zeros(())}
  state, shardings = sharding.create_sharded_state(init, mesh, _rules(min_size=1024), jax.random.key(0))
  assert state['w'].sharding.spec == P(None, 'fsdp') and state['b'].sharding.spec == P()
  assert shardings['w'] == state['w'].sharding
  np.testing.assert_array_equal(state['w'], init(jax.random.key(0))['w'])
  per_dev = sharding.per_device_bytes(state)
  assert per_dev == 64 * 256 * 4 // 4 + 256 * 4 + 4


def test_host_batch_to_global_shards_the_batch_over_data_and_fsdp():
  mesh = sharding.make_mesh((('data', 2), ('fsdp', 4)))
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  out = sharding.host_batch_to_global({'x': x}, mesh)['x']
  assert out.shape == (16, 3) and out.sharding.spec == P(('data', 'fsdp'))
  assert {s.data.shape for s in out.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(out, x)
  with pytest.raises(ValueError, match='divisible'):
    sharding.check_batch_divisible(12, mesh)
