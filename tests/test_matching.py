"""matching.assign ('dp' and 'scipy') against scipy's optimum, under jit, vmap and shard_map (8 CPU devices)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

from ovseg_jax import matching

METHODS = ('dp', 'scipy')
SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 10)
N = 600  # matrices per size; one shape per K so the two exhaustive tests share the compiled solver


def _optimum(cost: np.ndarray) -> np.ndarray:
  """[N, K, K] -> [N] optimal summed cost (float64), the oracle."""
  cost = np.asarray(cost, np.float64)
  return np.array([c[scipy.optimize.linear_sum_assignment(c)].sum() for c in cost])


def _summed(cost: np.ndarray, cols: np.ndarray) -> np.ndarray:
  cost = np.asarray(cost, np.float64)
  return np.take_along_axis(cost, np.asarray(cols)[..., None], -1)[..., 0].sum(-1)


def _assert_permutations(cols: np.ndarray, k: int):
  cols = np.asarray(cols).reshape(-1, k)
  np.testing.assert_array_equal(np.sort(cols, -1), np.broadcast_to(np.arange(k), cols.shape))


@functools.lru_cache(maxsize=None)
def _jitted(method):
  return jax.jit(functools.partial(matching.assign, method=method))


@pytest.mark.parametrize('method', METHODS)
def test_random_float_costs_reach_the_optimum(method):
  rng = np.random.default_rng(0)
  for k in SIZES:
    cost = rng.normal(size=(N, k, k)).astype(np.float32)
    cols = np.asarray(_jitted(method)(cost))
    assert cols.dtype == np.int32 and cols.shape == (N, k)
    _assert_permutations(cols, k)
    # 'dp' sums in float32, scipy in float64: permutations within float32 rounding of each other may swap.
    np.testing.assert_allclose(_summed(cost, cols), _optimum(cost), rtol=0, atol=1e-5 * k)


@pytest.mark.parametrize('method', METHODS)
def test_ties_integer_and_constant_costs_reach_the_optimum_exactly(method):
  rng = np.random.default_rng(1)
  for k in SIZES:
    ints = rng.integers(0, 3, size=(360, k, k)).astype(np.float32)      # many tied optima
    binary = rng.integers(0, 2, size=(200, k, k)).astype(np.float32)
    const = np.broadcast_to(rng.integers(-3, 4, size=(N - 560, 1, 1)), (N - 560, k, k)).astype(np.float32)
    cost = np.concatenate([ints, binary, const])
    cols = np.asarray(_jitted(method)(cost))
    _assert_permutations(cols, k)
    np.testing.assert_array_equal(_summed(cost, cols), _optimum(cost))


def test_dp_finds_a_unique_optimum_that_is_not_greedy():
  # Greedy row-by-row would take (0,0)=0 then be forced into (1,1)=100; the optimum is the anti-diagonal.
  cost = np.array([[0., 1.], [2., 100.]], np.float32)
  for method in METHODS:
    np.testing.assert_array_equal(matching.assign(cost, method), [1, 0])


@pytest.mark.parametrize('method', METHODS)
def test_leading_batch_axes_and_jit(method):
  rng = np.random.default_rng(2)
  cost = rng.normal(size=(2, 3, 5, 5)).astype(np.float32)
  cols = np.asarray(jax.jit(functools.partial(matching.assign, method=method))(cost))
  assert cols.shape == (2, 3, 5)
  np.testing.assert_allclose(_summed(cost.reshape(6, 5, 5), cols.reshape(6, 5)),
                             _optimum(cost.reshape(6, 5, 5)), atol=1e-5)


@pytest.mark.parametrize('method', METHODS)
def test_vmap_and_nested_vmap(method):
  rng = np.random.default_rng(3)
  cost = rng.integers(0, 4, size=(4, 6, 4, 4)).astype(np.float32)
  single = functools.partial(matching.assign, method=method)
  once = np.asarray(jax.jit(jax.vmap(single))(cost.reshape(24, 4, 4)))
  twice = np.asarray(jax.jit(jax.vmap(jax.vmap(single), in_axes=1, out_axes=1))(cost))
  opt = _optimum(cost.reshape(24, 4, 4))
  np.testing.assert_array_equal(_summed(cost.reshape(24, 4, 4), once), opt)
  np.testing.assert_array_equal(_summed(cost.reshape(24, 4, 4), twice.reshape(24, 4)), opt)


@pytest.mark.parametrize('method', METHODS)
def test_non_finite_costs_still_give_a_permutation(method):
  cost = np.array([[[np.nan, 1., 2.], [np.inf, np.inf, 0.], [0., np.nan, -np.inf]]], np.float32)
  cols = np.asarray(matching.assign(cost, method))
  _assert_permutations(cols, 3)
  # Treating every non-finite entry as the same large cost, the only all-finite permutation is 1, 2, 0.
  np.testing.assert_array_equal(cols, [[1, 2, 0]])


def test_errors():
  with pytest.raises(ValueError, match='K <= 10'):
    matching.assign(jnp.zeros((2, 11, 11)), 'dp')
  assert matching.assign(jnp.zeros((11, 11)), 'scipy').shape == (11,)
  with pytest.raises(ValueError, match='square'):
    matching.assign(jnp.zeros((3, 4)), 'dp')
  with pytest.raises(ValueError, match='unknown assignment method'):
    matching.assign(jnp.zeros((3, 3)), 'hungarian')


def _mesh():
  assert jax.device_count() == 8, 'tests/conftest.py sets 8 fake CPU devices'
  return jax.make_mesh((4, 2), ('data', 'fsdp'))


@pytest.mark.parametrize('batch_axes', ['data', ('data', 'fsdp')])
def test_assign_sharded_one_callback_per_device_on_its_shard(monkeypatch, batch_axes):
  mesh = _mesh()
  n_shards = 4 if batch_axes == 'data' else 8
  rng = np.random.default_rng(4)
  cost = rng.integers(0, 3, size=(32, 6, 6)).astype(np.float32)
  spec = jax.P(batch_axes)
  x = jax.device_put(cost, jax.NamedSharding(mesh, spec))
  seen = []
  real = matching._lsa_host
  monkeypatch.setattr(matching, '_lsa_host', lambda c: seen.append(np.shape(c)) or real(c))
  f = jax.jit(lambda c: matching.assign_sharded(c * 1.0, mesh, batch_axes))
  cols = f(x)
  assert cols.sharding.spec[0] == spec[0]
  np.testing.assert_array_equal(_summed(cost, cols), _optimum(cost))
  # One host call per device (replicas along unsharded axes call too), each on its local shard only.
  assert len(seen) == 8 and set(seen) == {(32 // n_shards, 6, 6)}


def test_dp_under_sharded_jit_keeps_batch_sharding():
  mesh = _mesh()
  rng = np.random.default_rng(5)
  cost = rng.normal(size=(64, 8, 8)).astype(np.float32)
  x = jax.device_put(cost, jax.NamedSharding(mesh, jax.P(('data', 'fsdp'))))
  for cols in (jax.jit(lambda c: matching.assign(c, 'dp'))(x),
               jax.jit(lambda c: matching.assign_sharded(c, mesh, ('data', 'fsdp'), method='dp'))(x)):
    assert cols.sharding.spec[0] == ('data', 'fsdp')
    np.testing.assert_allclose(_summed(cost, cols), _optimum(cost), atol=1e-4)


def test_assign_sharded_rejects_indivisible_batch():
  with pytest.raises(ValueError, match='not divisible'):
    matching.assign_sharded(jnp.zeros((6, 3, 3)), _mesh(), ('data', 'fsdp'))
