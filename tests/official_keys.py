"""Reads official_checkpoint_keys.txt: every key, shape and dtype of the authors' model at ViT-B/BERT-base sizes.

The file sits beside the golden_small folder (tests/conftest.py); OVSEG_OFFICIAL_KEYS names another path.
"""

import os
import re

KEYS_FILE = 'official_checkpoint_keys.txt'


def keys_path(golden_dir: str) -> str:
  """OVSEG_OFFICIAL_KEYS, else official_checkpoint_keys.txt in golden_dir's parent folder."""
  return os.environ.get('OVSEG_OFFICIAL_KEYS', os.path.join(os.path.dirname(golden_dir), KEYS_FILE))


def read_official_keys(golden_dir: str) -> list:
  """[(key, shape tuple, dtype str)] in file order."""
  out = []
  path = keys_path(golden_dir)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no {KEYS_FILE} at {path}: set OVSEG_OFFICIAL_KEYS to it (it sits beside '
                            'golden_small, see OVSEG_GOLDEN_DIR)')
  with open(path) as f:
    for line in f:
      if line.startswith('#') or not line.strip():
        continue
      key, shape, dtype = line.rstrip('\n').split('\t')
      out.append((key, tuple(int(d) for d in re.findall(r'\d+', shape)), dtype))
  return out
