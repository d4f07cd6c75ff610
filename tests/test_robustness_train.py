"""Nothing breaks, nothing is lost (issue 19): the trainer, its checkpoints, export, convert and inference
loading against changed configs, damaged files, Ctrl-C and non-finite weights, on 8 fake CPU devices.

One tiny stage-1 run (4 steps, checkpoints at 2 and 4) is trained once; the cases work on copies of it:
* a resume with another model / seed is refused before anything is written, naming every changed key; a
  longer run (train.total_steps) resumes and records the change;
* a truncated file in the newest checkpoint: the resume falls back to the step before it, with a warning,
  and keeps the damaged folder (moved aside, never deleted); export does the same, or names the step;
* Ctrl-C saves the step it arrived in: one line, exit 130;
* metrics.jsonl keeps one row per step across resumes;
* NaN weights are refused at load, naming the first bad array;
* every damaged or mistaken input is one `error: ...` line and exit status 2 (the trainer: 1).
The compiled steps come from XLA's persistent cache after the first run (tests/train_fixtures.py).
"""

import contextlib
import io
import json
import os
import shutil
import signal
import types

import numpy as np
import pytest

from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import errors
from ovseg_jax import export as export_lib
from ovseg_jax import inference
from ovseg_jax import train
from ovseg_jax import train_monitor
from ovseg_jax.convert import __main__ as convert_main
from ovseg_jax.convert import official
from ovseg_jax.convert import torch_save
from tests import train_fixtures as tf

CACHE_ENV = tf.use_compile_cache()


def _config(steps: int = 4, **changes):
  """Stage 1 (no teacher, no mask loss: the cheapest step to compile), checkpoints every 2 steps, kept."""
  c = tf.small_config(stage=1, steps=steps, checkpoint_every_steps=2, keep_checkpoints=5)
  c.unlock()
  for dotted, value in changes.items():
    parent, key = ckpt_lib._split(c, dotted.replace('__', '.'))  # pylint: disable=protected-access
    parent[key] = value
  c.lock()
  return c


def _steps(workdir):
  return ckpt_lib.saved_steps(workdir)


def _metric_steps(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line)['step'] for line in f]


def _truncate_largest(step_dir):
  """Truncates the largest array file of a checkpoint step (its data, not its metadata) to half."""
  files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs]
  path = max(files, key=os.path.getsize)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) // 2])
  return path


def _edit_json(path, edit):
  """Rewrites the JSON file at `path` after edit(value) changed its value in place."""
  with open(path) as f:
    value = json.load(f)
  edit(value)
  with open(path, 'w') as f:
    json.dump(value, f)


def _copy(src, tmp_path, name='w'):
  dst = str(tmp_path / name)
  shutil.copytree(src, dst)
  return dst


def _tree_snapshot(root):
  """{relative path: bytes} of every file under root."""
  out = {}
  for d, _, fs in os.walk(root):
    for f in fs:
      with open(os.path.join(d, f), 'rb') as fh:
        out[os.path.relpath(os.path.join(d, f), root)] = fh.read()
  return out


def _run_cli(monkeypatch, config, workdir, make_batches=None):
  """train.main with --config / --workdir set (the CLI path: one line on stderr, the exit code)."""
  monkeypatch.setattr(train, '_CONFIG', types.SimpleNamespace(value=config))
  monkeypatch.setattr(train, '_WORKDIR', types.SimpleNamespace(value=workdir))
  if make_batches is not None:
    monkeypatch.setattr(train, 'make_train_iterator', lambda cfg, mesh, start_state: make_batches(start_state))
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    code = train.main([])
  return code, err.getvalue()


def _one_error_line(err: str, *needles):
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  return lines[0]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A finished 4-step run: checkpoints 2 and 4, metrics rows 1..4."""
  workdir = str(tmp_path_factory.mktemp('run') / 'w')
  config = _config()
  out = train.train(config, workdir, make_batches=tf.batch_source(config))
  assert out['step'] == 4 and _steps(workdir) == [2, 4]
  return workdir


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  return export_lib.export(run, str(tmp_path_factory.mktemp('exp') / 'e'))


# ----------------------------------------------------------------------------------------------------------
# Resume: changed config, corrupt checkpoint, Ctrl-C, metrics.jsonl.
# ----------------------------------------------------------------------------------------------------------
def test_a_changed_model_is_refused_before_anything_is_written(run, tmp_path, monkeypatch):
  workdir = _copy(run, tmp_path)
  before = _tree_snapshot(workdir)
  config = _config(model__vision__width=64, seed=1, data__num_workers=1)
  with pytest.raises(errors.UsageError) as e:
    train.train(config, workdir, make_batches=tf.batch_source(config))
  msg = str(e.value)
  assert '\n' not in msg
  assert 'model.vision.width: 32 -> 64' in msg and 'seed: 0 -> 1' in msg and 'nothing was written' in msg
  assert 'data.num_workers' not in msg   # a key a resume may change is not refused
  assert _tree_snapshot(workdir) == before   # config.json (and everything else) byte for byte

  code, err = _run_cli(monkeypatch, config, workdir)
  assert code == 1
  _one_error_line(err, 'a resume may not change', 'model.vision.width: 32 -> 64')
  assert _tree_snapshot(workdir) == before


def test_a_rewritten_config_json_of_an_older_checkpoint_is_refused(run, tmp_path):
  """Checkpoints without the config in their meta (written before it was) are checked against config.json,
  which must still be the file they were saved with (its sha256 = the meta's config_digest)."""
  workdir = _copy(run, tmp_path)
  for step in (2, 4):
    _edit_json(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata'), lambda m: m.pop('config'))
  ck = ckpt_lib.TrainCheckpointer(ckpt_lib.train_checkpoint_dir(workdir), save_every=1, keep=0)
  try:
    assert ckpt_lib.check_resume(_config(), workdir, ck) == []
    assert ckpt_lib.check_resume(_config(steps=6), workdir, ck) == ['train.total_steps: 4 -> 6']
    # an earlier trainer wrote the new config over it, then failed to restore
    ckpt_lib.write_config(_config(model__vision__width=64), workdir)
    with pytest.raises(errors.UsageError, match=r'config.json is not the config that saved step 4'):
      ckpt_lib.check_resume(_config(model__vision__width=64), workdir, ck)
  finally:
    ck.close()


def test_a_truncated_newest_checkpoint_falls_back_and_is_kept(run, tmp_path, caplog):
  workdir = _copy(run, tmp_path)
  bad_file = _truncate_largest(os.path.join(workdir, 'checkpoints', '4'))
  with open(bad_file, 'rb') as f:
    bad_bytes = f.read()
  # A longer run (a finished one is not re-read). The run had logged steps 3 and 4 after checkpoint 2; the
  # resumed run logs them again.
  config = _config(steps=5)
  with caplog.at_level('WARNING'):
    out = train.train(config, workdir, make_batches=tf.batch_source(config))
  assert out['step'] == 5
  warnings = [r.getMessage() for r in caplog.records if 'is unreadable' in r.getMessage()]
  assert len(warnings) == 1 and 'checkpoint step 4 in' in warnings[0] and 'using step 2' in warnings[0], warnings
  moved = os.path.join(workdir, ckpt_lib.UNREADABLE, '4')
  moved_file = os.path.join(moved, os.path.relpath(bad_file, os.path.join(workdir, 'checkpoints', '4')))
  with open(moved_file, 'rb') as f:
    assert f.read() == bad_bytes                       # never deleted: moved aside as it was
  assert _steps(workdir) == [2, 4, 5]                  # step 4 trained again from 2
  assert _metric_steps(workdir) == [1, 2, 3, 4, 5]     # one row per step


def test_no_readable_checkpoint_is_one_line_and_deletes_nothing(run, tmp_path, monkeypatch):
  workdir = _copy(run, tmp_path)
  for step in (2, 4):
    _truncate_largest(os.path.join(workdir, 'checkpoints', str(step)))
  before = _tree_snapshot(workdir)
  config = _config(steps=5)
  code, err = _run_cli(monkeypatch, config, workdir, make_batches=tf.batch_source(config))
  assert code == 1
  _one_error_line(err, 'no readable checkpoint in', 'step 4', 'step 2')
  assert _tree_snapshot(workdir) == before


@pytest.fixture(scope='module')
def interrupted(tmp_path_factory):
  """Ctrl-C while the batch of step 2 is fetched, through the CLI's main."""
  workdir = str(tmp_path_factory.mktemp('ctrl_c') / 'w')
  config = _config()

  def ctrl_c_before_step_2(index):
    if index == 1:
      os.kill(os.getpid(), signal.SIGINT)
  # Python's own handler, as in a terminal (a test runner started in the background may ignore SIGINT)
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with pytest.MonkeyPatch.context() as mp:
      code, err = _run_cli(mp, config, workdir, make_batches=tf.batch_source(config, ctrl_c_before_step_2))
    handler_after = signal.getsignal(signal.SIGINT)
  finally:
    signal.signal(signal.SIGINT, previous)
  return workdir, code, err, handler_after


def test_ctrl_c_saves_the_step_and_prints_one_line(interrupted):
  workdir, code, err, handler_after = interrupted
  assert code == 130
  lines = err.splitlines()
  assert len(lines) == 1 and lines[0].startswith('interrupted (Ctrl-C) at step 2: saved step 2 to '), err
  assert 'Traceback' not in err
  assert _steps(workdir) == [2]
  assert handler_after is signal.default_int_handler   # the trainer put Python's handler back


def test_a_longer_run_resumes_and_records_the_change(interrupted, tmp_path, capsys, caplog):
  workdir = _copy(interrupted[0], tmp_path)
  config = _config(steps=5)
  with caplog.at_level('INFO'):
    out = train.train(config, workdir, make_batches=tf.batch_source(config))
  assert out['step'] == 5
  said = capsys.readouterr().out + caplog.text   # train.say: stdout, or absl INFO when that is shown
  assert 'resuming with changed settings: train.total_steps: 4 -> 5' in said
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['train']['total_steps'] == 5   # rewritten after the restore
  with open(os.path.join(workdir, ckpt_lib.CONFIG_CHANGES)) as f:
    records = [json.loads(line) for line in f]
  assert [(r['step'], r['changes']) for r in records] == [(2, ['train.total_steps: 4 -> 5'])]
  assert _metric_steps(workdir) == [1, 2, 3, 4, 5]
  assert _steps(workdir) == [2, 4, 5]


def test_metric_writer_drops_rows_after_the_start_step_and_torn_lines(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps({'step': s, 'loss': 1.0}) + '\n' for s in range(1, 6)) + '{"step": 6, "lo')
  writer = train_monitor.MetricWriter(str(tmp_path), start_step=3)
  writer.write(4, {'loss': 0.5})
  writer.close()
  assert [json.loads(line)['step'] for line in path.read_text().splitlines()] == [1, 2, 3, 4]
  writer = train_monitor.MetricWriter(str(tmp_path), start_step=0)   # a fresh run starts the file over
  writer.close()
  assert path.read_text() == ''


# ----------------------------------------------------------------------------------------------------------
# Export and inference-checkpoint loading: one line each.
# ----------------------------------------------------------------------------------------------------------
def _export_cli(capsys, *argv):
  code = export_lib.main(list(argv))
  return code, capsys.readouterr().err


def test_export_falls_back_past_an_unreadable_step_or_names_the_one_asked_for(run, tmp_path, capsys, caplog):
  workdir = _copy(run, tmp_path)
  _truncate_largest(os.path.join(workdir, 'checkpoints', '4'))
  code, err = _export_cli(capsys, '--workdir', workdir, '--dst', str(tmp_path / 'e4'), '--step', '4')
  assert code == 2
  _one_error_line(err, 'checkpoint step 4 in', 'is unreadable')
  with caplog.at_level('WARNING'):
    assert export_lib.main(['--workdir', workdir, '--dst', str(tmp_path / 'e')]) == 0
  assert any('checkpoint step 4 in' in r.getMessage() for r in caplog.records)
  assert ckpt_lib.load_meta(str(tmp_path / 'e'))['step'] == 2
  assert os.path.isdir(os.path.join(workdir, 'checkpoints', '4'))   # export only reads


def test_export_one_line_errors(run, tmp_path, capsys):
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  mismatched = _copy(run, tmp_path, 'mismatched')
  _edit_json(os.path.join(mismatched, 'checkpoints', '4', 'meta', 'metadata'),
             lambda meta: meta['config']['model']['vision'].update(width=48))
  cases = [
      (['--workdir', str(a_file), '--dst', str(tmp_path / 'o')], 'is a file, not a training workdir'),
      (['--workdir', str(tmp_path / 'nope'), '--dst', str(tmp_path / 'o')], 'is not a training workdir'),
      (['--workdir', run, '--dst', str(a_file / 'x')], 'file.txt/x'),
      (['--workdir', run, '--dst', str(a_file)], 'is a file, not a folder'),
      (['--workdir', run, '--dst', str(tmp_path / 'o'), '--step', '3'], 'no checkpoint step 3'),
      (['--workdir', mismatched, '--dst', str(tmp_path / 'o')], 'does not fit the model'),
  ]
  for argv, needle in cases:
    code, err = _export_cli(capsys, *argv)
    assert code == 2, (argv, err)
    _one_error_line(err, needle)


def _damaged_copies(exported, tmp_path):
  """name -> (inference checkpoint folder, the words its one-line error must hold)."""
  out = {}

  def copy(name):
    d = str(tmp_path / name)
    shutil.copytree(exported, d)
    return d

  def overwrite(name, file, text, needle):
    """The copy `name` with `file` holding `text`, whose error must hold `needle`."""
    d = copy(name)
    with open(os.path.join(d, file), 'w') as f:
      f.write(text)
    out[name] = d, needle

  overwrite('not_json', ckpt_lib.MODEL_CONFIG, '{"vision": ', 'model_config.json is not a readable JSON file')
  overwrite('not_dict', ckpt_lib.MODEL_CONFIG, '[1, 2]', 'must hold a JSON object')
  d = copy('no_config')
  os.remove(os.path.join(d, ckpt_lib.MODEL_CONFIG))
  out['no_config'] = d, 'not an ovseg_jax inference checkpoint'
  d = copy('no_variables')
  shutil.rmtree(os.path.join(d, ckpt_lib.VARIABLES))
  out['no_variables'] = d, 'variables: it is missing'
  d = copy('truncated')
  _truncate_largest(os.path.join(d, ckpt_lib.VARIABLES))
  out['truncated'] = d, 'is unreadable'
  overwrite('bad_meta', ckpt_lib.META, '\x00\x01', 'meta.json is not a readable JSON file')
  d = copy('reshaped')
  _edit_json(os.path.join(d, ckpt_lib.MODEL_CONFIG), lambda mc: mc['proj'].update(out=48))
  out['reshaped'] = d, 'does not fit the model'
  d = copy('wrong_types')
  _edit_json(os.path.join(d, ckpt_lib.MODEL_CONFIG), lambda mc: mc['vision'].update(num_heads='two'))
  out['wrong_types'] = d, 'does not describe a model this code builds'
  # a flipped bit that still decompresses: other numbers, caught by the CRC-32s in checksums.json
  d = copy('crc')
  model_config, variables = ckpt_lib.load_inference(exported)
  variables['params']['logit_scale'] = np.asarray(variables['params']['logit_scale']) + 1
  ckpt_lib.save_inference(d, model_config, variables, ckpt_lib.load_meta(exported))
  shutil.copy(os.path.join(exported, ckpt_lib.CHECKSUMS), os.path.join(d, ckpt_lib.CHECKSUMS))
  out['crc'] = d, 'do not match the CRC-32'
  overwrite('bad_checksums', ckpt_lib.CHECKSUMS, '{"variables": ', 'checksums.json is not a readable JSON file')
  return out


def test_inference_checkpoint_loading_is_one_line(exported, tmp_path, capsys):
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  for name, (directory, needle) in _damaged_copies(exported, tmp_path).items():
    with pytest.raises((errors.UsageError, FileNotFoundError)) as e:   # Segmenter: segment / evaluate
      inference.Segmenter.from_checkpoint(directory)
    assert needle in str(e.value) and '\n' not in str(e.value), (name, str(e.value))
    code, err = _export_cli(capsys, '--format', 'official', '--checkpoint', directory, '--dst',
                            str(tmp_path / f'{name}.pth'))
    assert code == 2, (name, err)
    _one_error_line(err, needle)
  with pytest.raises(errors.UsageError, match='is a file, not a checkpoint folder'):
    inference.Segmenter.from_checkpoint(str(a_file))


def test_non_finite_weights_are_refused_at_load(exported, tmp_path):
  model_config, variables = ckpt_lib.load_inference(exported)
  kernel = variables['params']['img_projector']['linear_out']['kernel']
  variables['params']['img_projector']['linear_out']['kernel'] = np.where(np.arange(kernel.size).reshape(
      kernel.shape) == 7, np.nan, kernel).astype(kernel.dtype)
  bad = ckpt_lib.save_inference(str(tmp_path / 'nan'), model_config, variables, ckpt_lib.load_meta(exported))
  with pytest.raises(errors.UsageError, match=r'non-finite weights .* first in params/img_projector/linear_out/'
                                              r'kernel'):
    inference.Segmenter.from_checkpoint(bad)
  assert inference.first_non_finite(ckpt_lib.load_inference(exported)[1]) is None


# ----------------------------------------------------------------------------------------------------------
# The trainer's and the converters' inputs: one line.
# ----------------------------------------------------------------------------------------------------------
def test_train_workdir_that_is_a_file_is_one_line(tmp_path, monkeypatch):
  a_file = tmp_path / 'file.txt'
  a_file.write_text('x')
  for workdir, needle in ((str(a_file), 'is a file, not a folder'), (str(a_file / 'x'), 'cannot create')):
    code, err = _run_cli(monkeypatch, _config(), workdir)
    assert code == 1
    _one_error_line(err, needle)
  assert a_file.read_text() == 'x'


def _fake_official_state():
  """The keys infer_model_config reads, with shapes of a width-24 model (zeros)."""
  t = official.TEXT_PREFIX
  shapes = {
      'img_encoder.pos_embed': (16, 24), 'img_encoder.patch_embed.proj.weight': (24, 3, 4, 4),
      'img_encoder.layers.0.blocks.0.mlp.fc1.weight': (96, 24), 'img_encoder.layers.1.blocks.0.mlp.fc1.weight':
      (96, 24), 'img_encoder.layers.0.group_token': (1, 6, 24),
      'img_projector.linear_hidden.0.weight': (40, 24, 1), 'img_projector.linear_out.weight': (12, 40, 1),
      'multimodal_groupingblock.blocks.0.post_attn.mlp.fc1.weight': (96, 24),
      t + 'embeddings.word_embeddings.weight': (50, 24), t + 'encoder.layer.0.intermediate.dense.weight': (96, 24),
      t + 'embeddings.position_embeddings.weight': (20, 24), t + 'embeddings.token_type_embeddings.weight': (2, 24),
  }
  return {k: np.zeros(s, np.float32) for k, s in shapes.items()}


@pytest.mark.parametrize('stored,needle', [
    ({'model': [1]}, 'model is a list, not a mapping'),
    ({'model': {'img_encoder': 'x'}}, 'model.img_encoder is a str'),
    ({'model': {'img_encoder': {'num_heads': 'eight'}}}, "num_heads='eight' is not a positive integer"),
    ({'model': {'img_encoder': {'num_heads': [0]}}}, 'num_heads=0 is not a positive integer'),
    ({'model': {'img_encoder': {'num_heads': 3, 'drop_path_rate': 'x'}}}, 'drop_path_rate'),
    ({'bert_config': [2]}, 'bert_config is a list'),
    ({'bert_config': {'num_attention_heads': None}}, 'num_attention_heads=None'),
    ({'bert_config': {'num_attention_heads': True}}, 'num_attention_heads=True'),
])
def test_official_stored_config_of_wrong_types_is_one_line(stored, needle):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  with pytest.raises(errors.UsageError) as e:
    official.infer_model_config(_fake_official_state(), stored, tiny.get_config().model)
  assert needle in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_official_tensor_of_too_few_dimensions_is_one_line():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  sd = _fake_official_state()
  sd['img_encoder.pos_embed'] = np.zeros((), np.float32)
  with pytest.raises(errors.UsageError, match=r'img_encoder.pos_embed has shape \(\)'):
    official.infer_model_config(sd, None, tiny.get_config().model)


def test_convert_cli_crafted_config_and_bad_hf_config_json_are_one_line(tmp_path, capsys):
  pth = torch_save.save({'model': _fake_official_state(), 'config': {'model': [1]}}, str(tmp_path / 'c.pth'))
  hf = {}
  for name, text in (('not_json', '{"hidden_size": '), ('list', '[1]'), ('types', '{"hidden_size": "big"}'),
                     ('zero_heads', '{"num_attention_heads": 0}')):
    os.makedirs(tmp_path / name)
    (tmp_path / name / 'config.json').write_text(text)
    hf[name] = str(tmp_path / name)
  cases = [
      (['official', '--src', pth, '--dst', str(tmp_path / 'o')], 'model is a list, not a mapping'),
      (['bert', '--src', hf['not_json'], '--dst', str(tmp_path / 'b')], 'not_json/config.json is not a readable'),
      (['bert', '--src', hf['list'], '--dst', str(tmp_path / 'b')], 'list/config.json must hold a JSON object'),
      (['bert', '--src', hf['types'], '--dst', str(tmp_path / 'b')], "hidden_size='big'"),
      (['bert', '--src', hf['zero_heads'], '--dst', str(tmp_path / 'b')], 'num_attention_heads=0'),
  ]
  for argv, needle in cases:
    assert convert_main.main(argv) == 2, argv
    _one_error_line(capsys.readouterr().err, needle)
