"""File access for local and remote (gs://, s3://, ...) paths: the one way the trainer, checkpoint.py (every
JSON file of every on-disk format) and the sweep summary touch files outside Orbax.

Built on `etils.epath` (an Orbax dependency). Local paths use the os backend (builtin open, os.makedirs), so a
local run behaves exactly as with the builtins. Remote paths use TensorFlow's gfile when TensorFlow is installed,
else fsspec, which needs the filesystem package of the scheme (gs:// -> gcsfs); Orbax's CheckpointManager also
imports google-cloud-storage for gs:// (gcsfs depends on it). Neither is in requirements.txt (gcsfs brings
grpcio, cryptography and the google-cloud stack; launch/tpu_pod.sh installs it on the workers): a missing one is
reported as a `RemoteBackendError` (a UsageError), one line naming the package to install, before anything is
written.

  fileio.makedirs(workdir)
  with fileio.open(fileio.join(workdir, 'config.json'), 'w') as f: ...
  if fileio.isdir(fileio.join(path, 'teacher')): ...

Object stores have no append: `write_text` rewrites a whole file (see train_monitor.MetricWriter for metrics.jsonl).
"""

import builtins
import functools
import importlib.util
import os

from ovseg_jax import errors

# The fsspec filesystem package each remote scheme needs when epath runs without TensorFlow.
FSSPEC_PACKAGES = {'gs': 'gcsfs', 's3': 's3fs', 'az': 'adlfs', 'hf': 'huggingface_hub'}


class RemoteBackendError(errors.UsageError):
  """A remote path whose filesystem package is not installed (one line, names the package)."""


def is_remote(path) -> bool:
  return '://' in os.fspath(path)


def _scheme(path: str) -> str:
  return os.fspath(path).split('://', 1)[0]


@functools.cache
def _tf_backend_available() -> bool:
  if os.environ.get('EPATH_USE_TF', '').lower() in ('false', 'no', 'f', '0'):
    return False
  return importlib.util.find_spec('tensorflow') is not None


@functools.cache
def _package_available(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:   # a dotted name whose parent package is missing
    return False


def check_backend(path) -> None:
  """Raises RemoteBackendError when `path` is remote and no filesystem backend can serve it."""
  path = os.fspath(path)
  if not is_remote(path):
    return
  scheme = _scheme(path)
  if scheme not in FSSPEC_PACKAGES:
    raise RemoteBackendError(f'{path}: unsupported scheme {scheme}:// (supported: '
                             f'{", ".join(s + "://" for s in FSSPEC_PACKAGES)} and local paths)')
  package = FSSPEC_PACKAGES[scheme]
  if not _tf_backend_available() and not _package_available(package):
    raise RemoteBackendError(f'{path}: {scheme}:// paths need the {package} package (pip install {package})')
  if scheme == 'gs' and not _package_available('google.cloud.storage'):   # Orbax's own gs:// bucket checks
    raise RemoteBackendError(f'{path}: gs:// checkpoints need google-cloud-storage '
                             '(pip install gcsfs, which brings it, or pip install google-cloud-storage)')


def path(p):
  """-> etils.epath.Path of `p` (after check_backend)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  check_backend(p)
  return epath.Path(p)


def join(base, *parts: str) -> str:
  base = os.fspath(base)
  if is_remote(base):
    return '/'.join([base.rstrip('/'), *(p.strip('/') for p in parts)])
  return os.path.join(base, *parts)


def abspath(p) -> str:
  """Absolute local path; a remote path unchanged."""
  p = os.fspath(p)
  return p if is_remote(p) else os.path.abspath(p)


def basename(p) -> str:
  return os.fspath(p).rstrip('/').rsplit('/', 1)[-1]


def open(p, mode: str = 'r'):  # pylint: disable=redefined-builtin
  if not is_remote(p):
    return builtins.open(p, mode)
  return path(p).open(mode)


def exists(p) -> bool:
  return path(p).exists()


def isdir(p) -> bool:
  return path(p).is_dir()


def isfile(p) -> bool:
  return path(p).is_file()


def makedirs(p) -> None:
  path(p).mkdir(parents=True, exist_ok=True)


def listdir(p) -> list[str]:
  """Sorted entry names of folder `p`."""
  return sorted(c.name for c in path(p).iterdir())


def read_text(p) -> str:
  with open(p, 'r') as f:
    return f.read()


def write_text(p, text: str) -> None:
  with open(p, 'w') as f:
    f.write(text)


def copy(src, dst) -> None:
  """Copies file `src` to `dst` (any backends), overwriting."""
  with open(src, 'rb') as fin, open(dst, 'wb') as fout:
    fout.write(fin.read())
