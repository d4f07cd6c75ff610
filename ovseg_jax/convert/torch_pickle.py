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

A crafted or damaged file never reads memory outside its storages, never hangs and never crashes the
interpreter; it fails with one `errors.UsageError` line naming the file (and the tensor's key when known):
  * every tensor's (storage size, offset, size, stride) is checked with exact integers before any view is
    made: no negative value, every element inside the storage, no two elements on one storage slot
    (expanded / overlapping views: `torch.save` of a plain tensor never writes one);
  * storage records are CRC-checked by zipfile and must hold the bytes the pickle declares; identical views
    share one array, and distinct views together may materialise at most `_VIEW_BUDGET` times the storage
    bytes read (+ `_VIEW_SLACK`), so a small pickle cannot multiply a big storage;
  * the pickle runs on the pure-Python unpickler (no C recursion, dict-based memo) with the operations that
    call into objects restricted: only whitelisted builders and `Inert` classes are called, BUILD only sets
    `Inert` state / an OrderedDict's attributes, and a hashed tuple key may hold at most
    `_MAX_KEY_NODES` nodes (a shared tuple DAG would hash for 2**depth steps);
  * `plain` counts the nodes a config expands to, shared references included, before copying it.
"""

import collections
import io
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

from ovseg_jax import errors

_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': ml_dtypes.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}
_MAX_DIMS = 64                 # NumPy's limit
_VIEW_BUDGET = 4               # materialised bytes of all tensors <= 4 x storage bytes read + _VIEW_SLACK
_VIEW_SLACK = 64 << 20
_MAX_KEY_NODES = 1_000         # tuple nodes a hashed dict / set key may hold (counted with repeats)
_MAX_HASH_WORK = 10_000_000    # tuple nodes hashed for all keys of one file together
_MAX_INT = 1 << 63             # torch sizes, strides, offsets and element counts are int64
_MAX_INERT_GLOBALS = 10_000    # distinct non-whitelisted globals (each becomes a class)
MAX_PLAIN_NODES = 1_000_000    # nodes a config may expand to in `plain`, shared references counted each time
MAX_PLAIN_DEPTH = 100


class Inert:
  """Stand-in for a non-whitelisted pickled global (or an instance of one). Never executes anything.

  `Inert.global_name` is the dotted name the pickle asked for; instances keep the constructor `args` and the
  pickled `state` so callers can inspect them (e.g. the OmegaConf config of the authors' checkpoint), and the
  `listitems` / `dictitems` a pickle appended / set on them (e.g. a `collections.defaultdict`).
  """
  global_name = '?'
  args, kwargs, state = (), {}, None  # pickle's NEWOBJ creates instances without calling __init__
  listitems, dictitems = (), ()

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


class _Storage:
  """One storage record as a flat read-only array `[numel]` of its dtype (what a tensor may view)."""

  def __init__(self, key: str, array: np.ndarray):
    self.key, self.array = key, array

  def __repr__(self):
    return f'storage record {self.key}'


class _BadTensor:
  """What a tensor record that fails validation becomes while unpickling: `load` then raises, naming its key."""

  def __init__(self, message: str):
    self.message = message


def _short(obj) -> str:
  """A bounded description of an untrusted pickled value for error messages (never a full repr)."""
  if isinstance(obj, bool) or obj is None:
    return repr(obj)
  if isinstance(obj, int):
    return repr(obj) if obj.bit_length() <= 128 else f'an int of {obj.bit_length()} bits'
  if isinstance(obj, float):
    return repr(obj)
  if isinstance(obj, (str, bytes)):
    return repr(obj[:60]) + ('...' if len(obj) > 60 else '')
  if isinstance(obj, (Inert, _Storage)):
    return repr(obj)[:100]
  if isinstance(obj, type) and issubclass(obj, Inert):
    return f'the global {obj.global_name[:100]}'
  return f'a {type(obj).__name__}'


def _int_tuple(value, what: str) -> tuple[int, ...]:
  if not isinstance(value, (tuple, list)):
    raise ValueError(f'{what} is {_short(value)}, not a tuple of ints')
  if len(value) > _MAX_DIMS:
    raise ValueError(f'{what} has {len(value)} dims (at most {_MAX_DIMS})')
  for v in value:
    if type(v) is not int:  # pylint: disable=unidiomatic-typecheck  (bool and floats are not sizes)
      raise ValueError(f'{what} holds {_short(v)}, not an int')
    if not 0 <= v < _MAX_INT:
      raise ValueError(f'{what} {_dims(value)} holds {_short(v)}, outside [0, 2**63)')
  return tuple(value)


def _dims(value) -> str:
  return '(' + ', '.join(_short(v) for v in value) + (',)' if len(value) == 1 else ')')


def _check_view(storage: _Storage, storage_offset, size, stride) -> int:
  """Validates a strided view of `storage` with exact Python integers; returns its element count.

  Refuses (ValueError): a storage that is not a record of this file, a non-int or negative offset / size /
  stride, a rank mismatch, any element index outside [0, storage numel), and overlapping elements (stride 0
  on a dim of size > 1 included). Non-overlap is checked the way views of one contiguous tensor nest: sorted
  by stride, each dim of size > 1 must step past everything the smaller-stride dims reach.
  """
  if not isinstance(storage, _Storage):
    raise ValueError(f'tensor storage is {_short(storage)}, not a storage record of this file')
  if type(storage_offset) is not int or not 0 <= storage_offset < _MAX_INT:  # pylint: disable=unidiomatic-typecheck
    raise ValueError(f'storage offset {_short(storage_offset)} is not an int in [0, 2**63)')
  size, stride = _int_tuple(size, 'size'), _int_tuple(stride, 'stride')
  if len(size) != len(stride):
    raise ValueError(f'size {size} and stride {stride} have different lengths')
  n_storage = storage.array.size
  where = f'size {size} / stride {stride} at offset {storage_offset} in {storage!r} of {n_storage} elements'
  numel = 1
  for n in size:
    numel *= n
  if numel == 0:  # reads nothing, but NumPy must still be able to allocate the empty shape
    extent = 1
    for n in size:
      extent *= max(n, 1)
    if storage_offset > n_storage or extent > 1 << 40:
      raise ValueError(f'empty tensor of {where} is out of range')
    return 0
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= n_storage or storage_offset >= n_storage:
    raise ValueError(f'tensor of {where} reads element {last}, outside its storage')
  reach = 0
  for s, n in sorted((s, n) for n, s in zip(size, stride) if n > 1):
    if s <= reach:
      raise ValueError(f'tensor of {where} has overlapping elements (stride 0 or an overlapping / expanded '
                       'view; save t.contiguous() instead)')
    reach += (n - 1) * s
  return numel


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  """torch._utils._rebuild_tensor(_v2): a strided view of a flat storage -> a new contiguous NumPy array.

  The view is validated first (`_check_view`); only then is it taken, so it stays inside the storage.
  """
  numel = _check_view(storage, storage_offset, size, stride)
  flat = storage.array
  if numel == 0:
    return np.zeros(tuple(size), flat.dtype)
  size, stride = tuple(size), tuple(stride)
  step, contiguous = 1, True
  for n, s in reversed(list(zip(size, stride))):
    contiguous &= n == 1 or s == step
    step *= n
  if contiguous:
    return flat[storage_offset:storage_offset + numel].reshape(size).copy()
  item = flat.dtype.itemsize  # size-1 dims get stride 0: their (arbitrary) stride is never stepped
  strides = tuple(s * item if n > 1 else 0 for n, s in zip(size, stride))
  view = np.lib.stride_tricks.as_strided(flat[storage_offset:], shape=size, strides=strides, writeable=False)
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *unused):
  return data


_TENSOR_BUILDERS = (_rebuild_tensor,)
_WHITELIST = {
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('collections', 'OrderedDict'): collections.OrderedDict,
}
_CALLABLE = frozenset(id(f) for f in _WHITELIST.values())


def _key_cost(key) -> int:
  """Tuple nodes hashing `key` walks (0 unless a tuple); refuses more than _MAX_KEY_NODES (shared DAGs)."""
  if type(key) is not tuple:  # pylint: disable=unidiomatic-typecheck
    return 0
  todo, seen = [key], 0
  while todo:
    node = todo.pop()
    seen += 1
    if seen > _MAX_KEY_NODES:
      raise pickle.UnpicklingError(f'a dict or set key is a tuple of more than {_MAX_KEY_NODES:,} nested '
                                   'tuples (counting shared ones each time)')
    todo.extend(v for v in node if type(v) is tuple)  # pylint: disable=unidiomatic-typecheck
  return seen


class _SafeUnpickler(pickle._Unpickler):  # pylint: disable=protected-access
  """Unpickler for `data.pkl`: whitelisted globals -> NumPy builders, anything else -> `Inert` classes.

  Pure-Python base (no C recursion, dict memo); every opcode that calls into an object is restricted (module
  doc). Bad tensor records become `_BadTensor` markers (`self.bad`) so `load` can name their key.
  """

  dispatch = dict(pickle._Unpickler.dispatch)  # pylint: disable=protected-access

  def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str):
    super().__init__(io.BytesIO(data))
    self._zf, self._prefix = zf, prefix
    self._raw: dict[str, bytes] = {}          # storage key -> record bytes
    self._storages: dict[tuple, _Storage] = {}  # (key, dtype, numel) -> typed storage
    self._views: dict[tuple, np.ndarray] = {}   # one array per distinct view (tied weights share it, as in torch)
    self._storage_bytes = self._view_bytes = 0
    self._inert_classes: dict[str, type] = {}
    self._key_costs: dict[int, tuple] = {}      # id(tuple key) -> (key, cost); holding the key pins its id
    self._hash_work = 0
    self.inert_globals: set[str] = set()
    self.bad: list[_BadTensor] = []

  # -- globals and storages --------------------------------------------------------------------------------

  def find_class(self, module, name):
    if (module, name) in _WHITELIST:
      return _WHITELIST[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    dotted = f'{module}.{name}'
    if dotted not in self._inert_classes:
      if len(self._inert_classes) >= _MAX_INERT_GLOBALS:
        raise pickle.UnpicklingError(f'more than {_MAX_INERT_GLOBALS:,} distinct globals')
      try:
        cls = type(name, (Inert,), {'global_name': dotted, '__module__': __name__})
      except (TypeError, ValueError):  # a name type() refuses (e.g. with a NUL)
        cls = type('Inert', (Inert,), {'global_name': dotted, '__module__': __name__})
      self._inert_classes[dotted] = cls
    self.inert_globals.add(dotted)
    return self._inert_classes[dotted]

  def persistent_load(self, pid):
    """A storage record -> `_Storage`; a bad one -> a `_BadTensor` marker, so the error can name the key."""
    try:
      return self._storage(pid)
    except errors.UsageError as e:
      self.bad.append(_BadTensor(str(e)))
      return self.bad[-1]

  def _storage(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'):
      raise errors.UsageError(f'unsupported persistent id {_short(pid)} (not a torch storage record)')
    storage_type, key, numel = pid[1], pid[2], pid[4]
    if not isinstance(key, str):
      raise errors.UsageError(f'storage record key is {_short(key)}, not a string')
    name = f'{self._prefix}data/{key}'
    if not isinstance(storage_type, _StorageType):
      raise errors.UsageError(f'storage record {name} has unsupported storage type {_short(storage_type)}')
    if type(numel) is not int or not 0 <= numel < _MAX_INT:  # pylint: disable=unidiomatic-typecheck
      raise errors.UsageError(f'storage record {name} declares {_short(numel)} elements')
    dtype = storage_type.dtype
    cache_key = (key, dtype, numel)
    if cache_key not in self._storages:
      raw = self._read_record(key, numel * dtype.itemsize)
      if dtype == np.bool_:  # bytes other than 0 / 1 are not valid NumPy bools
        array = np.frombuffer(raw, np.uint8, count=numel) != 0
      else:
        array = np.frombuffer(raw, dtype.newbyteorder('<'), count=numel).astype(dtype, copy=False)
      array.flags.writeable = False
      self._storages[cache_key] = _Storage(name, array)
    return self._storages[cache_key]

  def _read_record(self, key: str, nbytes: int) -> bytes:
    name = f'{self._prefix}data/{key}'
    if key not in self._raw:
      try:
        info = self._zf.getinfo(name)
      except KeyError:
        raise errors.UsageError(f'storage record {name} is missing from the archive') from None
      if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise errors.UsageError(f'storage record {name} uses zip compression method {info.compress_type} '
                                '(torch writes stored or deflated records)')
      if info.file_size < nbytes:
        raise errors.UsageError(f'storage record {name} holds {info.file_size} bytes, the pickle declares '
                                f'{nbytes} (truncated record?)')
      try:
        self._raw[key] = self._zf.read(name)  # the whole record, so zipfile checks its CRC
      except (zipfile.BadZipFile, EOFError, OSError, NotImplementedError, RuntimeError, ValueError) as e:
        raise errors.UsageError(f'storage record {name} is damaged ({_first_line(e)})') from None
      self._storage_bytes += len(self._raw[key])
    raw = self._raw[key]
    if len(raw) < nbytes:
      raise errors.UsageError(f'storage record {name} holds {len(raw)} bytes, the pickle declares {nbytes} '
                              '(truncated record?)')
    return raw

  def _check_key(self, key):
    """Bounds the hashing work of every dict / set key: each insertion hashes a tuple key again."""
    if type(key) is not tuple:  # pylint: disable=unidiomatic-typecheck
      return
    if id(key) not in self._key_costs:
      self._key_costs[id(key)] = (key, _key_cost(key))
    self._hash_work += self._key_costs[id(key)][1]
    if self._hash_work > _MAX_HASH_WORK:
      raise pickle.UnpicklingError(f'hashing the tuple keys would walk more than {_MAX_HASH_WORK:,} nodes')

  # -- calls: only whitelisted builders and Inert classes ----------------------------------------------------

  def _call(self, func, args, kwargs=None):
    if not isinstance(args, tuple):
      raise pickle.UnpicklingError(f'call arguments are {_short(args)}, not a tuple')
    if isinstance(func, type) and issubclass(func, Inert):
      return func(*args, **(kwargs or {}))
    if id(func) not in _CALLABLE or kwargs:
      raise pickle.UnpicklingError(f'cannot call {_short(func)}')
    if func is collections.OrderedDict:
      return self._ordered_dict(*args)
    if func in _TENSOR_BUILDERS:
      return self._tensor(args)
    return func(*args)

  def _ordered_dict(self, *args):
    if len(args) > 1:
      raise pickle.UnpicklingError(f'OrderedDict() takes at most 1 argument, got {len(args)}')
    items = list(args[0].items()) if args and isinstance(args[0], dict) else list(args[0]) if args else []
    for pair in items:
      if not (isinstance(pair, tuple) and len(pair) == 2):
        raise pickle.UnpicklingError('OrderedDict() items must be (key, value) pairs')
      self._check_key(pair[0])
    return collections.OrderedDict(items)

  def _tensor(self, args):
    """A tensor record -> one array per distinct view, within the materialisation budget, or a marker."""
    if args and isinstance(args[0], _BadTensor):  # its storage record was refused: the marker names why
      return args[0]
    try:
      if len(args) < 4:
        raise ValueError(f'tensor record has {len(args)} arguments, expected at least 4')
      storage, offset, size, stride = args[:4]
      numel = _check_view(storage, offset, size, stride)
      view_key = (id(storage), offset, tuple(size), tuple(stride))
      if view_key in self._views:
        return self._views[view_key]
      self._view_bytes += numel * storage.array.dtype.itemsize
      if self._view_bytes > _VIEW_BUDGET * self._storage_bytes + _VIEW_SLACK:
        raise ValueError(f'the tensors materialise {self._view_bytes:,} bytes from {self._storage_bytes:,} '
                         f'bytes of storage (more than {_VIEW_BUDGET}x: repeated views)')
      array = self._views[view_key] = _rebuild_tensor(storage, offset, size, stride)
      return array
    except ValueError as e:
      self.bad.append(_BadTensor(str(e)))
      return self.bad[-1]

  def _instantiate(self, klass, args):  # INST / OBJ opcodes
    self.append(self._call(klass, tuple(args)))

  def load_reduce(self):
    args = self.stack.pop()
    self.stack[-1] = self._call(self.stack[-1], args)

  def load_newobj(self):
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, {}))

  def load_newobj_ex(self):
    kwargs = self.stack.pop()
    args = self.stack.pop()
    cls = self.stack.pop()
    self.append(self._new(cls, args, kwargs))

  def _new(self, cls, args, kwargs):
    if isinstance(cls, type) and issubclass(cls, Inert) and isinstance(args, tuple) and isinstance(kwargs, dict):
      obj = cls.__new__(cls)
      obj.args, obj.kwargs = args, kwargs
      return obj
    if cls is collections.OrderedDict and not args and not kwargs:
      return collections.OrderedDict()
    raise pickle.UnpicklingError(f'cannot create an instance of {_short(cls)}')

  # -- container updates: restricted to real containers (Inert ones record the items) ------------------------

  def load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if isinstance(inst, Inert):
      inst.__setstate__(state)
      return
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
      state, slots = state
    if not (isinstance(inst, collections.OrderedDict) and isinstance(state, (dict, type(None)))
            and slots is None and all(isinstance(k, str) for k in (state or {}))):
      raise pickle.UnpicklingError(f'BUILD on {_short(inst)} with {_short(state)} is not allowed')
    inst.__dict__.update(state or {})  # torch's state_dict `_metadata`

  def load_append(self):
    value = self.stack.pop()
    self._extend(self.stack[-1], [value])

  def load_appends(self):
    items = self.pop_mark()
    self._extend(self.stack[-1], items)

  def _extend(self, target, items):
    if isinstance(target, Inert):
      if 'listitems' not in vars(target):
        target.listitems = []
      target.listitems.extend(items)
    elif type(target) is list:  # pylint: disable=unidiomatic-typecheck
      target.extend(items)
    else:
      raise pickle.UnpicklingError(f'cannot append to {_short(target)}')

  def load_setitem(self):
    value = self.stack.pop()
    key = self.stack.pop()
    self._set_items(self.stack[-1], [key, value])

  def load_setitems(self):
    items = self.pop_mark()
    self._set_items(self.stack[-1], items)

  def _set_items(self, target, items):
    pairs = list(zip(items[::2], items[1::2]))
    if isinstance(target, Inert):
      if 'dictitems' not in vars(target):
        target.dictitems = []
      target.dictitems.extend(pairs)
      return
    if not isinstance(target, dict):
      raise pickle.UnpicklingError(f'cannot set items on {_short(target)}')
    for k, v in pairs:
      self._check_key(k)
      target[k] = v

  def load_dict(self):
    items = self.pop_mark()
    d = {}
    self._set_items(d, items)
    self.append(d)

  def load_additems(self):
    items = self.pop_mark()
    target = self.stack[-1]
    if type(target) is not set:  # pylint: disable=unidiomatic-typecheck
      raise pickle.UnpicklingError(f'cannot add items to {_short(target)}')
    for item in items:
      self._check_key(item)
    target.update(items)

  def load_frozenset(self):
    items = self.pop_mark()
    for item in items:
      self._check_key(item)
    self.append(frozenset(items))

  def load_unused(self):  # protocol-5 buffers: torch never writes them; BYTEARRAY8 allocates before reading
    raise pickle.UnpicklingError('protocol-5 buffer opcodes are not used by torch.save')


for _op, _fn in ((pickle.REDUCE, _SafeUnpickler.load_reduce), (pickle.NEWOBJ, _SafeUnpickler.load_newobj),
                 (pickle.NEWOBJ_EX, _SafeUnpickler.load_newobj_ex), (pickle.BUILD, _SafeUnpickler.load_build),
                 (pickle.APPEND, _SafeUnpickler.load_append), (pickle.APPENDS, _SafeUnpickler.load_appends),
                 (pickle.SETITEM, _SafeUnpickler.load_setitem), (pickle.SETITEMS, _SafeUnpickler.load_setitems),
                 (pickle.DICT, _SafeUnpickler.load_dict), (pickle.ADDITEMS, _SafeUnpickler.load_additems),
                 (pickle.FROZENSET, _SafeUnpickler.load_frozenset), (pickle.BYTEARRAY8, _SafeUnpickler.load_unused),
                 (pickle.NEXT_BUFFER, _SafeUnpickler.load_unused),
                 (pickle.READONLY_BUFFER, _SafeUnpickler.load_unused)):
  _SafeUnpickler.dispatch[_op[0]] = _fn


def _first_line(e: BaseException, limit: int = 200) -> str:
  text = str(e).strip().splitlines()
  text = text[0] if text else type(e).__name__
  return text if len(text) <= limit else text[:limit] + '...'


def _line(msg: str, limit: int = 1000) -> str:
  """One printable line: names from the file (keys, records) may hold newlines or control characters."""
  msg = ''.join(c if c.isprintable() else repr(c)[1:-1] for c in msg)
  return msg if len(msg) <= limit else msg[:limit] + '...'


def _path_to(root, target) -> str | None:
  """The key path (`model/img_encoder.pos_embed`) of `target` inside the loaded object, or None (iterative)."""
  todo, seen = [(root, None)], set()
  while todo:
    obj, path = todo.pop()
    if obj is target:
      labels = []
      while path is not None:
        path, label = path
        labels.append(label)
      return '/'.join(reversed(labels)) or '<root>'
    if id(obj) in seen:
      continue
    seen.add(id(obj))
    if isinstance(obj, dict):
      children = [(k[:80] if isinstance(k, str) else f'<{type(k).__name__} key>', v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
      children = [(f'[{i}]', v) for i, v in enumerate(obj)]
    elif isinstance(obj, Inert):
      children = [('args', obj.args), ('kwargs', obj.kwargs), ('state', obj.state),
                  ('listitems', list(obj.listitems)), ('dictitems', list(obj.dictitems))]
    else:
      continue
    todo.extend((child, (path, label)) for label, child in reversed(children))
  return None


def _refuse_unreadable(path: str):
  """A file zipfile cannot open: say whether it is a damaged zip, a legacy torch file, or something else."""
  with open(path, 'rb') as f:
    head = f.read(4)
  if not head:
    raise errors.UsageError(f'{path} is empty (an interrupted download or save?)')
  if head.startswith(b'PK'):
    raise errors.UsageError(f'{path} is a damaged zip (truncated or corrupt: its zip directory is unreadable); '
                            're-download or re-save it')
  if head[:1] == b'\x80':
    raise errors.UsageError(f'{path} is not a zip-format torch checkpoint (legacy torch.save files are not '
                            'supported; re-save it with torch >= 1.6)')
  raise errors.UsageError(f'{path} is not a torch checkpoint (neither a zip-format nor a legacy .pth file)')


def load(path: str, return_inert_globals: bool = False):
  """Loads a zip-format `.pth`. Tensors become NumPy arrays; unknown objects become `Inert` instances.

  Args:
    path: the file written by `torch.save` (torch >= 1.6 zip format).
    return_inert_globals: also return the sorted names of every global replaced by an `Inert` stand-in.
  Raises:
    FileNotFoundError: no such file.
    errors.UsageError (a ValueError): a folder, a damaged or crafted file, a broken storage or tensor record;
      one line naming the file (and the tensor's key when known).
  """
  if os.path.isdir(path):
    raise errors.UsageError(f'{path} is a folder; expected a .pth checkpoint file')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint file {path} does not exist')
  try:
    if not zipfile.is_zipfile(path):
      _refuse_unreadable(path)
    with zipfile.ZipFile(path) as zf:
      names = zf.namelist()
      pkls = [n for n in names if n.endswith('data.pkl')]
      if len(pkls) != 1:
        raise errors.UsageError(f'expected exactly one data.pkl record in the zip, found {len(pkls)}')
      prefix = pkls[0][:-len('data.pkl')]
      if prefix + 'byteorder' in names:
        with zf.open(prefix + 'byteorder') as f:
          byteorder = f.read(16).decode('ascii', 'replace').strip()
        if byteorder != 'little':
          raise errors.UsageError(f'byteorder {byteorder[:16]!r}: only little-endian torch files are supported')
      unpickler = _SafeUnpickler(zf.read(pkls[0]), zf, prefix)
      try:
        obj = unpickler.load()
      except errors.UsageError:
        raise
      except MemoryError:
        raise errors.UsageError('data.pkl needs more memory than this machine has') from None
      except Exception as e:  # pylint: disable=broad-except  (any failure of untrusted data is the file's)
        detail = f'{type(e).__name__}: {_first_line(e)}' if str(e).strip() else type(e).__name__
        raise errors.UsageError(f'data.pkl is damaged or not a torch pickle ({detail})') from None
  except errors.UsageError as e:
    raise errors.UsageError(_line(str(e) if str(e).startswith(path) else f'{path}: {e}')) from None
  except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError, ValueError) as e:
    raise errors.UsageError(_line(f'{path}: damaged checkpoint ({_first_line(e)}); re-download or re-save it')) \
        from None
  except OSError as e:
    raise errors.UsageError(f'{path}: cannot read ({_first_line(e)})') from None
  except MemoryError:
    raise errors.UsageError(f'{path}: needs more memory than this machine has') from None
  if unpickler.bad:
    key = _path_to(obj, unpickler.bad[0])
    where = f'tensor {key!r}' if key else 'a tensor record'
    raise errors.UsageError(_line(f'{path}: {where}: {unpickler.bad[0].message}'))
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
    raise errors.UsageError(f'{path} does not hold a state dict (got {type(obj).__name__})')
  return {k: v for k, v in obj.items() if isinstance(v, np.ndarray)}


def _node(obj):
  """One OmegaConf node -> ('wrap', inner) for a DictConfig / ListConfig / value node, ('dict', items),
  ('list', values) or ('leaf', value)."""
  if isinstance(obj, Inert) and isinstance(obj.state, dict):
    if '_content' in obj.state:
      return 'wrap', obj.state['_content']
    if '_val' in obj.state:
      return 'wrap', obj.state['_val']
  if isinstance(obj, dict):
    return 'dict', list(obj.items())
  if isinstance(obj, (list, tuple)):
    return 'list', list(obj)
  return 'leaf', obj


def plain(obj, where: str = 'config'):
  """Turns a pickled OmegaConf tree (`Inert` DictConfig / ListConfig / value nodes) into plain dicts / lists.

  OmegaConf pickles a container as its `__dict__` state: `_content` holds a dict (DictConfig) or a list
  (ListConfig) of child nodes, a value node holds `_val`. Anything else is returned unchanged. The result is a
  tree: a node shared n times is copied n times, so the expanded node count is checked first (memoised by
  object id) against MAX_PLAIN_NODES, and the depth against MAX_PLAIN_DEPTH (cycles end there).
  Raises errors.UsageError naming `where`.
  """
  sizes = {}

  def size(o, depth):
    if depth > MAX_PLAIN_DEPTH:
      raise errors.UsageError(f'{where} is nested deeper than {MAX_PLAIN_DEPTH} levels (or is cyclic)')
    if id(o) not in sizes:
      kind, inner = _node(o)
      if kind == 'wrap':
        total = size(inner, depth + 1)
      else:
        total = 1
        for child in inner if kind != 'leaf' else ():
          total += size(child[1] if kind == 'dict' else child, depth + 1)
          if total > MAX_PLAIN_NODES:
            raise errors.UsageError(f'{where} expands to more than {MAX_PLAIN_NODES:,} nodes (shared '
                                    'references counted each time); refusing to copy it')
      sizes[id(o)] = total
    return sizes[id(o)]

  def copy(o):
    kind, inner = _node(o)
    if kind == 'wrap':
      return copy(inner)
    if kind == 'dict':
      return {k: copy(v) for k, v in inner}
    if kind == 'list':
      return [copy(v) for v in inner]
    return inner

  size(obj, 0)
  return copy(obj)
