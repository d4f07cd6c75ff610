"""The restricted `.pth` reader: tensors exact, unknown globals inert, nothing executed, torch never imported."""

import collections
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ovseg_jax.convert import torch_pickle

torch = pytest.importorskip('torch')


def test_tensors_roundtrip_exactly(tmp_path):
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g)
  state = collections.OrderedDict(
      f32=torch.randn(3, 4, generator=g),
      transposed=base.t(),                       # non-contiguous view
      offset_view=base[2:, 1:4],                 # storage offset + strides
      shared=base,                               # same storage as the two views above
      f16=torch.randn(7, generator=g).half(),
      bf16=torch.randn(2, 3, generator=g).bfloat16(),
      i64=torch.arange(5, dtype=torch.int64),
      scalar=torch.tensor(4.5),
      empty=torch.zeros(0, 3),
      param=torch.nn.Parameter(torch.randn(2, 2, generator=g)),
      nested={'list': [torch.ones(2)], 'n': 3, 's': 'x'},
  )
  path = str(tmp_path / 'a.pth')
  torch.save(state, path)
  loaded = torch_pickle.load(path)
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
  for k in ('f32', 'transposed', 'offset_view', 'shared', 'f16', 'i64', 'scalar', 'empty', 'param'):
    ref = state[k].detach().numpy()
    assert loaded[k].shape == ref.shape and loaded[k].dtype == ref.dtype, k
    np.testing.assert_array_equal(loaded[k], ref, err_msg=k)
  np.testing.assert_array_equal(loaded['bf16'].astype(np.float32), state['bf16'].float().numpy())
  np.testing.assert_array_equal(loaded['nested']['list'][0], np.ones(2, np.float32))
  assert loaded['nested']['n'] == 3 and loaded['nested']['s'] == 'x'


class _Evil:
  """Pickles as a REDUCE of os.system: plain torch.load(weights_only=False) would run the command."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def test_malicious_global_is_never_called(tmp_path):
  marker = tmp_path / 'pwned'
  path = str(tmp_path / 'evil.pth')
  torch.save({'w': torch.ones(2), 'payload': _Evil(str(marker))}, path)
  obj, inert = torch_pickle.load(path, return_inert_globals=True)
  assert not marker.exists()
  assert isinstance(obj['payload'], torch_pickle.Inert)
  assert obj['payload'].global_name in ('posix.system', 'os.system', 'nt.system')
  assert obj['payload'].args == (f'touch {marker}',)  # recorded, not executed
  assert any(name.endswith('.system') for name in inert)
  np.testing.assert_array_equal(obj['w'], np.ones(2, np.float32))
  # An inert object where a tensor storage is required is a clear error, not a silent success.
  with pytest.raises(ValueError, match='tensor storage'):
    torch_pickle._rebuild_tensor(obj['payload'], 0, (2,), (1,))  # pylint: disable=protected-access


def test_state_dict_of_rejects_an_inert_payload(tmp_path):
  path = str(tmp_path / 'evil2.pth')
  torch.save(_Evil(str(tmp_path / 'x')), path)
  with pytest.raises(ValueError, match='does not hold a state dict'):
    torch_pickle.state_dict_of(torch_pickle.load(path), path)
  assert not (tmp_path / 'x').exists()


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    torch_pickle.load(str(tmp_path / 'missing.pth'))
  bad = tmp_path / 'legacy.pth'
  bad.write_bytes(b'\x80\x02}q\x00.')
  with pytest.raises(ValueError, match='not a zip-format'):
    torch_pickle.load(str(bad))
  # A zip whose storage record is missing.
  path = str(tmp_path / 'ok.pth')
  torch.save({'w': torch.ones(3)}, path)
  broken = str(tmp_path / 'broken.pth')
  with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, 'w') as dst:
    for item in src.namelist():
      if '/data/' not in item:
        dst.writestr(item, src.read(item))
  with pytest.raises(ValueError, match='missing from the archive'):
    torch_pickle.load(broken)


def test_reads_the_authors_checkpoint_without_torch(golden_dir):
  """In a fresh interpreter: the OmegaConf config becomes inert, nothing imports torch or omegaconf."""
  code = (
      'import sys; from ovseg_jax.convert import torch_pickle as tp\n'
      f'obj, names = tp.load({os.path.join(golden_dir, "official_ckpt.pth")!r}, True)\n'
      'assert "torch" not in sys.modules and "omegaconf" not in sys.modules, "imported"\n'
      'assert isinstance(obj["config"], tp.Inert), obj["config"]\n'
      'assert "omegaconf.dictconfig.DictConfig" in names\n'
      'cfg = tp.plain(obj["config"])\n'
      'assert cfg["model"]["img_encoder"]["num_heads"] == [8, 8], cfg["model"]["img_encoder"]\n'
      'assert cfg["bert_config"]["num_attention_heads"] == 4\n'
      'sd = tp.state_dict_of(obj)\n'
      'assert len(sd) == 491 and sd["img_encoder.pos_embed"].shape == (196, 64)\n'
      'assert sd["img_projector.linear_hidden.1.num_batches_tracked"] == 100\n'
      'print("ok")\n')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  res = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert res.returncode == 0 and res.stdout.strip() == 'ok', res.stderr[-2000:]
