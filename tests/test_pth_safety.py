"""Crafted and damaged `.pth` files: the reader never reads outside a storage, never hangs, never crashes.

Every refusal is one `errors.UsageError` line naming the file (and the tensor's key when known). The fuzz
test mutates real checkpoints (written by torch and by convert/torch_save.py) a few hundred ways and loads
each in a child process (tests/pth_fuzz_worker.py), so a segfault shows as a negative exit code and a hang as
a timeout.
"""

import collections
import json
import os
import pickle
import pickletools
import random
import struct
import subprocess
import sys
import time
import zipfile

import ml_dtypes
import numpy as np
import pytest

from ovseg_jax import errors
from ovseg_jax.convert import bert
from ovseg_jax.convert import torch_pickle
from ovseg_jax.convert import torch_save

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGE = np.arange(16, dtype=np.float32) + 0.5  # the storage every crafted tensor views


def _zip_pth(path, pkl: bytes, records: dict, archive='a', compression=zipfile.ZIP_STORED) -> str:
  """A torch-layout zip: archive/data.pkl, archive/byteorder, archive/data/<key>."""
  with zipfile.ZipFile(path, 'w', compression) as zf:
    zf.writestr(f'{archive}/data.pkl', pkl)
    zf.writestr(f'{archive}/byteorder', b'little')
    for key, raw in records.items():
      zf.writestr(f'{archive}/data/{key}', raw)
  return str(path)


def _tensor_ops(p: torch_save._Pickler, storage_key, storage_type, numel, offset, size, stride):
  """Emits one `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` call, any values."""
  p._global('torch._utils', '_rebuild_tensor_v2')
  p.out += b'(('
  p._str('storage')
  p._global('torch', storage_type)
  p._str(storage_key)
  p._str('cpu')
  p._int(numel)
  p.out += b'tQ'
  p._int(offset)
  p._tuple(size)
  p._tuple(stride)
  p.out += b'\x89'
  p._ordered_dict({})
  p.out += b'tR'


def _crafted(tmp_path, offset, size, stride, numel=16, raw=STORAGE.tobytes(), storage_type='FloatStorage',
             name='crafted.pth') -> str:
  """{'model': {'good': STORAGE, 'w': <the crafted view>}} with STORAGE as record '0'."""
  p = torch_save._Pickler()
  p.out += b'}(X\x05\x00\x00\x00model}('
  p._str('good')
  _tensor_ops(p, '0', 'FloatStorage', 16, 0, (16,), (1,))
  p._str('w')
  _tensor_ops(p, '0', storage_type, numel, offset, size, stride)
  p.out += b'uu.'
  return _zip_pth(tmp_path / name, bytes(p.out), {'0': raw})


def _refused(path, *patterns):
  with pytest.raises(errors.UsageError) as info:
    torch_pickle.load(path)
  msg = str(info.value)
  assert '\n' not in msg and msg.startswith(path), msg
  for pattern in patterns:
    assert pattern in msg, (pattern, msg)
  return msg


# -- tensor views ----------------------------------------------------------------------------------------------

def test_valid_crafted_views_load_exactly(tmp_path):
  """The validator accepts what torch writes: transposes, offsets, steps, size-1 dims with any stride."""
  for offset, size, stride, want in [
      (0, (4, 4), (1, 4), STORAGE.reshape(4, 4).T),                 # transpose
      (5, (2, 3), (4, 1), np.stack([STORAGE[5:8], STORAGE[9:12]])),  # offset sub-block
      (1, (3,), (5,), STORAGE[1::5]),                                # step
      (0, (1, 16), (0, 1), STORAGE[None]),                           # HF position_ids: expand((1, -1))
      (3, (1, 1), (2**62, 2**62), STORAGE[3:4][None]),               # size-1 dims: stride never stepped
      (16, (0, 3), (3, 1), np.zeros((0, 3), np.float32)),            # empty at the end of the storage
      (7, (), (), STORAGE[7]),                                       # scalar
  ]:
    path = _crafted(tmp_path, offset, size, stride)
    got = torch_pickle.load(path)['model']['w']
    assert got.shape == np.shape(want) and got.flags.writeable, (size, stride)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('offset, size, stride, numel, pattern', [
    (15, (16,), (-1,), 16, 'outside [0, 2**63)'),                    # negative stride: read backwards
    (0, (-2,), (1,), 16, 'outside [0, 2**63)'),                      # negative size
    (-1, (1,), (1,), 16, 'storage offset -1'),                       # negative offset
    (0, (2,), (2**40,), 16, 'outside its storage'),                  # huge stride
    (2**62, (1,), (1,), 16, 'outside its storage'),                  # huge offset
    (2**64, (1,), (1,), 16, 'storage offset'),                       # offset over int64
    (0, (2,), (2**64 + 1,), 16, 'outside [0, 2**63)'),               # stride over int64
    (0, (2**40, 2**40), (2**40, 1), 16, 'outside its storage'),      # size * stride overflows int64
    (0, (2**62, 3), (4, 2**62), 16, 'outside its storage'),          # sum of products overflows int64
    (0, (4, 4), (1, 1), 16, 'overlapping'),                          # overlapping view
    (0, (4, 4), (3, 2), 16, 'overlapping'),                          # partly overlapping (6 = 2*3 = 3*2)
    (0, (10**9,), (0,), 16, 'overlapping'),                          # zero stride, huge size
    (0, (16, 16), (1, 0), 16, 'overlapping'),                        # expanded
    (0, (17,), (1,), 16, 'outside its storage'),                     # one element past the end
    (17, (0,), (1,), 16, 'out of range'),                            # empty, offset past the end
    (0, (0, 2**40, 2**40), (1, 1, 1), 16, 'out of range'),           # empty, unallocatable shape
    (0, (2.0,), (1,), 16, 'holds 2.0, not an int'),
    (0, (True,), (1,), 16, 'holds True, not an int'),
    (0, (4,), (1, 1), 16, 'different lengths'),
    (0, (1,) * 65, (1,) * 65, 16, '65 dims'),
    (0, (16,), (1,), 32, 'truncated'),                               # record shorter than declared
    (0, (16,), (1,), -3, 'declares -3 elements'),
    (0, (16,), (1,), 2**70, 'declares'),
])
def test_crafted_views_are_refused_naming_the_key(tmp_path, offset, size, stride, numel, pattern):
  path = _crafted(tmp_path, offset, size, stride, numel=numel)
  _refused(path, pattern, "tensor 'model/w'")


def test_bad_storage_types_and_records(tmp_path):
  _refused(_crafted(tmp_path, 0, (4,), (1,), storage_type='ComplexFloatStorage', name='c.pth'),
           'unsupported storage type', 'torch.ComplexFloatStorage')
  # A 10-element record that the pickle declares as 16 elements (truncated inside the zip).
  _refused(_crafted(tmp_path, 0, (4,), (1,), raw=STORAGE[:10].tobytes(), name='t.pth'),
           'data/0 holds 40 bytes', 'declares 64')


def test_a_tensor_is_never_a_storage(tmp_path):
  """A memo reference to a rebuilt 2-D tensor where a storage belongs (the old reader sliced its rows)."""
  p = torch_save._Pickler()
  p.out += b'}(X\x01\x00\x00\x00a'
  _tensor_ops(p, '0', 'FloatStorage', 16, 0, (4, 4), (4, 1))
  p.out += b'q\x00X\x01\x00\x00\x00b'                  # BINPUT 0: the 4x4 array
  p._global('torch._utils', '_rebuild_tensor_v2')
  p.out += b'(h\x00'                                   # BINGET 0 as the storage
  p._int(3)
  p._tuple((13,))
  p._tuple((1,))
  p.out += b'\x89)tRu.'
  path = _zip_pth(tmp_path / 'x.pth', bytes(p.out), {'0': STORAGE.tobytes()})
  _refused(path, "tensor 'b'", 'not a storage record')


def test_repeated_views_cannot_amplify_memory(tmp_path, monkeypatch):
  """Distinct views of one storage may materialise at most _VIEW_BUDGET x its bytes (+ slack, 0 here)."""
  monkeypatch.setattr(torch_pickle, '_VIEW_SLACK', 0)
  p = torch_save._Pickler()
  p.out += b'}('
  for i in range(8):
    p._str(f't{i}')
    _tensor_ops(p, '0', 'FloatStorage', 16, i, (16 - i,), (1,))
  p.out += b'u.'
  _refused(_zip_pth(tmp_path / 'amp.pth', bytes(p.out), {'0': STORAGE.tobytes()}), 'repeated views', "'t4'")
  # The same view twice (tied weights) is one array, as torch shares the storage: no budget used.
  p = torch_save._Pickler()
  p.out += b'}('
  for i in range(20):
    p._str(f't{i}')
    _tensor_ops(p, '0', 'FloatStorage', 16, 0, (16,), (1,))
  p.out += b'u.'
  tied = torch_pickle.load(_zip_pth(tmp_path / 'tied.pth', bytes(p.out), {'0': STORAGE.tobytes()}))
  assert tied['t0'] is tied['t19']
  np.testing.assert_array_equal(tied['t19'], STORAGE)


def test_bool_storage_bytes_become_valid_bools(tmp_path):
  p = torch_save._Pickler()
  p.out += b'}(X\x01\x00\x00\x00m'
  _tensor_ops(p, '0', 'BoolStorage', 4, 0, (4,), (1,))
  p.out += b'u.'
  got = torch_pickle.load(_zip_pth(tmp_path / 'b.pth', bytes(p.out), {'0': bytes([0, 1, 2, 255])}))['m']
  assert got.dtype == np.bool_ and got.tolist() == [False, True, True, True]
  assert got.view(np.uint8).tolist() == [0, 1, 1, 1]


# -- whole files ---------------------------------------------------------------------------------------------

def _good_file(tmp_path, name='good.pth'):
  return torch_save.save({'model': {'w': STORAGE.reshape(4, 4), 'b': np.ones(3, np.float16)},
                          'config': {'a': [1, 2.5, 'x']}}, str(tmp_path / name))


def test_damaged_files_get_one_clear_line(tmp_path):
  good = _good_file(tmp_path)
  data = open(good, 'rb').read()
  (tmp_path / 'trunc.pth').write_bytes(data[:len(data) // 2])
  msg = _refused(str(tmp_path / 'trunc.pth'), 'damaged zip')
  assert 'legacy' not in msg
  (tmp_path / 'empty.pth').write_bytes(b'')
  _refused(str(tmp_path / 'empty.pth'), 'is empty')
  (tmp_path / 'text.pth').write_bytes(b'hello world, not a checkpoint')
  _refused(str(tmp_path / 'text.pth'), 'not a torch checkpoint')
  (tmp_path / 'folder.pth').mkdir()
  msg = _refused(str(tmp_path / 'folder.pth'), 'is a folder')
  assert 'does not exist' not in msg
  # A bit flip inside the storage bytes: zipfile's CRC check names the record.
  at = data.find(STORAGE.tobytes())
  flipped = bytearray(data)
  flipped[at + 5] ^= 0x10
  (tmp_path / 'flip.pth').write_bytes(bytes(flipped))
  _refused(str(tmp_path / 'flip.pth'), 'is damaged', 'CRC')
  # A bit flip inside data.pkl.
  at = data.find(b'_rebuild_tensor_v2')
  flipped = bytearray(data)
  flipped[at] ^= 0x01
  (tmp_path / 'flip2.pth').write_bytes(bytes(flipped))
  _refused(str(tmp_path / 'flip2.pth'), 'damaged checkpoint', 'CRC')


def test_compressed_records(tmp_path):
  """Deflated records load (torch reads them too); other zip compressions are refused in one line."""
  good = _good_file(tmp_path)
  with zipfile.ZipFile(good) as src:
    members = {n: src.read(n) for n in src.namelist()}
  for method, ok in ((zipfile.ZIP_DEFLATED, True), (zipfile.ZIP_BZIP2, False)):
    path = str(tmp_path / f'c{method}.pth')
    with zipfile.ZipFile(path, 'w', method) as dst:
      for n, raw in members.items():
        dst.writestr(n, raw)
    if ok:
      np.testing.assert_array_equal(torch_pickle.load(path)['model']['w'], STORAGE.reshape(4, 4))
    else:
      _refused(path, 'compression method')


# -- pickle structures ---------------------------------------------------------------------------------------

def _dag_pickle(levels: int, tuples=False) -> bytes:
  """{'model': {}, 'config': L} where L_{i+1} = [L_i, L_i] (or a tuple), L_0 = []: 2**levels leaves."""
  out = bytearray(b'\x80\x02}(X\x05\x00\x00\x00model}X\x06\x00\x00\x00config')
  out += (b')' if tuples else b']') + b'q\x00'
  for i in range(levels):
    get = b'h' + bytes([i])                               # BINGET: the level below, twice
    out += b'0' + ((b'(' + get + get + b't') if tuples else (b'](' + get + get + b'e')) + b'q' + bytes([i + 1])
  return bytes(out + b'u.')


def test_shared_list_dag_config_is_refused_fast(tmp_path):
  path = _zip_pth(tmp_path / 'dag.pth', _dag_pickle(40), {})
  assert os.path.getsize(path) < 1200
  start = time.perf_counter()
  obj = torch_pickle.load(path)
  with pytest.raises(errors.UsageError, match='expands to more than 1,000,000 nodes'):
    torch_pickle.plain(obj['config'], f'{path}: config')
  assert time.perf_counter() - start < 5
  # A DAG under the cap is copied into a plain tree (no shared objects left for json.dumps to re-expand).
  small = torch_pickle.load(_zip_pth(tmp_path / 'dag10.pth', _dag_pickle(10), {}))['config']
  tree = torch_pickle.plain(small)
  assert tree[0] is not tree[1] and json.dumps(tree).count('[]') == 2**10
  # OmegaConf-style wrappers are unwrapped; a cycle ends at the depth cap.
  node = torch_pickle.Inert()
  node.state = {'_content': {'a': torch_pickle.Inert()}}
  node.state['_content']['a'].state = {'_val': 3}
  assert torch_pickle.plain(node) == {'a': 3}
  loop = []
  loop.append(loop)
  with pytest.raises(errors.UsageError, match='deeper than 100 levels'):
    torch_pickle.plain(loop, 'cfg')


def test_the_convert_cli_refuses_bad_sources_in_one_line(tmp_path, capsys):
  from ovseg_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  dag = _zip_pth(tmp_path / 'dag.pth', _dag_pickle(40), {})
  good = open(_good_file(tmp_path), 'rb').read()
  (tmp_path / 'trunc.pth').write_bytes(good[:-100])
  (tmp_path / 'dir.pth').mkdir()
  config = os.path.join(ROOT, 'configs', 'tiny.py')
  for kind, src, want in [('official', dag, f'{dag}: config expands to more than 1,000,000 nodes'),
                          ('official', str(tmp_path / 'trunc.pth'), 'is a damaged zip (truncated'),
                          ('official', str(tmp_path / 'dir.pth'), 'is a folder'),
                          ('dino', str(tmp_path / 'dir.pth'), 'is a folder'),
                          ('dino', _crafted(tmp_path, 0, (16, 16), (1, 0)), "tensor 'model/w'")]:
    start = time.perf_counter()
    assert cli.main([kind, '--src', src, '--dst', str(tmp_path / 'out'), '--config', config]) == 2, src
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err.strip()
    assert err.count('\n') == 0 and err.startswith('error: ') and want in err, (src, err)
    assert 'legacy' not in err and 'does not exist' not in err
  assert not (tmp_path / 'out').exists()


def test_key_names_with_newlines_stay_on_one_line(tmp_path):
  p = torch_save._Pickler()
  p.out += b'}('
  p._str('evil\nkey\x1b[2J')
  _tensor_ops(p, '0', 'FloatStorage', 16, 15, (16,), (-1,))
  p.out += b'u.'
  msg = _refused(_zip_pth(tmp_path / 'nl.pth', bytes(p.out), {'0': STORAGE.tobytes()}), 'evil')
  assert '\x1b' not in msg


def test_tuple_dag_keys_cannot_hang_hashing(tmp_path):
  # A 40-level tuple DAG as a dict key: hashing it would take 2**40 steps.
  pkl = _dag_pickle(40, tuples=True)[:-2] + b'K\x01s.'  # config tuple as a key of {'model': {}, ...}
  pkl = pkl.replace(b'X\x06\x00\x00\x00config', b'', 1)
  start = time.perf_counter()
  _refused(_zip_pth(tmp_path / 'key.pth', pkl, {}), 'nested tuples')
  # A 511-node key inserted 30,000 times: bounded total hashing work.
  out = bytearray(_dag_pickle(8, tuples=True)[:-2].replace(b'X\x06\x00\x00\x00config', b'', 1) + b'K\x01s')
  out += b'}' + (b'h\x08K\x01s') * 30_000 + b'X\x01\x00\x00\x00zs.'
  _refused(_zip_pth(tmp_path / 'many.pth', bytes(out), {}), 'hashing the tuple keys')
  assert time.perf_counter() - start < 5


def test_inert_containers_and_restricted_opcodes(tmp_path):
  """defaultdict-like items are recorded on the Inert stand-in; BUILD / calls on other objects are refused."""
  pkl = (b'\x80\x02}(X\x01\x00\x00\x00dccollections\ndefaultdict\n)R(X\x01\x00\x00\x00aK\x01uX\x01\x00\x00\x00'
         b'lcfoo\nBar\n)R(K\x01K\x02eu.')
  obj = torch_pickle.load(_zip_pth(tmp_path / 'dd.pth', pkl, {}))
  assert obj['d'].global_name == 'collections.defaultdict' and obj['d'].dictitems == [('a', 1)]
  assert obj['l'].listitems == [1, 2]
  p = torch_save._Pickler()
  p.out += b'}(X\x01\x00\x00\x00a'
  _tensor_ops(p, '0', 'FloatStorage', 16, 0, (16,), (1,))
  p.out += b'}X\x07\x00\x00\x00stridesM\x20\x4e\x85sb'  # BUILD {'strides': (20000,)} on the ndarray
  p.out += b'u.'
  _refused(_zip_pth(tmp_path / 'build.pth', bytes(p.out), {'0': STORAGE.tobytes()}), 'BUILD on')
  _refused(_zip_pth(tmp_path / 'call.pth', b'\x80\x02X\x01\x00\x00\x00a)R.', {}), 'cannot call')
  _refused(_zip_pth(tmp_path / 'ba8.pth', b'\x80\x05\x96' + struct.pack('<Q', 2**40) + b'.', {}),
           'protocol-5 buffer')
  _refused(_zip_pth(tmp_path / 'long.pth', b'\x80\x02L' + b'9' * 100_000 + b'L\n.', {}),  # 100k-digit LONG
           'data.pkl is damaged', 'Exceeds the limit')
  _refused(_zip_pth(tmp_path / 'pid.pth', b'\x80\x02X\x01\x00\x00\x00aQ.', {}), 'unsupported persistent id')


# -- child-process runs: crashes and hangs are visible -------------------------------------------------------

def _run_worker(files, timeout=120):
  """Loads `files` in child processes; returns {file: outcome record}. A crash or hang of the child is
  recorded for the file it was loading, and the remaining files go to a fresh child."""
  results, todo = {}, list(files)
  while todo:
    child = subprocess.Popen([sys.executable, '-m', 'tests.pth_fuzz_worker', *todo], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, JAX_PLATFORMS='cpu'))
    try:
      out, err = child.communicate(timeout=timeout)
      rc = child.returncode
    except subprocess.TimeoutExpired:
      child.kill()
      out, err = child.communicate()
      rc = 'timeout'
    done = [json.loads(line) for line in out.splitlines() if line.startswith('{')]
    for rec in done:
      results[rec['file']] = rec
    todo = todo[len(done):]
    if todo:  # the child died or hung on todo[0]
      results[todo[0]] = {'file': todo[0], 'outcome': 'crash' if rc != 'timeout' else 'hang',
                          'seconds': None, 'detail': f'exit {rc}: {err[-500:]}'}
      todo = todo[1:]
  return results


def test_dangerous_structures_in_a_child_process(tmp_path):
  """Files that would crash or hang a naive reader; each must end as a clean load or one line, quickly."""
  cases = {
      'deep_lists': (b'\x80\x02' + b']' * 200_000 + b'a' * 199_999 + b'.', 'ok'),
      'deep_tuples': (b'\x80\x02)' + b'\x85' * 200_000 + b'.', 'ok'),
      'deep_tuple_key': (b'\x80\x02}' + b')' + b'\x85' * 50_000 + b'K\x01s.', 'error'),
      'huge_memo_index': (b'\x80\x02K\x01r\xff\xff\xff\x7f0j\xff\xff\xff\x7f.', 'ok'),
      'many_globals': (b'\x80\x02' + b''.join(b'cm\ng%d\n0' % i for i in range(20_000)) + b'N.', 'error'),
      'many_appends_to_inert': (b'\x80\x02cm\nC\n)R' + b'K\x01a' * 100_000 + b'.', 'ok'),
      'dag_config': (_dag_pickle(40), 'error'),  # refused by the node cap of plain()
      'long4_huge_size': (None, 'error'),
  }
  p = torch_save._Pickler()
  p.out += b'}(X\x01\x00\x00\x00w'
  _tensor_ops(p, '0', 'FloatStorage', 16, 0, (123456789,), (1,))
  p.out += b'u.'
  long4 = pickle.dumps(1 << 800_000, protocol=2)[2:-1]  # LONG4 of 100 KB: a size no multiply should touch
  cases['long4_huge_size'] = (bytes(p.out).replace(b'J' + struct.pack('<i', 123456789), long4), 'error')
  files = {}
  for name, (pkl, _) in cases.items():
    files[name] = _zip_pth(tmp_path / f'{name}.pth', pkl, {'0': STORAGE.tobytes()})
  results = _run_worker(list(files.values()), timeout=120)
  for name, (_, want) in cases.items():
    rec = results[files[name]]
    assert rec['outcome'] == want and rec['seconds'] < 5, (name, rec)


def _mutants(base: str, rng: random.Random, out_dir, n_each: int):
  """Seeded byte and structure mutations of one `.pth`: yields (kind, path)."""
  data = open(base, 'rb').read()
  with zipfile.ZipFile(base) as zf:
    members = {n: zf.read(n) for n in zf.namelist()}
  pkl_name = next(n for n in members if n.endswith('data.pkl'))
  pkl = members[pkl_name]
  ops = list(pickletools.genops(pkl))
  starts = [pos for _, _, pos in ops] + [len(pkl)]
  records = [n for n in members if '/data/' in n]
  hostile = [-1, -2**31, 0, 1, 2, 7, 15, 16, 17, 255, 2**31 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 + 5,
             -2**63, 10**30]
  counter = [0]

  def emit(kind, members_or_bytes):
    counter[0] += 1
    path = os.path.join(out_dir, f'{os.path.basename(base)}.{counter[0]:04d}.{kind}.pth')
    if isinstance(members_or_bytes, bytes):
      with open(path, 'wb') as f:
        f.write(members_or_bytes)
    else:
      with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED) as zf:
        for n, raw in members_or_bytes.items():
          zf.writestr(n, raw)
    return kind, path

  def with_pkl(new_pkl):
    return dict(members, **{pkl_name: bytes(new_pkl)})

  def encode_int(v):
    p = torch_save._Pickler()
    p.out = bytearray()
    p._int(v)
    return bytes(p.out)

  int_ops = [i for i, (op, _, _) in enumerate(ops) if op.name in ('BININT1', 'BININT2', 'BININT', 'LONG1')]
  get_ops = [i for i, (op, _, _) in enumerate(ops) if op.name in ('BINGET', 'LONG_BINGET')]
  get_ops = get_ops or list(range(len(ops) - 1))  # torch_save.py writes no memo: references then dangle
  put_count = max(1, sum(op.name in ('BINPUT', 'LONG_BINPUT') for op, _, _ in ops))
  all_codes = [op.code.encode('latin-1') for op in pickletools.opcodes]
  for _ in range(n_each):
    b = bytearray(data)                                                 # raw byte flips anywhere
    for _ in range(rng.randint(1, 4)):
      b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    yield emit('flip', bytes(b))
    yield emit('trunc', data[:rng.randrange(len(data))])                 # file truncation
    b = bytearray(pkl)                                                  # pickle bytes, valid CRC
    for _ in range(rng.randint(1, 3)):
      at = rng.randrange(len(b))
      choice = rng.random()
      if choice < 0.5:
        b[at] = rng.randrange(256)
      elif choice < 0.75:
        del b[at]
      else:
        b.insert(at, rng.randrange(256))
    yield emit('pkl-byte', with_pkl(b))
    i = rng.choice(int_ops)                                             # ints: offsets, sizes, strides, numel
    v = rng.choice(hostile + [ops[i][1] + rng.choice([-1, 1]), ops[i][1] * 2])
    yield emit('pkl-int', with_pkl(pkl[:starts[i]] + encode_int(v) + pkl[starts[i + 1]:]))
    i = rng.choice(get_ops)                                             # memo references: type confusion
    yield emit('pkl-memo', with_pkl(pkl[:starts[i]] + b'j' + struct.pack('<I', rng.randrange(put_count))
                                    + pkl[starts[i + 1]:]))
    i = rng.randrange(len(ops) - 1)                                     # opcode byte replaced
    yield emit('pkl-op', with_pkl(pkl[:starts[i]] + rng.choice(all_codes) + pkl[starts[i] + 1:]))
    i, j = sorted(rng.sample(range(len(ops) - 1), 2))                   # instruction deleted / duplicated
    piece = pkl[starts[i]:starts[i + 1]]
    yield emit('pkl-splice', with_pkl(pkl[:starts[i]] + pkl[starts[i + 1]:] if rng.random() < 0.5
                                      else pkl[:starts[j]] + piece + pkl[starts[j]:]))
    name = rng.choice(records)                                          # storage record truncated / dropped
    m = dict(members)
    if rng.random() < 0.7:
      m[name] = m[name][:rng.randrange(len(m[name]) + 1)]
    else:
      del m[name]
    yield emit('record', m)


def _base_checkpoints(tmp_path):
  """A torch.save file (views, shared storage, _metadata, every dtype) and a torch_save.py file."""
  torch = pytest.importorskip('torch')
  g = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=g) + 100  # values far from zip header bytes read as floats
  sd = collections.OrderedDict(
      w=base, t=base.t(), v=base[2:, 1:4], row=base[3], step=base[:, ::2],
      h=torch.randn(7, generator=g).half(), bf=torch.randn(2, 3, generator=g).bfloat16(),
      i=torch.arange(1000, 1012, dtype=torch.int64).reshape(3, 4), b=torch.tensor([True, False, True]),
      u=torch.arange(200, 210, dtype=torch.uint8), empty=torch.zeros(0, 3), s=torch.tensor(4.5))
  sd._metadata = {'': {'version': 1}}  # pylint: disable=protected-access
  path_torch = str(tmp_path / 'base_torch.pth')
  torch.save({'model': sd, 'config': {'heads': [8, 8], 'name': 'x', 'nested': {'eps': 1e-6}}}, path_torch)
  rng = np.random.default_rng(0)
  path_ours = torch_save.save({
      'model': {'a': (rng.normal(size=(4, 6)) + 100).astype(np.float32), 'b': np.arange(7, dtype=np.int32) + 500,
                'c': (rng.normal(size=3) + 50).astype(ml_dtypes.bfloat16), 'd': np.zeros((2, 0), np.float32)},
      'config': [1, 2.5, 'y', None, True, {'k': (1, 2)}]}, str(tmp_path / 'base_ours.pth'))
  return [path_torch, path_ours]


def test_fuzz_mutated_checkpoints_never_crash_hang_or_overread(tmp_path):
  """8 mutation kinds x 40 rounds x 2 base checkpoints = 640 files, loaded 80 per child process."""
  bases = _base_checkpoints(tmp_path)
  for b in bases:  # the bases themselves load exactly
    assert torch_pickle.load(b)['model']
  rng = random.Random(1234)
  out_dir = tmp_path / 'mutants'
  out_dir.mkdir()
  mutants = [m for b in bases for m in _mutants(b, rng, str(out_dir), 40)]
  start = time.perf_counter()
  results = {}
  for k in range(0, len(mutants), 80):
    results.update(_run_worker([p for _, p in mutants[k:k + 80]], timeout=60))
  elapsed = time.perf_counter() - start
  counts = collections.Counter(results[p]['outcome'] for _, p in mutants)
  by_kind = collections.Counter((kind, results[p]['outcome']) for kind, p in mutants)
  print(f'\nfuzz: {len(mutants)} mutants in {elapsed:.1f} s: {dict(counts)}; {dict(sorted(by_kind.items()))}')
  bad = [results[p] for _, p in mutants if results[p]['outcome'] not in ('ok', 'error')]
  assert not bad, bad[:5]
  slow = [results[p] for _, p in mutants if results[p]['seconds'] > 5]
  assert not slow, slow[:5]
  # The mutations reach deep: some still load, and the refusals are many different checks.
  assert counts['ok'] >= 20 and counts['error'] >= 300, counts
  reasons = {results[p]['detail'].split('(')[0][:60] for _, p in mutants if results[p]['outcome'] == 'error'}
  assert len(reasons) >= 15, reasons


def test_cli_crafted_file_prints_one_line_and_exits_2(tmp_path):
  path = _crafted(tmp_path, 15, (16,), (-1,))
  out = tmp_path / 'out'
  res = subprocess.run([sys.executable, '-m', 'ovseg_jax.convert', 'official', '--src', path, '--dst', str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert res.returncode == 2, res.stderr[-2000:]
  lines = res.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: {path}: tensor ') and "'model/w'" in lines[0], lines
  assert 'Traceback' not in res.stderr and not out.exists()


# -- BERT safetensors index ----------------------------------------------------------------------------------

def _shard(path, tensors):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(tensors, str(path))


def _index(folder, weight_map):
  (folder / bert.SAFETENSORS_INDEX).write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))


def test_bert_index_reads_only_files_inside_its_folder(tmp_path, capsys):
  hf = tmp_path / 'hf'
  hf.mkdir()
  outside = tmp_path / 'secret.safetensors'
  _shard(outside, {'secret': np.ones(2, np.float32)})
  _shard(hf / 'model-1.safetensors', {'a': np.zeros(2, np.float32)})
  _shard(hf / 'model-2.safetensors', {'b': np.ones(3, np.float32)})
  _index(hf, {'a': 'model-1.safetensors', 'b': 'model-2.safetensors'})
  state, used = bert.read_hf_weights(str(hf))
  assert sorted(state) == ['a', 'b'] and used.endswith(bert.SAFETENSORS_INDEX)

  def refused(weight_map, *patterns):
    _index(hf, weight_map)
    with pytest.raises(errors.UsageError) as info:
      bert.read_hf_weights(str(hf))
    msg = str(info.value)
    assert '\n' not in msg and bert.SAFETENSORS_INDEX in msg, msg
    for pattern in patterns:
      assert pattern in msg, (pattern, msg)

  refused({'a': str(outside)}, 'no absolute path')
  refused({'a': '../secret.safetensors'}, 'no ..')
  refused({'a': 'sub/../../secret.safetensors'}, 'no ..')
  refused({'a': 7}, 'by a int')
  refused({'a': 'gone.safetensors'}, 'missing')
  os.symlink(outside, hf / 'link.safetensors')
  refused({'a': 'link.safetensors'}, 'outside', 'refusing')
  os.symlink(tmp_path, hf / 'up')
  refused({'a': 'up/secret.safetensors'}, 'outside')
  _shard(hf / 'dup.safetensors', {'a': np.ones(2, np.float32)})
  refused({'a': 'model-1.safetensors', 'x': 'dup.safetensors'}, 'in two shards')
  (hf / 'bad.safetensors').write_bytes(b'\x00' * 5)
  with pytest.raises(errors.UsageError, match='bad.safetensors is not a readable safetensors file'):
    _index(hf, {'a': 'bad.safetensors'})
    bert.read_hf_weights(str(hf))
  (hf / bert.SAFETENSORS_INDEX).write_text('{"weight_map": ')
  with pytest.raises(errors.UsageError, match='is not a safetensors index'):
    bert.read_hf_weights(str(hf))
  # Through the CLI: one line, exit 2.
  from ovseg_jax.convert import __main__ as cli  # pylint: disable=g-import-not-at-top
  (hf / 'config.json').write_text('{}')
  _index(hf, {'a': '../secret.safetensors'})
  assert cli.main(['bert', '--src', str(hf), '--dst', str(tmp_path / 'out')]) == 2
  err = capsys.readouterr().err.strip()
  assert err.count('\n') == 0 and err.startswith('error: ') and 'secret.safetensors' in err, err


def test_bert_index_in_the_hf_hub_cache_layout(tmp_path):
  """snapshots/<rev>/* are symlinks into ../../blobs: the index's own target folder is allowed."""
  blobs, snap = tmp_path / 'blobs', tmp_path / 'snapshots' / 'rev'
  blobs.mkdir()
  snap.mkdir(parents=True)
  _shard(blobs / 'sha1', {'a': np.zeros(2, np.float32)})
  (blobs / 'sha2').write_text(json.dumps({'weight_map': {'a': 'model-1.safetensors'}}))
  os.symlink('../../blobs/sha1', snap / 'model-1.safetensors')
  os.symlink('../../blobs/sha2', snap / bert.SAFETENSORS_INDEX)
  state, _ = bert.read_hf_weights(str(snap))
  assert list(state) == ['a']
