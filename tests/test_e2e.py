"""The embedded default end to end at test size: every stage of `launch/local.sh`, through the real CLIs.

synthetic data -> CC4M builder (tfds/array_record) -> train a shrunken configs/tiny.py (all three losses,
paper_single schedule, so both compiled step variants run: without and with the mask branch) -> export ->
zero-shot evaluation on a held-out VOC-layout split -> pictures. Checks that each stage's output exists and
is consistent, and that the training loss goes down. Learning quality is measured by `bash launch/local.sh`
(README, bench/RESULTS.md), not here.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
from PIL import Image

from tests import train_fixtures as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12
SMALL = tf.CLI_SMALL + [  # tiny.py shrunk (tests/train_fixtures.py), plus this test's settings
    'train.checkpoint_every_steps=1000', 'optim.base_lr=2e-3', 'eval.short_side=64', 'eval.window=64',
    'eval.stride=32',
]


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_force_host_platform_device_count=1',
             TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-m', *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                        env=env)
  assert proc.returncode == 0, f'{args[0]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}'
  return proc


def test_every_stage_connects_and_the_loss_goes_down(tmp_path):
  data, val, work, export = (str(tmp_path / d) for d in ('data', 'val', 'train', 'export'))
  _run('ovseg_jax.data.synthetic', '--output', data, '--split', 'train', '--num_images', '96', '--format',
       'tfds', '--max_size', '80')
  _run('ovseg_jax.data.synthetic', '--output', val, '--split', 'val', '--num_images', '6', '--seed', '1',
       '--format', 'voc', '--max_size', '80')
  train = _run('ovseg_jax.train', f'--config=configs/tiny.py:steps={STEPS}', f'--workdir={work}',
               f'--config.data.data_dir={data}', *(f'--config.{kv}' for kv in SMALL))
  log = train.stdout + train.stderr
  # paper_single: lambda = 0 for the first 3/4 of the steps, so the step without the mask branch runs first
  assert 'without the mask branch (lambda = 0 before step 9)' in log and 'with the mask branch' in log
  with open(os.path.join(work, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert [r['step'] for r in rows] == list(range(1, STEPS + 1))
  assert all(r['finite'] == 1.0 for r in rows)
  # row 'step' s is logged after the update from state step s - 1: the mask branch runs from row 10 on
  assert all(r['loss_mask'] == 0.0 for r in rows[:9]) and all(r['loss_mask'] > 0 for r in rows[9:])
  assert all(r['loss_entity'] > 0 for r in rows)
  first = np.mean([r['loss_contrast'] + r['loss_entity'] for r in rows[:3]])
  last = np.mean([r['loss_contrast'] + r['loss_entity'] for r in rows[5:8]])   # before the mask term joins
  assert last < first, (first, last)

  _run('ovseg_jax.export', '--workdir', work, '--dst', export)
  metrics_path = str(tmp_path / 'metrics.json')
  _run('ovseg_jax.evaluate', '--checkpoint', export, '--dataset', 'folder', '--data_dir', val, '--output',
       metrics_path)
  with open(metrics_path) as f:
    metrics = json.load(f)
  assert metrics['num_images'] == 6 and 0.0 <= metrics['mIoU'] <= 100.0
  assert list(metrics['per_class']) == ['background', 'circle', 'square', 'triangle', 'star', 'cross', 'ring']
  pictures = str(tmp_path / 'pictures')
  _run('ovseg_jax.visualize', '--checkpoint', export, '--data_dir', val, '--num_images', '2', '--output',
       pictures)
  names = sorted(os.listdir(pictures))
  assert names == ['val_000000.png', 'val_000001.png']
  with Image.open(os.path.join(pictures, names[0])) as im:
    assert im.width > 4 * 64 and im.height > 64                   # four panels side by side
  diagnosis = _run('bench.e2e_diagnose', '--checkpoint', export, '--num_images', '3').stdout
  stages = re.findall(r'^  (model|oracle groups|oracle fg|patch ceiling) +([0-9.]+)  \[', diagnosis, re.M)
  assert [name for name, _ in stages] == ['model', 'oracle groups', 'oracle fg', 'patch ceiling'], diagnosis
  assert all(0.0 <= float(value) <= 100.0 for _, value in stages)
