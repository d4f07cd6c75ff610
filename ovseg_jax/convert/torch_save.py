"""Writes PyTorch `.pth` files (zip format) from NumPy arrays without torch: the inverse of torch_pickle.py.

`torch.save` writes a zip (uncompressed records) named after the file, e.g. `ckpt/`:
    ckpt/data.pkl            pickle (protocol 2) of the object; every tensor is a
                             `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())`
                             call whose storage is a persistent id ('storage', torch.<Type>Storage, key, 'cpu', numel)
    ckpt/.format_version     '1'
    ckpt/.storage_alignment  '64'
    ckpt/byteorder           'little'
    ckpt/data/<key>          the raw little-endian bytes of storage <key>, starting on a 64-byte boundary
    ckpt/version             '3\\n'
The pickle is emitted opcode by opcode (`_Pickler`), because the standard pickler can only name globals it can
import (torch is not a runtime dependency). Only what the globals allow-list of `torch.load(weights_only=True)`
accepts is emitted: dict, collections.OrderedDict, list, tuple, str, int, float, bool, None, and tensors, so the
files load with `weights_only=True`.
"""

import collections
import os
import struct
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_OF = {
    np.dtype(np.float32): 'FloatStorage', np.dtype(np.float64): 'DoubleStorage',
    np.dtype(np.float16): 'HalfStorage', np.dtype(ml_dtypes.bfloat16): 'BFloat16Storage',
    np.dtype(np.int64): 'LongStorage', np.dtype(np.int32): 'IntStorage', np.dtype(np.int16): 'ShortStorage',
    np.dtype(np.int8): 'CharStorage', np.dtype(np.uint8): 'ByteStorage', np.dtype(np.bool_): 'BoolStorage',
}
ALIGNMENT = 64      # torch.save aligns every storage record; torch.load(mmap=True) relies on it
_PAD_EXTRA_ID = 0x4246  # the zip extra-field id torch uses for its alignment padding ('FB')


class _Pickler:
  """Protocol-2 pickle emitter for plain containers + NumPy arrays (as torch tensors, see module doc).

  `storages` collects (key, little-endian array) in emission order; keys are '0', '1', ... Each is written
  C-contiguous, which is what the emitted row-major strides describe.
  """

  def __init__(self):
    self.out = bytearray(b'\x80\x02')  # PROTO 2
    self.storages: list[tuple[str, np.ndarray]] = []

  def _global(self, module: str, name: str):
    self.out += b'c' + module.encode() + b'\n' + name.encode() + b'\n'  # GLOBAL

  def _str(self, s: str):
    b = s.encode('utf-8')
    self.out += b'X' + struct.pack('<I', len(b)) + b  # BINUNICODE

  def _int(self, v: int):
    if 0 <= v < 256:
      self.out += b'K' + struct.pack('<B', v)  # BININT1
    elif 0 <= v < 65536:
      self.out += b'M' + struct.pack('<H', v)  # BININT2
    elif -2**31 <= v < 2**31:
      self.out += b'J' + struct.pack('<i', v)  # BININT
    else:
      b = v.to_bytes((v.bit_length() + 8) // 8, 'little', signed=True)
      self.out += b'\x8a' + struct.pack('<B', len(b)) + b  # LONG1

  def _items(self, mapping):
    if mapping:
      self.out += b'('  # MARK
      for k, v in mapping.items():
        self.dump(k)
        self.dump(v)
      self.out += b'u'  # SETITEMS

  def _tuple(self, items):
    if not items:
      self.out += b')'  # EMPTY_TUPLE
      return
    self.out += b'('
    for v in items:
      self.dump(v)
    self.out += b't'  # TUPLE

  def _ordered_dict(self, mapping):
    self._global('collections', 'OrderedDict')
    self.out += b')R'  # EMPTY_TUPLE, REDUCE: OrderedDict()
    self._items(mapping)

  def _tensor(self, arr: np.ndarray):
    arr = np.asarray(arr)
    if arr.dtype.byteorder == '>':
      arr = arr.astype(arr.dtype.newbyteorder('<'))    # records are little-endian
    if arr.dtype not in _STORAGE_OF:
      raise ValueError(f'cannot write a tensor of dtype {arr.dtype} (supported: '
                       f'{", ".join(sorted(str(d) for d in _STORAGE_OF))})')
    key = str(len(self.storages))  # (made C-contiguous only when its record is written: one copy at a time)
    self.storages.append((key, arr))
    stride = tuple(int(np.prod(arr.shape[i + 1:], dtype=np.int64)) for i in range(arr.ndim))
    self._global('torch._utils', '_rebuild_tensor_v2')
    self.out += b'('                                   # MARK: the call's argument tuple
    self.out += b'('                                   # MARK: persistent id tuple
    self._str('storage')
    self._global('torch', _STORAGE_OF[arr.dtype])
    self._str(key)
    self._str('cpu')
    self._int(arr.size)
    self.out += b'tQ'                                  # TUPLE, BINPERSID
    self._int(0)                                       # storage offset
    self._tuple(tuple(int(d) for d in arr.shape))
    self._tuple(stride)
    self.out += b'\x89'                                # requires_grad = False
    self._ordered_dict({})                             # backward hooks
    self.out += b'tR'                                  # TUPLE, REDUCE

  def dump(self, obj):
    if obj is None:
      self.out += b'N'
    elif isinstance(obj, (bool, np.bool_)):
      self.out += b'\x88' if obj else b'\x89'
    elif isinstance(obj, (int, np.integer)):
      self._int(int(obj))
    elif isinstance(obj, (float, np.floating)) and not isinstance(obj, np.ndarray):
      self.out += b'G' + struct.pack('>d', float(obj))  # BINFLOAT
    elif isinstance(obj, str):
      self._str(obj)
    elif isinstance(obj, np.ndarray):
      self._tensor(obj)
    elif isinstance(obj, collections.OrderedDict):
      self._ordered_dict(obj)
    elif isinstance(obj, dict):
      self.out += b'}'  # EMPTY_DICT
      self._items(obj)
    elif isinstance(obj, list):
      self.out += b']'  # EMPTY_LIST
      if obj:
        self.out += b'('
        for v in obj:
          self.dump(v)
        self.out += b'e'  # APPENDS
    elif isinstance(obj, tuple):
      self._tuple(obj)
    else:
      raise TypeError(f'cannot write a {type(obj).__name__} into a weights-only .pth (plain containers, str, '
                      'int, float, bool, None and NumPy arrays only)')


def _write_record(zf: zipfile.ZipFile, raw, name: str, data) -> None:
  """One uncompressed zip record whose data starts on an ALIGNMENT boundary (padding in the extra field)."""
  view = memoryview(data).cast('B')
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.file_size = view.nbytes
  header_end = raw.tell() + 30 + len(name.encode()) + 4   # local header + name + the extra field's own header
  pad = -header_end % ALIGNMENT
  info.extra = struct.pack('<HH', _PAD_EXTRA_ID, pad) + b'Z' * pad
  with zf.open(info, 'w') as f:
    f.write(view)


def save(obj, path: str) -> str:
  """Writes `obj` (plain containers, NumPy arrays as tensors) as a torch zip `.pth`. Returns the path.

  The file is written beside `path` and renamed into place, so an interrupted export leaves no partial file.
  """
  pickler = _Pickler()
  pickler.dump(obj)
  pickler.out += b'.'  # STOP
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  archive = os.path.splitext(os.path.basename(path))[0] or 'archive'
  tmp = path + '.partial'
  with open(tmp, 'wb') as raw, zipfile.ZipFile(raw, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
    _write_record(zf, raw, f'{archive}/data.pkl', bytes(pickler.out))
    _write_record(zf, raw, f'{archive}/.format_version', b'1')
    _write_record(zf, raw, f'{archive}/.storage_alignment', str(ALIGNMENT).encode())
    _write_record(zf, raw, f'{archive}/byteorder', b'little')
    for key, arr in pickler.storages:
      flat = arr.reshape(-1)  # a C-order copy only when `arr` is a transposed / strided view
      _write_record(zf, raw, f'{archive}/data/{key}', flat.view(np.uint8) if flat.size else b'')
    _write_record(zf, raw, f'{archive}/version', b'3\n')
  os.replace(tmp, path)
  return path
