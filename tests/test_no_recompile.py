"""No XLA compilation after the first call, in inference and in training.

A compile counter (JAX's '/jax/core/compile/backend_compile_duration' monitoring event, fired once per XLA
backend compilation of anything: jitted functions *and* eager jnp ops on new shapes) must stay at zero:
  * inference: after one warm-up image that uses every window-batch size, `Segmenter.segment` on images of
    other sizes and aspect ratios (other window counts, other output sizes) compiles nothing;
  * training: after the first step of the jitted, sharded step, the next steps (new batches, the metrics
    fetched to the host as the trainer does) compile nothing.
This complements tests/test_inference.py (the window step's own trace counter) and tests/test_train_step.py
(`chex.assert_max_traces` inside the jit), which cannot see compilations outside those functions.
"""

import contextlib

import jax
import numpy as np
import pytest
from jax import monitoring

from ovseg_jax import inference
from ovseg_jax import optim
from ovseg_jax import sharding
from ovseg_jax import text_buckets
from ovseg_jax import train_step as ts
from tests import seg_fixtures
from tests import train_fixtures

COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'


@contextlib.contextmanager
def count_compiles():
  """Yields a list that receives one entry per XLA backend compilation inside the block."""
  seen = []

  def listener(event, duration, **kwargs):
    del duration, kwargs
    if event == COMPILE_EVENT:
      seen.append(event)

  monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    monitoring.unregister_event_duration_listener(listener)


def test_the_counter_sees_compilations():
  # Guards the test itself: a fresh jitted function and an eager op on a new shape both count.
  with count_compiles() as seen:
    jax.jit(lambda x: x * 3 + 1)(np.arange(7.0)).block_until_ready()
    (jax.numpy.ones((3, 5, 7)) * 2).block_until_ready()
  assert len(seen) >= 2


CLASSES = ['cat', 'potted plant', 'traffic light']


def test_segment_compiles_nothing_after_warmup():
  seg = inference.Segmenter.from_checkpoint(seg_fixtures.shared_tiny_checkpoint(), **seg_fixtures.TINY_EVAL)
  # 64 x 120 -> 3 windows of 64 with stride 32, window_batch 2: one batch of 2 and one of 1 (both sizes).
  assert inference.num_windows(64, 120, seg.eval_config) == 3
  jax.clear_caches()  # earlier tests may have compiled these shapes already; the warm-up must start cold
  with count_compiles() as warm:
    seg.segment(seg_fixtures.random_image(64, 120, seed=0), CLASSES)
  assert warm, 'the warm-up compiled nothing: the counter is not wired'
  sizes = [(50, 90), (120, 70), (64, 64), (33, 200), (301, 97)]
  with count_compiles() as seen:
    for i, (h, w) in enumerate(sizes):
      labels, scores = seg.segment(seg_fixtures.random_image(h, w, seed=i + 1), CLASSES)
      assert labels.shape == (h, w) and scores.shape == (len(CLASSES) + 1, h, w)
  assert not seen, f'{len(seen)} XLA compilations after the first image'


def _sharded_setup(config):
  """-> (mesh, model, tx, schedule, sharded state, shardings) of a small training config."""
  mesh = sharding.make_mesh(config.mesh, jax.devices())
  model = ts.make_model(config)
  tx, sched = optim.make_optimizer(config.optim, total_steps=config.train.total_steps, warmup_steps=1,
                                   global_batch=config.train.global_batch_size)
  state, shardings = sharding.create_sharded_state(
      lambda r: ts.init_state(config, model, tx, r), mesh, config.sharding, jax.random.key(0))
  return mesh, model, tx, sched, state, shardings


@pytest.mark.parametrize('mesh', [(('data', -1), ('fsdp', 1)), (('data', 2), ('fsdp', 4))])
def test_train_steps_compile_nothing_after_the_first(mesh):
  config = train_fixtures.small_config(mesh=mesh)
  mesh, model, tx, sched, state, shardings = _sharded_setup(config)
  step_fn = ts.jit_train_step(config, model, tx, sched, config.train.total_steps, mesh, shardings)
  batches = train_fixtures.batches(config)
  rng = jax.random.key(1)
  with count_compiles() as first:
    state, metrics = step_fn(state, sharding.host_batch_to_global(next(batches), mesh), rng)
    jax.device_get(metrics)
  assert first, 'the first step compiled nothing: the counter is not wired'
  with count_compiles() as seen:
    for _ in range(3):
      state, metrics = step_fn(state, sharding.host_batch_to_global(next(batches), mesh), rng)
      m = jax.device_get(metrics)
      assert np.isfinite(m['loss']) and m['finite'] == 1.0
  assert not seen, f'{len(seen)} XLA compilations after the first step'
  assert int(jax.device_get(state['step'])) == 4


def test_each_text_bucket_compiles_once():
  # data.text_buckets: the step compiles once per bucket length met, and never again (chex counts traces
  # inside the jit, the listener every XLA compile, eager ops included).
  config = train_fixtures.small_config(stage=1)
  config.unlock()
  config.data.text_buckets = (12, 16)
  config.lock()
  mesh, model, tx, sched, state, shardings = _sharded_setup(config)
  step_fn = ts.jit_train_step(config, model, tx, sched, config.train.total_steps, mesh, shardings,
                              max_traces=2)
  batches = train_fixtures.batches(config)
  rng = jax.random.key(1)

  def run(length):
    batch, t = text_buckets.bucket_batch(next(batches), config)
    assert t == 12   # the fixture's captions hold at most 12 tokens; 16 is forced below
    if length != t:
      batch = text_buckets.pad_to(batch, length)
    out = step_fn(state, sharding.host_batch_to_global(batch, mesh), rng)
    m = jax.device_get(out[1])
    assert np.isfinite(m['loss']) and m['finite'] == 1.0
    return out[0]

  with count_compiles() as first:
    for length in (12, 16):
      state = run(length)
  assert len(first) >= 2, 'each bucket must compile once'
  with count_compiles() as seen:
    for length in (16, 12, 12, 16):
      state = run(length)
  assert not seen, f'{len(seen)} XLA compilations after each bucket compiled once'
  assert int(jax.device_get(state['step'])) == 6
