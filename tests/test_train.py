"""The trainer (train.py), checkpoints (checkpoint.TrainCheckpointer) and export, on 8 fake CPU devices.

* kill and resume: 6 straight steps == 3 steps, SIGTERM (save + clean exit), then a NEW process resuming to
  6: the final train state is bit-identical (same program, same batches from the saved iterator state, same
  per-step rng = fold_in(seed key, step); XLA:CPU is deterministic for a fixed program and device count);
* other-mesh restore: the 8-device checkpoint restores onto a 4-device FSDP mesh and onto 1 device;
* a NaN stops the run with its step number and keeps the last good checkpoint;
* export writes an inference checkpoint with the online params and BN stats only;
* CLI errors (missing data dir, unknown config key) are one line without a traceback.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import export as export_lib
from ovseg_jax import optim
from ovseg_jax import param_tree
from ovseg_jax import sharding
from ovseg_jax import train
from ovseg_jax import train_step as ts
from tests import train_fixtures as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_ENV = tf.use_compile_cache()


def _final_state(workdir):
  ck = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir), save_every=1, keep=0)
  step = ck.latest_step()
  state = ck.restore_params()
  ck.close()
  return step, state


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('straight'))
  config = tf.small_config()
  out = train.train(config, workdir, make_batches=tf.batch_source(config))
  return workdir, out


def test_straight_run_writes_config_metrics_and_checkpoints(straight):
  workdir, out = straight
  assert out['step'] == 6 and np.isfinite(out['loss'])
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['total_steps'] == 6
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert {'loss', 'loss_contrast', 'loss_entity', 'loss_mask', 'lr', 'grad_norm', 'img_per_s', 'mfu'} <= set(rows[-1])
  assert any(name.startswith('events.out.tfevents') for name in os.listdir(os.path.join(workdir, 'tb')))
  ck = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir), save_every=1, keep=0)
  assert ck.all_steps() == [3, 6]
  ck.close()
  # re-running a finished workdir resumes, sees step 6 of 6 and returns without compiling
  config = tf.small_config()
  assert train.train(config, workdir, make_batches=tf.batch_source(config)) == {'step': 6}


def test_kill_and_resume_in_a_new_process_is_bit_exact(straight, tmp_path):
  workdir = str(tmp_path / 'resumed')
  config = tf.small_config()

  def sigterm_before_step_3(index):
    if index == 2:   # fetching the batch of step 3: SIGTERM arrives mid-run, the trainer saves step 3
      os.kill(os.getpid(), signal.SIGTERM)
  out = train.train(config, workdir, make_batches=tf.batch_source(config, sigterm_before_step_3))
  assert out['step'] == 3
  assert _final_state(workdir)[0] == 3

  script = textwrap.dedent(f'''
      import os, sys
      sys.path.insert(0, {ROOT!r})
      from tests import train_fixtures as tf
      from ovseg_jax import train
      config = tf.small_config()
      out = train.train(config, {workdir!r}, make_batches=lambda s: tf.batches(config, s))
      print('FINAL_STEP', out['step'])
  ''')
  # the same program as this process: 8 devices and conftest's matmul precision
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision), **CACHE_ENV)
  proc = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True, timeout=600,
                        cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'FINAL_STEP 6' in proc.stdout
  step_a, a = _final_state(straight[0])
  step_b, b = _final_state(workdir)
  assert step_a == step_b == 6
  la, lb = param_tree.named_leaves(a), param_tree.named_leaves(b)
  assert [n for n, _ in la] == [n for n, _ in lb]
  for (n, x), (_, y) in zip(la, lb):
    np.testing.assert_array_equal(x, y, err_msg=n)


@pytest.mark.parametrize('mesh_axes,num_devices', [((('data', -1), ('fsdp', 2)), 4), ((('data', -1),), 1)])
def test_restore_onto_another_mesh(straight, mesh_axes, num_devices):
  config = tf.small_config()
  model = ts.make_model(config)
  tx, _ = optim.make_optimizer(config.optim, total_steps=6, warmup_steps=1, global_batch=8)
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[:num_devices])
  target, _ = sharding.abstract_state(lambda r: ts.init_state(config, model, tx, r), mesh, config.sharding,
                                      jax.random.key(0))
  ck = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(straight[0]), save_every=1, keep=0)
  state, data_state, meta = ck.restore(target)
  ck.close()
  assert data_state == {'index': 6} and meta['step'] == 6
  _, saved = _final_state(straight[0])
  for (n, x), (_, y) in zip(param_tree.named_leaves(state), param_tree.named_leaves(saved)):
    assert {d.id for d in x.sharding.device_set} == {d.id for d in jax.devices()[:num_devices]}, n
    np.testing.assert_array_equal(np.asarray(x), y, err_msg=n)
  kernel = state['params']['img_projector']['linear_hidden']['kernel']   # [32, 64]: split over fsdp=2
  assert {s.data.shape for s in kernel.addressable_shards} == ({(32, 32)} if num_devices == 4 else {(32, 64)})


def test_nan_stops_with_the_step_number_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tf.small_config()

  def poison(start_state):
    it = tf.batches(config, start_state)

    class Poisoned:
      num_examples = it.num_examples

      def __next__(self):
        i = it.index
        batch = next(it)
        return dict(batch, image=np.full_like(batch['image'], np.nan)) if i == 4 else batch

      def get_state(self):
        return it.get_state()
    return Poisoned()
  workdir = str(tmp_path / 'nan')
  with pytest.raises(train.TrainingDiverged, match='at step 5 .*last good checkpoint is step 3'):
    train.train(config, workdir, make_batches=poison)
  assert _final_state(workdir)[0] == 3
  ck = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir), save_every=1, keep=0)
  assert ck.all_steps() == [3]
  ck.close()


def test_export_writes_online_variables_only(straight, tmp_path):
  dst = export_lib.export(straight[0], str(tmp_path / 'exported'))
  model_config, variables = ckpt_lib.load_inference(dst)
  assert set(variables) == {'params', 'batch_stats'}
  assert model_config.vision.width == 32
  _, saved = _final_state(straight[0])
  for (n, x), (_, y) in zip(param_tree.named_leaves(variables), param_tree.named_leaves(
      {'params': saved['params'], 'batch_stats': saved['batch_stats']})):
    np.testing.assert_array_equal(x, y, err_msg=n)


def _cli(*args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  return subprocess.run([sys.executable, '-m', 'ovseg_jax.train', *args], env=env, capture_output=True,
                        text=True, timeout=300, cwd=ROOT)


def test_cli_missing_data_dir_is_one_line_with_the_build_command(tmp_path):
  proc = _cli('--config=configs/tiny.py', f'--workdir={tmp_path / "w"}',
              f'--config.data.data_dir={tmp_path / "nodata"}')
  assert proc.returncode == 1
  err = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
  assert len(err) == 1 and 'python -m ovseg_jax.data.synthetic' in err[0], proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr


def test_cli_unknown_config_key_is_one_line(tmp_path):
  proc = _cli('--config=configs/tiny.py', f'--workdir={tmp_path / "w"}', '--config.optim.lrr=1')
  assert proc.returncode != 0
  assert 'Traceback' not in proc.stderr
  assert 'lrr' in proc.stderr
