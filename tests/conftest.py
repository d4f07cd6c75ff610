"""Test session setup: 8 fake CPU devices (every sharding claim is tested on them), float32 matmuls."""

import os
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

SHARED = os.path.join(os.path.dirname(ROOT), 'shared')
GOLDEN = os.path.join(SHARED, 'reference', 'golden_small')


@pytest.fixture(scope='session')
def golden_dir():
  if not os.path.isdir(GOLDEN):
    raise FileNotFoundError(f'expected the golden reference at {GOLDEN} (../shared beside the repo)')
  return GOLDEN
