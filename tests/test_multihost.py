"""Multi-host equivalence: 2 processes x 4 fake CPU devices train like 1 process x 8 devices.

Both runs train a shrunken configs/tiny.py for 3 steps with all three losses in the gradient (mask loss from
step 1: EMA teacher, on-device matching), on the same synthetic tfds dataset, through the real input pipeline
and `ovseg_jax.train`:
  * reference: one process, 8 devices, no jax.distributed;
  * multi-host: launch/local_multihost.sh 2 4 (coordinator on 127.0.0.1, jax.distributed.initialize()).
The pipeline gives host h the stream positions h, h+2, h+4, ... so the two hosts' slices are disjoint and
together hold exactly the single host's global batch, in another order. Every loss is a mean over the global
batch (BN statistics too), so the two runs compute the same numbers up to float32 summation order: the
per-device partial sums hold other examples. Gumbel noise is off (train.deterministic) since it is drawn per
batch position.

Tolerances (relative): step 1 (the same parameters, forward only) 1e-4; steps 2 and 3 (after 1 and 2 AdamW
updates, which amplify the summation-order noise through the second-moment normalisation) 2e-3. Measured: at
most 1.2e-6 at step 1 and 1.2e-4 at steps 2-3. One update at lr 1e-3 moves the loss by ~10% here, so a lost or
doubled gradient contribution of one host is far outside.
"""

import json
import os
import re
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
    'train.peak_tflops_per_device': '1.0', 'train.checkpoint_every_steps': '1000',
    'loss.mask_start_fraction': '0.0',  # lambda = 0.1 from step 1: the mask loss's gradient is in the test too
}
RTOL_FIRST, RTOL_LATER = 1e-4, 2e-3


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


@pytest.fixture(scope='module')
def runs(data_dir, tmp_path_factory):
  """Starts both runs at once (they share the 2 cores) and returns (reference, multi-host) outputs."""
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
  return dict(ref_dir=ref_dir, ref_out=ref_out, mh_dir=mh_dir, mh_out=mh_out, mh_logs=logs)


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


def test_each_process_reads_a_disjoint_slice(data_dir):
  """The trainer's input (pipeline.make_train_iterator with its process index): disjoint per-host slices
  whose union is the single host's global batch, batch after batch."""
  from ovseg_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny.get_config(f'steps={STEPS}')
  with config.unlocked():
    config.data.data_dir = data_dir
    config.train.global_batch_size = GLOBAL_BATCH
    config.data.image_size = 32
    config.model.text.max_length = 16

  def ids(process_index, process_count):
    it = pipeline.make_train_iterator(config, process_index=process_index, process_count=process_count,
                                      with_ids=True)
    try:
      return [next(it)['example_id'].tolist() for _ in range(STEPS)]
    finally:
      if hasattr(it, 'close'):
        it.close()

  one = ids(0, 1)
  two = [ids(0, 2), ids(1, 2)]
  for step in range(STEPS):
    a, b = two[0][step], two[1][step]
    assert len(a) == len(b) == GLOBAL_BATCH // 2
    assert not set(a) & set(b), f'batch {step}: both hosts read {sorted(set(a) & set(b))}'
    assert sorted(a + b) == sorted(one[step])
