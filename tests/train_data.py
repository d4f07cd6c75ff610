"""A fake in-memory training batch source for tests and benchmarks (`train.train(..., make_batches=)`;
the trainer itself always reads data/pipeline.py). Benchmarks import it as `from tests import train_data`.

Produces the DEVELOPERS.md batch dict (per host, b = global_batch / process_count examples) from seeded random
images and templated captions, tokenised with the project tokenizer:
    image, cross_image        [b, H, W, 3] float32, N(0, 1) (already "normalised")
    text_ids / text_mask      "a photo of a red dog on the grass ."          [b, T] int32
    question_ids / _mask      the caption with the entity word -> [MASK]
    answer_ids / _mask        "a photo of a dog ."
    cross_entity_ids / _mask  "A photo of dog"
Batch i of process p is a pure function of (seed, i, p), so the iterator state is just {'index': i} and a
resumed run sees exactly the batches a straight run sees.
"""

import numpy as np

from ovseg_jax.tokenizer import MASK_TOKEN

_NOUNS = ('dog', 'cat', 'car', 'tree', 'horse', 'boat', 'bird', 'person', 'chair', 'bus', 'cow', 'sheep')
_ADJS = ('red', 'small', 'big', 'old', 'white', 'dark', 'happy', 'wet')
_PLACES = ('grass', 'street', 'beach', 'table', 'road', 'snow', 'field', 'water')


class InMemoryBatches:
  """Iterator of batch dicts with a JSON-able, restorable state ({'index': next batch index})."""

  def __init__(self, config, tokenizer, *, process_index: int = 0, process_count: int = 1,
               start_state: dict | None = None, num_examples: int = 4096):
    if config.train.global_batch_size % process_count:
      raise ValueError(f'global batch {config.train.global_batch_size} is not divisible by {process_count} '
                       'processes')
    self.batch = config.train.global_batch_size // process_count
    self.size = config.data.image_size
    self.max_length = config.model.text.max_length
    self.seed = config.data.shuffle_seed
    self.process_index = process_index
    self.tokenizer = tokenizer
    self.num_examples = num_examples
    self.index = int((start_state or {}).get('index', 0))

  def get_state(self) -> dict:
    return {'index': self.index}

  def set_state(self, state: dict) -> None:
    self.index = int(state['index'])

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = make_batch(self.tokenizer, self.batch, self.size, self.max_length,
                       seed=(self.seed, self.index, self.process_index))
    self.index += 1
    return batch


def make_batch(tokenizer, b: int, size: int, max_length: int, seed) -> dict:
  """One batch of b examples (see module docstring); `seed` is anything np.random.default_rng takes."""
  rng = np.random.default_rng(seed)
  nouns = rng.choice(_NOUNS, b)
  adjs = rng.choice(_ADJS, b)
  places = rng.choice(_PLACES, b)
  captions = [f'a photo of a {a} {n} on the {p}.' for a, n, p in zip(adjs, nouns, places)]
  questions = [f'a photo of a {a} {MASK_TOKEN} on the {p}.' for a, p in zip(adjs, places)]
  answers = [f'a photo of a {n}.' for n in nouns]
  entities = [f'A photo of {n}' for n in nouns]
  out = {
      'image': rng.standard_normal((b, size, size, 3), dtype=np.float32),
      'cross_image': rng.standard_normal((b, size, size, 3), dtype=np.float32),
  }
  for key, texts in (('text', captions), ('question', questions), ('answer', answers),
                     ('cross_entity', entities)):
    ids, mask = tokenizer(texts, max_length=max_length)
    out[f'{key}_ids'], out[f'{key}_mask'] = ids, mask
  return out


def in_memory_batches(config, tokenizer, **kwargs) -> InMemoryBatches:
  """The in-memory source (tests, benchmarks). kwargs: process_index, process_count, start_state."""
  return InMemoryBatches(config, tokenizer, **kwargs)
