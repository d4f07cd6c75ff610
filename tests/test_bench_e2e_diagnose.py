"""bench.e2e_diagnose.kmeans_partition: the k-means stage that bounds what the binding could do."""

import numpy as np

from bench import e2e_diagnose


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
  """True when two labelings induce the same partition (equal up to renaming the labels)."""
  pairs = set(zip(a.tolist(), b.tolist()))
  return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_recovers_well_separated_directions():
  rng = np.random.default_rng(0)
  directions = np.eye(16)[:3] * 5.0
  truth = rng.integers(0, 3, size=64)
  features = directions[truth] + 0.3 * rng.normal(size=(64, 16))
  owner = e2e_diagnose.kmeans_partition(features, 3)
  assert owner.shape == (64,)
  assert _same_partition(owner, truth)


def test_cosine_not_euclidean():
  # Two directions at different norms: cosine k-means splits by direction, ignoring the scale.
  rng = np.random.default_rng(1)
  truth = np.repeat([0, 1], 20)
  scale = rng.uniform(0.1, 10.0, size=(40, 1))
  features = np.where(truth[:, None] == 0, [1.0, 0.05], [0.05, 1.0]) * scale
  assert _same_partition(e2e_diagnose.kmeans_partition(features, 2), truth)


def test_deterministic_and_fewer_points_than_clusters():
  features = np.random.default_rng(2).normal(size=(30, 8))
  a = e2e_diagnose.kmeans_partition(features, 8, seed=3)
  np.testing.assert_array_equal(a, e2e_diagnose.kmeans_partition(features, 8, seed=3))
  same = np.ones((5, 4))   # one distinct feature: seeding stops early, every point in one cluster
  assert len(set(e2e_diagnose.kmeans_partition(same, 8).tolist())) == 1


def test_distinct_directions_counts_collapsed_queries():
  rng = np.random.default_rng(4)
  base = rng.normal(size=(2, 32))
  collapsed = np.concatenate([base[[0, 0, 0]] * [[1.0], [2.0], [0.5]], base[[1] * 5]])  # 8 queries, 2 directions
  assert e2e_diagnose.distinct_directions(collapsed) == 2
  assert e2e_diagnose.distinct_directions(rng.normal(size=(8, 32))) == 8
