"""Shared fixtures of the training tests: a very small OVSegmentor config and its in-memory batches.

The model is tiny.py shrunk further (width 32, 1+1 blocks, 8 -> 4 groups, 32 px images, 1-layer BERT) so
that one compile of the full stage-2 step (three losses, EMA teacher) takes seconds on 2 CPU cores.
"""

import os
import tempfile

import jax
from jax.experimental.compilation_cache import compilation_cache

from configs import tiny
from ovseg_jax import tokenizer as tokenizer_lib
from tests import train_data


# The same shrinking as `key=value` overrides for the CLIs (trainer, sweep) that tests run as subprocesses.
CLI_SMALL = [
    'model.vision.width=32', 'model.vision.depths=(1, 1)', 'model.vision.num_heads=2', 'model.vision.img_size=32',
    'model.binding.num_group_tokens=8', 'model.binding.num_output_groups=4', 'model.text.width=32',
    'model.text.num_layers=1', 'model.text.num_heads=2', 'model.text.intermediate=64', 'model.text.max_length=16',
    'model.proj.hidden=64', 'model.proj.out=32', 'model.decoder.num_heads=2', 'data.image_size=32',
    'train.global_batch_size=8', 'train.peak_tflops_per_device=1.0', 'train.log_every_steps=1',
]


def small_config(*, stage: int = 2, batch: int = 8, steps: int = 6, mesh=(('data', -1), ('fsdp', 1)),
                 **train_overrides):
  """A stage-2 (the paper's three losses, frozen-free) tiny run; `mesh` and config.train keys may be overridden.
  Patch grounding (on in configs/tiny.py) is off: tests/test_patch_grounding.py turns it on."""
  c = tiny.get_config(f'steps={steps},grounding=none')
  c.unlock()
  m = c.model
  m.vision.update(width=32, depths=(1, 1), num_heads=2, img_size=32, patch_size=8)
  m.binding.update(num_group_tokens=8, num_output_groups=4)
  m.text.update(width=32, num_layers=1, num_heads=2, intermediate=64, max_length=16)
  # BN eps 1e-3 (official 1e-5): a random-init 1-layer BERT gives nearly the same [CLS] for every caption
  # (batch std ~5e-4), and BN's 1/sqrt(var + eps) would amplify float32 rounding ~1000x.
  m.proj.update(hidden=64, out=32, bn_eps=1e-3)
  m.decoder.num_heads = 2
  c.data.image_size = 32
  c.stage = stage
  c.recipe = 'two_stage'
  c.loss.mask_weight = 0.1 if stage == 2 else 0.0
  c.loss.dice_per_device_batch = 0
  # group_ratio 0: every group gets mask-loss gradient. The selection of the int(K r) least entity-like
  # groups is a top-k over near-tied logits in a random-init model, so float rounding between meshes could
  # flip it and change the gradient (not the loss); selection is tested in test_losses / the golden test.
  c.loss.group_ratio = 0.0
  c.train.global_batch_size = batch
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 3
  c.train.keep_checkpoints = 2
  c.train.peak_tflops_per_device = 1.0
  c.optim.base_lr = 1e-3
  c.optim.warmup_steps = 1
  c.mesh = mesh
  c.sharding.fsdp_min_size = 256
  for k, v in train_overrides.items():
    c.train[k] = v
  c.lock()
  return c


def batches(config, start_state=None):
  """The in-memory batch iterator (resumable) for `config`."""
  tok = tokenizer_lib.get_tokenizer(max_length=config.model.text.max_length)
  return train_data.in_memory_batches(config, tok, start_state=start_state)


def batch_source(config, on_fetch=None):
  """`make_batches` for train.train (start_state -> `batches`); on_fetch(index) runs before batch `index` is
  produced (a test's hook to send a signal or Ctrl-C mid-run)."""
  def make(start_state):
    it = batches(config, start_state)
    if on_fetch is None:
      return it

    class Hooked:
      num_examples = it.num_examples

      def __next__(self):
        on_fetch(it.index)
        return next(it)

      def get_state(self):
        return it.get_state()
    return Hooked()
  return make


# The training tests compile the full step several times (1 device, DP, FSDP, subprocess resumes); XLA's
# persistent cache makes identical programs (same HLO, flags and jax version) load instead of recompile.
COMPILE_CACHE = os.path.join(tempfile.gettempdir(), 'ovseg_jax_test_compile_cache')


def use_compile_cache() -> dict:
  """Turns on the persistent compilation cache; -> env vars that do the same in a subprocess."""
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
  compilation_cache.set_cache_dir(COMPILE_CACHE)
  return {'JAX_COMPILATION_CACHE_DIR': COMPILE_CACHE, 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '1.0'}


def sharded_steps(config, devices, num_steps: int = 2) -> tuple[list[dict], dict]:
  """`num_steps` jitted, sharded train steps of `config` on `devices` (a fresh state, one trace allowed)
  -> (per-step host metrics, the initial state's params)."""
  import chex  # pylint: disable=g-import-not-at-top
  from ovseg_jax import optim  # pylint: disable=g-import-not-at-top
  from ovseg_jax import sharding  # pylint: disable=g-import-not-at-top
  from ovseg_jax import train_step as ts  # pylint: disable=g-import-not-at-top
  chex.clear_trace_counter()   # each call builds its own jitted step
  mesh = sharding.make_mesh(config.mesh, devices)
  model = ts.make_model(config)
  tx, sched = optim.make_optimizer(config.optim, total_steps=num_steps, warmup_steps=1,
                                   global_batch=config.train.global_batch_size)
  state, shardings = sharding.create_sharded_state(
      lambda r: ts.init_state(config, model, tx, r), mesh, config.sharding, jax.random.key(0))
  params = jax.tree.map(lambda x: x.shape, state['params'])
  step_fn = ts.jit_train_step(config, model, tx, sched, num_steps, mesh, shardings, max_traces=1)
  it, metrics = batches(config), []
  for _ in range(num_steps):
    state, m = step_fn(state, sharding.host_batch_to_global(next(it), mesh), jax.random.key(1))
    metrics.append(jax.device_get(m))
  return metrics, params
