"""Remote workdirs: every file the trainer, export, the checkpoint readers and the sweep summary touch outside
Orbax goes through ovseg_jax/fileio.py (etils.epath), so it works on gs://.

gs:// is served here by an in-memory fsspec filesystem registered as `gcs` (what etils.epath asks fsspec for
when TensorFlow is absent), so the real epath -> fsspec code path runs, without network or gcsfs. Orbax's
array IO (tensorstore) is not part of this: the inference checkpoint's variables are written by a stand-in.
"""

import ast
import json
import os
import sys

from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath
from fsspec.implementations.memory import MemoryFileSystem
import jax
import numpy as np
from orbax.checkpoint._src.path import gcs_utils
import pytest

from configs import tiny
from ovseg_jax import checkpoint as ckpt_lib
from ovseg_jax import export as export_lib
from ovseg_jax import fileio
from ovseg_jax import sweep
from ovseg_jax import train
from ovseg_jax.convert import bert as convert_bert
from ovseg_jax.convert import dino as convert_dino
from ovseg_jax import train_monitor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeGCS(MemoryFileSystem):
  """gs://bucket/key -> an in-memory file /bucket/key (its own store, not MemoryFileSystem's shared one)."""
  protocol = ('gs', 'gcs')
  store = {}
  pseudo_dirs = ['']

  def __init__(self, *args, finalize_on_close=False, **kwargs):  # pylint: disable=unused-argument
    super().__init__(*args, **kwargs)

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path)
    for prefix in ('gs://', 'gcs://'):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return super()._strip_protocol(path)


@pytest.fixture
def fake_gcs(monkeypatch):
  monkeypatch.setitem(sys.modules['fsspec.registry']._registry, 'gcs', FakeGCS)
  monkeypatch.setattr(epath_gpath, '_is_tf_installed', lambda: False)   # epath -> fsspec, as without TF
  monkeypatch.setattr(fileio, '_tf_backend_available', lambda: False)
  monkeypatch.setattr(fileio, '_package_available', lambda name: name in ('gcsfs', 'google.cloud.storage'))
  monkeypatch.setattr(gcs_utils, 'is_hierarchical_namespace_enabled', lambda path: False)  # a bucket lookup
  FakeGCS.store.clear()
  FakeGCS.pseudo_dirs[:] = ['']
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  yield FakeGCS.store
  FakeGCS.store.clear()
  FakeGCS.clear_instance_cache()
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access


def _text(store, key):
  return store[key].getvalue().decode()


def test_workdir_config_metrics_and_tensorboard_on_gs(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # nothing may land in a local folder named gs:/...
  wd = 'gs://bucket/run'
  fileio.makedirs(wd)
  config = tiny.get_config()
  ckpt_lib.write_config(config, wd)
  expected = json.loads(config.model.to_json())
  assert json.loads(_text(fake_gcs, '/bucket/run/config.json'))['model'] == expected
  assert ckpt_lib.load_workdir_config(wd).model.to_dict() == expected

  writer = train_monitor.MetricWriter(wd, sync_seconds=3600.0)
  writer.write(1, {'loss': 3.0})          # the first record is uploaded at once
  assert [json.loads(x)['step'] for x in _text(fake_gcs, '/bucket/run/metrics.jsonl').splitlines()] == [1]
  writer.write(2, {'loss': 2.0})          # then at most every sync_seconds, at checkpoints and at close
  assert len(_text(fake_gcs, '/bucket/run/metrics.jsonl').splitlines()) == 1
  writer.close()
  writer = train_monitor.MetricWriter(wd)         # a resumed run continues the file
  writer.write(3, {'loss': 1.0})
  writer.close()
  records = [json.loads(x) for x in _text(fake_gcs, '/bucket/run/metrics.jsonl').splitlines()]
  assert [(r['step'], r['loss']) for r in records] == [(1, 3.0), (2, 2.0), (3, 1.0)]
  events = [k for k in fake_gcs if k.startswith('/bucket/run/tb/events.out.tfevents.')]
  assert events and all(fake_gcs[k].getvalue() for k in events)   # names: unix second + host
  assert not os.listdir(tmp_path)

  fileio.makedirs(fileio.join(wd, 'eval'))
  fileio.write_text(fileio.join(wd, 'eval', 'metrics.json'), json.dumps({'voc': {'miou': 41.5}}))
  summary = sweep.final_metrics(wd)
  assert summary['step'] == 3 and summary['loss'] == 1.0 and summary['eval/voc.miou'] == 41.5

  # export reads config.json remotely, then Orbax lists WORKDIR/checkpoints through the same epath backend.
  with pytest.raises(FileNotFoundError, match='no training checkpoint in gs://bucket/run/checkpoints'):
    export_lib.export(wd, str(tmp_path / 'exported'))


def test_inference_checkpoint_json_on_gs(fake_gcs, monkeypatch):
  saved = {}

  def save_variables(var_dir, variables):   # stand-in for Orbax's tensorstore write
    saved[var_dir] = variables
    fileio.makedirs(var_dir)
    fileio.write_text(fileio.join(var_dir, 'stand_in'), '')
  monkeypatch.setattr(ckpt_lib, '_save_variables', save_variables)
  monkeypatch.setattr(ckpt_lib, '_restore_variables', lambda var_dir: saved[var_dir])

  model_config = tiny.get_config().model
  expected = json.loads(model_config.to_json())   # tuples are lists in JSON
  meta = {'step': 7, 'exporter': 'ovseg_jax.export', 'eval': {'templates': 'full'}}
  out = ckpt_lib.save_inference('gs://bucket/exp', model_config, {'params': {'w': np.ones(2)}}, meta)
  assert out == 'gs://bucket/exp'
  assert json.loads(_text(fake_gcs, '/bucket/exp/meta.json')) == meta
  assert json.loads(_text(fake_gcs, '/bucket/exp/model_config.json')) == expected
  loaded_config, variables = ckpt_lib.load_inference('gs://bucket/exp')   # Segmenter.from_checkpoint's reads
  assert loaded_config.to_dict() == expected and variables['params']['w'].shape == (2,)
  assert ckpt_lib.load_meta('gs://bucket/exp') == meta
  assert ckpt_lib.load_meta('gs://bucket/elsewhere') == {}
  with pytest.raises(FileNotFoundError, match='not an ovseg_jax inference checkpoint'):
    ckpt_lib.load_model_config('gs://bucket/elsewhere')


def test_dino_and_bert_inits_are_written_through_fileio_on_gs(fake_gcs, monkeypatch):
  """`convert dino` / `convert bert` write their folders through checkpoint.py (JSON via fileio, arrays via
  the Orbax stand-in), so a gs:// destination works; the source readers are stubbed."""
  saved = {}

  def save_variables(var_dir, variables):
    saved[var_dir] = variables
    fileio.makedirs(var_dir)
  monkeypatch.setattr(ckpt_lib, '_save_variables', save_variables)
  monkeypatch.setattr(ckpt_lib, '_restore_variables', lambda var_dir: saved[var_dir])
  model_config = tiny.get_config().model
  encoder = {'norm': {'scale': np.ones(4, np.float32)}}
  monkeypatch.setattr(convert_dino, 'load_dino', lambda src, mc: encoder)
  assert convert_dino.save_dino_init('dino.pth', 'gs://bucket/dino', model_config) == 'gs://bucket/dino'
  assert json.loads(_text(fake_gcs, '/bucket/dino/model_config.json')) == json.loads(model_config.to_json())
  assert json.loads(_text(fake_gcs, '/bucket/dino/meta.json'))['converter'] == 'ovseg_jax.convert.dino'
  np.testing.assert_array_equal(convert_dino.load_dino_init('gs://bucket/dino')['img_encoder']['norm']['scale'],
                                np.ones(4))

  text_config = model_config.text
  params = convert_bert.param_shapes(text_config)
  params = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), params)
  monkeypatch.setattr(convert_bert, 'load_hf_folder', lambda src: (text_config, params))
  assert convert_bert.save_bert_init('hf_dir', 'gs://bucket/bert') == 'gs://bucket/bert'
  assert json.loads(_text(fake_gcs, '/bucket/bert/text_config.json')) == text_config.to_dict()
  assert json.loads(_text(fake_gcs, '/bucket/bert/meta.json'))['converter'] == 'ovseg_jax.convert.bert'
  cfg, loaded = convert_bert.load_bert_init('gs://bucket/bert')
  assert cfg.to_dict() == text_config.to_dict()
  assert len(jax.tree.leaves(loaded)) == len(jax.tree.leaves(params)) > 10


def test_missing_remote_backend_is_one_actionable_line(monkeypatch, tmp_path):
  monkeypatch.setattr(fileio, '_tf_backend_available', lambda: False)
  monkeypatch.setattr(fileio, '_package_available', lambda name: False)
  with pytest.raises(fileio.RemoteBackendError, match=r'pip install gcsfs') as e:
    train.train(tiny.get_config(), 'gs://bucket/run')
  assert '\n' not in str(e.value)
  monkeypatch.setattr(fileio, '_package_available', lambda name: name == 'gcsfs')
  with pytest.raises(fileio.RemoteBackendError, match=r'need google-cloud-storage'):
    fileio.exists('gs://bucket/run')
  with pytest.raises(fileio.RemoteBackendError, match=r'unsupported scheme memory://'):
    fileio.exists('memory://x')
  assert export_lib.main(['--workdir', 'gs://bucket/run', '--dst', str(tmp_path / 'x')]) == 2


def test_local_paths_use_the_builtins(tmp_path):
  path = fileio.join(str(tmp_path), 'a', 'b.txt')
  assert path == os.path.join(str(tmp_path), 'a', 'b.txt')
  fileio.makedirs(os.path.dirname(path))
  fileio.write_text(path, 'x\n')
  with fileio.open(path, 'a') as f:
    f.write('y\n')
  assert open(path).read() == 'x\ny\n' and fileio.isfile(path) and fileio.isdir(str(tmp_path / 'a'))
  assert fileio.listdir(str(tmp_path / 'a')) == ['b.txt'] and fileio.abspath('rel') == os.path.abspath('rel')


@pytest.mark.parametrize('module', ['train.py', 'export.py', 'checkpoint.py', 'convert/dino.py'])
def test_no_builtin_file_access(module):
  """Guard: these modules reach files only through fileio (and Orbax)."""
  tree = ast.parse(open(os.path.join(ROOT, 'ovseg_jax', module)).read())
  banned = {'open', 'os.makedirs', 'os.path.exists', 'os.path.isfile', 'os.path.isdir', 'os.path.abspath'}
  calls = {ast.unparse(node.func) for node in ast.walk(tree) if isinstance(node, ast.Call)}
  assert not calls & banned
