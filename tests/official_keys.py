"""Reads ../shared/reference/official_checkpoint_keys.txt (every key, shape and dtype of the authors' model)."""

import os
import re

KEYS_FILE = 'official_checkpoint_keys.txt'


def read_official_keys(golden_dir: str) -> list:
  """[(key, shape tuple, dtype str)] in file order; golden_dir is reference/golden_small beside the file."""
  out = []
  with open(os.path.join(os.path.dirname(golden_dir), KEYS_FILE)) as f:
    for line in f:
      if line.startswith('#') or not line.strip():
        continue
      key, shape, dtype = line.rstrip('\n').split('\t')
      out.append((key, tuple(int(d) for d in re.findall(r'\d+', shape)), dtype))
  return out
