"""Child process of the `.pth` reader fuzz test (tests/test_pth_safety.py): loads files, reports outcomes.

    python -m tests.pth_fuzz_worker FILE...

Prints one JSON line per file, flushed before the next load starts (so the parent knows which file a crash or
a hang happened on): {"file", "outcome", "seconds", "detail"}. Outcomes:
  ok        loaded, and every element of every array is an element of one storage record of the file
  error     refused with one line (errors.UsageError / ValueError / FileNotFoundError) naming the file
  bad       anything else: a multi-line or anonymous message, another exception type, or an array holding
            values from no single storage record (bytes from outside its storage)
Only NumPy and the reader are imported (no jax, no torch).
"""

import json
import sys
import time
import zipfile

import numpy as np

from ovseg_jax.convert import torch_pickle


def _arrays(obj, limit=1_000_000):
  """Every ndarray reachable from a loaded object (iterative, each object once)."""
  todo, seen, out = [obj], set(), []
  while todo and len(seen) < limit:
    o = todo.pop()
    if id(o) in seen:
      continue
    seen.add(id(o))
    if isinstance(o, np.ndarray):
      out.append(o)
    elif isinstance(o, dict):
      todo.extend(o.keys())
      todo.extend(o.values())
    elif isinstance(o, (list, tuple, set, frozenset)):
      todo.extend(o)
    elif isinstance(o, torch_pickle.Inert):
      todo.extend([o.args, o.kwargs, o.state, list(o.listitems), list(o.dictitems)])
  return out


def _records(path):
  """The bytes of every readable storage record (`*/data/*`) of the zip."""
  out = []
  try:
    with zipfile.ZipFile(path) as zf:
      for name in zf.namelist():
        if '/data/' in name:
          try:
            out.append(zf.read(name))
          except Exception:  # pylint: disable=broad-except
            pass
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def _within_one_record(arr, records) -> bool:
  if arr.size == 0 or arr.dtype == np.bool_:  # bools are rebuilt as `bytes != 0`: any byte is legal
    return True
  item = arr.dtype.itemsize
  raw = np.ascontiguousarray(arr).tobytes()
  elems = {raw[i:i + item] for i in range(0, len(raw), item)}
  for rec in records:
    allowed = {rec[i:i + item] for i in range(0, len(rec) - item + 1, item)}
    if elems <= allowed:
      return True
  return False


def check(path: str) -> tuple[str, str]:
  try:
    obj = torch_pickle.load(path)
    if isinstance(obj, dict):  # the config conversion of `convert official`
      torch_pickle.plain(obj.get('config'), f'{path}: config')
  except (ValueError, FileNotFoundError) as e:
    msg = str(e)
    if '\n' in msg or path not in msg:
      return 'bad', f'{type(e).__name__} not one line naming the file: {msg[:300]!r}'
    return 'error', msg[len(path):][:200]
  except BaseException as e:  # pylint: disable=broad-except
    return 'bad', f'{type(e).__name__}: {str(e)[:300]}'
  records = _records(path)
  for arr in _arrays(obj):
    if not _within_one_record(arr, records):
      return 'bad', f'array {arr.shape} {arr.dtype} holds values from no single storage record'
  return 'ok', ''


def main(paths):
  for path in paths:
    start = time.perf_counter()
    outcome, detail = check(path)
    print(json.dumps({'file': path, 'outcome': outcome, 'seconds': time.perf_counter() - start,
                      'detail': detail}), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
