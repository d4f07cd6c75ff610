"""Reads PyTorch `.pth` files (zip format) into NumPy arrays without torch and without running pickled code.

A `.pth` written by `torch.save` is a zip: `<archive>/data.pkl` (a pickle whose tensors are persistent ids
pointing at storages) and `<archive>/data/<key>` (the raw little-endian bytes of each storage). Plain
`pickle.load` would import and call whatever globals the file names (`os.system`, ...). `_SafeUnpickler`
instead:
  * resolves a short whitelist of globals to local NumPy-building functions (tensor / parameter rebuilds,
    storage dtypes, `collections.OrderedDict`);
  * turns every other global into an inert stand-in class (`Inert`): it records the global's name, and
    calling or instantiating it only stores the arguments. Nothing is imported and nothing is executed.
So the authors' checkpoint (which pickles an OmegaConf `DictConfig`) loads with the config as an `Inert`
tree, and a malicious `os.system` REDUCE yields an inert object instead of a shell command.
"""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class Inert:
  """Stand-in for a non-whitelisted pickled global (or an instance of one). Never executes anything.

  `Inert.global_name` is the dotted name the pickle asked for; instances keep the constructor `args` and the
  pickled `state` so callers can inspect them (e.g. the OmegaConf config of the authors' checkpoint).
  """
  global_name = '?'
  args, kwargs, state = (), {}, None  # pickle's NEWOBJ creates instances without calling __init__

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self):
    return f'Inert({self.global_name})'


class _StorageType:
  """A whitelisted torch storage class (`torch.FloatStorage` ...): only carries its NumPy dtype."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): a strided view of a flat storage -> contiguous NumPy array."""
  if not isinstance(storage, np.ndarray):
    raise ValueError(f'tensor storage is {storage!r}, not a storage record of this file')
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  item = storage.dtype.itemsize
  needed = storage_offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
  if needed > storage.size:
    raise ValueError(f'tensor of size {size} / stride {stride} at offset {storage_offset} overruns its '
                     f'storage of {storage.size} elements')
  view = np.lib.stride_tricks.as_strided(storage[storage_offset:], shape=size,
                                         strides=tuple(s * item for s in stride), writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


_WHITELIST = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler for `data.pkl`: whitelisted globals -> NumPy builders, anything else -> `Inert` classes."""

  def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._zf, self._prefix, self._storages = zf, prefix, {}
    self.inert_globals: set[str] = set()

  def find_class(self, module, name):
    if (module, name) in _WHITELIST:
      return _WHITELIST[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    dotted = f'{module}.{name}'
    self.inert_globals.add(dotted)
    return type(name, (Inert,), {'global_name': dotted, '__module__': 'ovseg_jax.convert.torch_pickle'})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise ValueError(f'unsupported persistent id {pid!r} (not a torch storage record)')
    storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
    if not isinstance(storage_type, _StorageType):
      raise ValueError(f'storage record {key} has unsupported storage type {storage_type!r}')
    if key not in self._storages:
      name = f'{self._prefix}data/{key}'
      try:
        raw = self._zf.read(name)
      except KeyError:
        raise ValueError(f'storage record {name} is missing from the archive') from None
      arr = np.frombuffer(raw, dtype=storage_type.dtype.newbyteorder('<'))
      if arr.size < numel:
        raise ValueError(f'storage record {name} holds {arr.size} elements, expected {numel}')
      self._storages[key] = arr.astype(storage_type.dtype)
    return self._storages[key]


def load(path: str, return_inert_globals: bool = False):
  """Loads a zip-format `.pth`. Tensors become NumPy arrays; unknown objects become `Inert` instances.

  Args:
    path: the file written by `torch.save` (torch >= 1.6 zip format).
    return_inert_globals: also return the sorted names of every global replaced by an `Inert` stand-in.
  Raises:
    FileNotFoundError: no such file.
    ValueError: not a zip-format torch file, or a broken storage record.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file {path} does not exist')
  if not zipfile.is_zipfile(path):
    raise ValueError(f'{path} is not a zip-format torch checkpoint (legacy torch.save files are not '
                     'supported; re-save it with torch >= 1.6)')
  with zipfile.ZipFile(path) as zf:
    pkls = [n for n in zf.namelist() if n.endswith('data.pkl')]
    if len(pkls) != 1:
      raise ValueError(f'{path}: expected exactly one data.pkl record in the zip, found {len(pkls)}')
    prefix = pkls[0][:-len('data.pkl')]
    byteorder = zf.read(prefix + 'byteorder').decode().strip() if prefix + 'byteorder' in zf.namelist() \
        else 'little'
    if byteorder != 'little':
      raise ValueError(f'{path}: big-endian torch files are not supported')
    unpickler = _SafeUnpickler(zf.read(pkls[0]), zf, prefix)
    try:
      obj = unpickler.load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError) as e:
      raise ValueError(f'{path}: cannot unpickle ({type(e).__name__}: {e})') from None
  if return_inert_globals:
    return obj, sorted(unpickler.inert_globals)
  return obj


def state_dict_of(obj, path: str = '<checkpoint>') -> dict[str, np.ndarray]:
  """The flat {key: array} state dict of a loaded checkpoint: `obj['model']`, `obj['state_dict']` or `obj`."""
  if isinstance(obj, dict):
    for key in ('model', 'state_dict'):
      if key in obj and isinstance(obj[key], dict):
        obj = obj[key]
        break
  if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
    raise ValueError(f'{path} does not hold a state dict (got {type(obj).__name__})')
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def plain(obj, _depth: int = 0):
  """Turns a pickled OmegaConf tree (`Inert` DictConfig / ListConfig / value nodes) into plain dicts / lists.

  OmegaConf pickles a container as its `__dict__` state: `_content` holds a dict (DictConfig) or a list
  (ListConfig) of child nodes, a value node holds `_val`. Anything else is returned unchanged.
  """
  if _depth > 100:
    raise ValueError('config tree nested deeper than 100 levels')
  if isinstance(obj, Inert) and isinstance(obj.state, dict):
    if '_content' in obj.state:
      return plain(obj.state['_content'], _depth + 1)
    if '_val' in obj.state:
      return plain(obj.state['_val'], _depth + 1)
  if isinstance(obj, dict):
    return {k: plain(v, _depth + 1) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v, _depth + 1) for v in obj]
  return obj
