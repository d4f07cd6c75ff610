"""Multi-host equivalence: 2 processes x 4 fake CPU devices train like 1 process x 8 devices, and a run saved
on 2 processes resumes on 1.

The runs train a shrunken configs/tiny.py for 3 steps with all three losses in the gradient (mask loss from
step 1: EMA teacher, on-device matching), on the same synthetic tfds dataset, through the real input pipeline
and `ovseg_jax.train`:
  * reference: one process, 8 devices, no jax.distributed;
  * multi-host: launch/local_multihost.sh 2 4 (coordinator on 127.0.0.1, jax.distributed.initialize());
  * resumed: the multi-host run's step-2 checkpoint continued by launch/local_multihost.sh 1 8 (one process).
The pipeline gives host h rows h*b .. h*b + b-1 of global batch s, with the augmentation of their global
stream positions, so the two hosts' slices, concatenated, are the single host's global batch bit for bit,
and the iterator state (the stream position) is the same on every host count. Every device then holds the
same examples in both runs, and the runs compute the same numbers up to float32 summation order across the
two processes. Gumbel noise is off (train.deterministic) to keep the comparison to the data stream.

Tolerances (relative): step 1 (the same parameters, forward only) 1e-5; steps 2 and 3 (after 1 and 2 AdamW
updates, which amplify the summation-order noise through the second-moment normalisation) 2e-3. One update at
lr 1e-3 moves the loss by ~10% here, so a lost or doubled gradient contribution of one host, or another
batch, is far outside.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
GLOBAL_BATCH = 16
SMALL = {  # tiny.py shrunk further so that one compile takes seconds on 2 shared cores
    'model.vision.width': '32', 'model.vision.depths': '(1, 1)', 'model.vision.num_heads': '2',
    'model.vision.img_size': '32', 'model.binding.num_group_tokens': '8', 'model.binding.num_output_groups': '4',
    'model.text.width': '32', 'model.text.num_layers': '1', 'model.text.num_heads': '2',
    'model.text.intermediate': '64', 'model.text.max_length': '16', 'model.proj.hidden': '64',
    'model.proj.out': '32', 'model.decoder.num_heads': '2', 'data.image_size': '32',
    'train.global_batch_size': str(GLOBAL_BATCH), 'train.deterministic': 'True',
    'train.peak_tflops_per_device': '1.0', 'train.checkpoint_every_steps': '2',
    'loss.mask_start_fraction': '0.0',  # lambda = 0.1 from step 1: the mask loss's gradient is in the test too
}
RTOL_FIRST, RTOL_LATER = 1e-5, 2e-3


def _env(devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'JAX_COORDINATOR'))}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             TF_CPP_MIN_LOG_LEVEL='3')
  return env


def _metrics(workdir) -> dict[int, dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return {r['step']: r for r in map(json.loads, f)}


def _final(log: str) -> dict:
  lines = [line for line in log.splitlines() if line.startswith('final: ')]
  assert lines, log[-3000:]
  return json.loads(lines[-1][len('final: '):])


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp('data')
  subprocess.run([sys.executable, '-m', 'ovseg_jax.data.synthetic', '--output', str(out), '--split', 'train',
                  '--num_images', '64', '--seed', '0', '--format', 'tfds'],
                 cwd=ROOT, check=True, capture_output=True, timeout=120)
  return str(out)


def _data_state(workdir: str, step: int) -> dict:
  """The input-pipeline state saved in checkpoint `step` (Orbax writes it as one JSON file)."""
  folder = os.path.join(workdir, 'checkpoints', str(step), 'data_iter')
  files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
  for path in files:
    try:
      with open(path) as f:
        state = json.load(f)
    except (ValueError, UnicodeDecodeError):
      continue
    if isinstance(state, dict) and 'position' in state:
      return state
  raise AssertionError(f'no input state in {files}')


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """Starts the reference and multi-host runs at once (they share the 2 cores), then resumes the multi-host
  run's step-2 checkpoint on one process; returns their folders and outputs."""
  root = tmp_path_factory.mktemp('runs')
  overrides = [f'--config.{k}={v}' for k, v in {**SMALL, 'data.data_dir': data_dir}.items()]
  ref_dir, mh_dir = str(root / 'one_process'), str(root / 'two_processes')
  ref = subprocess.Popen(
      [sys.executable, 'launch/train_and_report.py', '--config=configs/tiny.py', f'--workdir={ref_dir}',
       f'--config.train.total_steps={STEPS}', '--config.train.log_every_steps=1', *overrides],
      cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  mh = subprocess.Popen(
      ['bash', 'launch/local_multihost.sh', f'--workdir={mh_dir}', f'--steps={STEPS}', '--timeout=600',
       f'--python={sys.executable}', '2', '4', *overrides],
      cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  ref_out, _ = ref.communicate(timeout=900)
  mh_out, _ = mh.communicate(timeout=900)
  assert ref.returncode == 0, ref_out[-3000:]
  assert mh.returncode == 0, mh_out[-3000:]
  logs = [open(os.path.join(mh_dir, 'logs', f'process_{i}.log')).read() for i in range(2)]
  # The 2-process run as preempted after step 2: its step-2 checkpoint and metrics, resumed on 1 process.
  resumed_dir = str(root / 'resumed_on_one_process')
  shutil.copytree(mh_dir, resumed_dir, ignore=shutil.ignore_patterns('logs', 'tb'))
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', str(STEPS)))
  kept = [r for r in _metrics(mh_dir).values() if r['step'] < STEPS]
  with open(os.path.join(resumed_dir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in kept)
  resumed = subprocess.run(
      ['bash', 'launch/local_multihost.sh', f'--workdir={resumed_dir}', '--resume', f'--steps={STEPS}',
       '--timeout=600', f'--python={sys.executable}', '1', '8', *overrides],
      cwd=ROOT, env=_env(8), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
  assert resumed.returncode == 0, resumed.stdout[-3000:]
  resumed_log = open(os.path.join(resumed_dir, 'logs', 'process_0.log')).read()
  return dict(ref_dir=ref_dir, ref_out=ref_out, mh_dir=mh_dir, mh_out=mh_out, mh_logs=logs,
              resumed_dir=resumed_dir, resumed_log=resumed_log)


def test_two_processes_ran_as_one_job(runs):
  reports = [_final(log) for log in runs['mh_logs']]
  assert [(r['process'], r['process_count'], r['devices'], r['local_devices']) for r in reports] == [
      (0, 2, 8, 4), (1, 2, 8, 4)]
  ref = _final(runs['ref_out'])
  assert (ref['process_count'], ref['devices'], ref['local_devices']) == (1, 8, 8)
  assert reports[0]['step'] == reports[1]['step'] == ref['step'] == STEPS
  # The loss is a global quantity: both processes hold the same replicated value, bit for bit.
  assert reports[0]['loss'] == reports[1]['loss']
  printed = re.findall(r'^process (\d): step (\d+) final loss (\S+)$', runs['mh_out'], re.M)
  assert printed == [('0', str(STEPS), repr(reports[0]['loss'])), ('1', str(STEPS), repr(reports[1]['loss']))]


def test_same_losses_as_one_process(runs):
  ref, mh = _metrics(runs['ref_dir']), _metrics(runs['mh_dir'])
  assert sorted(ref) == sorted(mh) == list(range(1, STEPS + 1))
  for step in range(1, STEPS + 1):
    rtol = RTOL_FIRST if step == 1 else RTOL_LATER
    for key in ('loss', 'loss_contrast', 'loss_entity', 'loss_mask'):
      np.testing.assert_allclose(mh[step][key], ref[step][key], rtol=rtol, err_msg=f'step {step} {key}')
  # The runs moved: a test where nothing trains could not tell a dropped gradient from a correct one.
  assert abs(ref[STEPS]['loss'] - ref[1]['loss']) > 20 * RTOL_LATER * ref[1]['loss']


def test_resume_from_two_processes_on_one_continues_the_stream(runs):
  """The step-2 checkpoint of the 2-process run, resumed on 1 process, trains step 3 on the same global
  batch as both straight runs: the same loss, and the same input state at step 3."""
  assert re.search(r'resumed from .* at step 2', runs['resumed_log']), runs['resumed_log'][-3000:]
  report = _final(runs['resumed_log'])
  assert (report['process_count'], report['devices'], report['step']) == (1, 8, STEPS)
  ref, mh, resumed = _metrics(runs['ref_dir']), _metrics(runs['mh_dir']), _metrics(runs['resumed_dir'])
  for key in ('loss', 'loss_contrast', 'loss_entity', 'loss_mask'):
    np.testing.assert_allclose(resumed[STEPS][key], ref[STEPS][key], rtol=RTOL_LATER, err_msg=key)
    np.testing.assert_allclose(resumed[STEPS][key], mh[STEPS][key], rtol=RTOL_LATER, err_msg=key)
  # the input state holds no host count: the same in all three runs (3 global batches read)
  states = [_data_state(runs[d], STEPS) for d in ('ref_dir', 'mh_dir', 'resumed_dir')]
  assert [s['position'] for s in states] == [STEPS * GLOBAL_BATCH] * 3
  assert states[0]['fingerprint'] == states[1]['fingerprint'] == states[2]['fingerprint']


def test_each_process_reads_its_rows_of_the_global_batch(data_dir):
  """The trainer's input (pipeline.make_train_iterator with its process index): host h's batch is rows
  h*b .. h*b + b-1 of the single host's global batch, batch after batch, images and token ids bit for bit."""
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny.get_config(f'steps={STEPS}')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.train.global_batch_size = GLOBAL_BATCH
    config.data.image_size = 32
    config.model.text.max_length = 16

  def batches(process_index, process_count):
    it = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count,
                                      with_ids=True)
    try:
      return [next(it) for _ in range(STEPS)]
    finally:
      it.close()

  one = batches(0, 1)
  two = [batches(0, 2), batches(1, 2)]
  for step in range(STEPS):
    a, b = two[0][step], two[1][step]
    assert len(a['example_id']) == len(b['example_id']) == GLOBAL_BATCH // 2
    for key in one[step]:
      assert np.array_equal(np.concatenate([a[key], b[key]]), one[step][key]), f'batch {step}: {key}'
