"""Test session setup: 8 fake CPU devices (every sharding claim is tested on them), float32 matmuls."""

import os
import pathlib
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')

# The golden reference (outputs of the authors' PyTorch code) is kept outside the repository, in the
# workspace folder beside it, because of its size; OVSEG_GOLDEN_DIR points elsewhere.
DEFAULT_GOLDEN = str(pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'reference' / 'golden_small')
GOLDEN = os.environ.get('OVSEG_GOLDEN_DIR', DEFAULT_GOLDEN)


@pytest.fixture(scope='session')
def golden_dir():
  if not os.path.isdir(GOLDEN):
    raise FileNotFoundError(f'no golden reference at {GOLDEN}: set OVSEG_GOLDEN_DIR to the golden_small folder')
  return GOLDEN
