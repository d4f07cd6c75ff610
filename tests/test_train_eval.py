"""Evaluation during training (train_eval.py + the trainer's loop): when it runs, what it logs, what it keeps.

One tiny stage-2 run of 6 steps with eval every 3 steps on a 3-image VOC-layout folder and keep_best on:
the eval records appear in metrics.jsonl at steps 3 and 6 only, next to every train record; WORKDIR/best/
holds the best step's online model with the selection meta, and `evaluate` on that folder scores it to the
same mIoU the loop recorded.
"""

import json
import math
import os

import ml_collections
import pytest

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import errors
from ovseg_jax import evaluate
from ovseg_jax import train
from ovseg_jax import train_eval
from tests import seg_fixtures
from tests import train_fixtures as tf

tf.use_compile_cache()


def _config(data_dir, *, steps=6, every=3, keep_best=True, dataset='folder', max_images=0):
  c = tf.small_config(steps=steps)
  c.unlock()
  c.eval.update(short_side=32, window=32, stride=16, window_batch=2)
  c.eval_during_training.update(every_steps=every, dataset=dataset, data_dir=data_dir, max_images=max_images,
                                keep_best=keep_best, metric='mIoU')
  c.lock()
  return c


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('val'))
  seg_fixtures.write_voc_folder(root, ['a', 'b', 'c'], [(40, 48), (36, 40), (48, 44)],
                                ['background', 'cat', 'dog'])
  workdir = str(tmp_path_factory.mktemp('work'))
  config = _config(root)
  train.train(config, workdir, make_batches=lambda state: tf.batches(config, state))
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return root, workdir, config, rows


def test_metrics_at_the_eval_steps(run):
  _, _, _, rows = run
  evals = [r for r in rows if 'eval/mIoU' in r]
  assert [r['step'] for r in evals] == [3, 6]
  for r in evals:
    assert set(r) == {'step', 'eval/mIoU', 'eval/aAcc', 'eval/mAcc', 'eval/seconds'}
    assert 0.0 <= r['eval/mIoU'] <= 100.0 and 0.0 <= r['eval/aAcc'] <= 100.0 and r['eval/seconds'] > 0
  # the train records are all there too (log every step)
  assert [r['step'] for r in rows if 'loss' in r] == list(range(1, 7))


def test_best_checkpoint_with_selection_meta(run, tmp_path):
  root, workdir, _, rows = run
  best_dir = os.path.join(workdir, 'best')
  meta = ckpt_lib.load_meta(best_dir)
  evals = [r for r in rows if 'eval/mIoU' in r]
  best = max(evals, key=lambda r: (r['eval/mIoU'], -r['step']))   # the first step reaching the maximum
  sel = meta['selection']
  assert sel == {'dataset': 'folder', 'data_dir': root, 'split': 'val', 'num_images': 3, 'metric': 'mIoU',
                 'value': pytest.approx(best['eval/mIoU']), 'step': best['step']}
  assert meta['step'] == best['step'] and meta['eval']['short_side'] == 32
  # evaluate scores best/ on the same folder to the number the loop recorded
  out = str(tmp_path / 'm.json')
  assert evaluate.main(['--checkpoint', best_dir, '--dataset', 'folder', '--data_dir', root,
                        '--output', out]) == 0
  with open(out) as f:
    scored = json.load(f)
  assert scored['mIoU'] == pytest.approx(sel['value'], abs=1e-3)
  # a resumed run starts from the best value on disk
  config = _config(root)
  assert train_eval.InLoopEval(config, workdir, total_steps=9).best == pytest.approx(sel['value'])


def test_off_short_and_refused(tmp_path):
  missing = str(tmp_path / 'nowhere')
  # off, or a run shorter than one interval: never evaluates, never reads the split
  assert not train_eval.InLoopEval(_config(missing, every=0), str(tmp_path), total_steps=6).due(6)
  short = train_eval.InLoopEval(_config(missing, every=10), str(tmp_path), total_steps=6)
  assert not any(short.due(s) for s in range(1, 7)) and short.ds is None and math.isinf(short.best)
  # due at multiples of every_steps and at the last step
  root = str(tmp_path / 'val')
  seg_fixtures.write_voc_folder(root, ['a'], [(20, 20)], ['background', 'cat'])
  loop = train_eval.InLoopEval(_config(root, every=4, keep_best=False), str(tmp_path), total_steps=10)
  assert [s for s in range(1, 11) if loop.due(s)] == [4, 8, 10]
  # selecting on a benchmark's reported split, or with no split, is refused in one line
  with pytest.raises(errors.UsageError, match='keep_best=True on dataset=.voc. would select'):
    train_eval.check_config(ml_collections.ConfigDict(dict(every_steps=5, dataset='voc', data_dir='/d',
                                                           max_images=0, metric='mIoU', keep_best=True)))
  with pytest.raises(errors.UsageError, match='needs eval_during_training.data_dir'):
    train_eval.InLoopEval(_config('', every=2), str(tmp_path), total_steps=6)
  with pytest.raises(errors.UsageError, match='metric'):
    train_eval.check_config(ml_collections.ConfigDict(dict(every_steps=5, dataset='folder', data_dir='/d',
                                                           max_images=0, metric='loss', keep_best=False)))
