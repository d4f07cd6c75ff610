"""Bucketed text padding: every text of a global batch padded to the smallest bucket that holds its longest.

  lengths = text_buckets.buckets(config)                 # e.g. (16, 24, 32, 48, 64, 77); (77,) = fixed
  batch, t = text_buckets.bucket_batch(host_batch, config)   # text arrays [b, T] -> [b, t], t in lengths

The pipeline tokenises to `model.text.max_length` (T, the ceiling); the trainer cuts each batch's four texts
(caption, masked question, answer, cross-image entity prompt) to one length t: the smallest bucket >= the
longest of them in the *global* batch. Tokens are a prefix of each row (mask 1 ... 1 0 ... 0), so the cut
drops padding only, and the numbers at real tokens are those of fixed padding (BERT and the decoder mask
padding; tests/test_text_buckets.py). Each bucket is one shape, so the step compiles once per bucket.

Agreement across hosts: a host holds only its rows of the global batch, and the texts (answer template,
replaced bad records) come out of per-example random draws and decodes, so a host cannot cheaply recompute
the other rows' lengths. Each host measures its own rows and one tiny all-gather of an int
(`multihost_utils.process_allgather`) gives every host the same global maximum, hence the same bucket. One
process: no collective.

`config.data.text_buckets` (ints): the ladder; the ceiling T is always a bucket and larger entries are cut to
it. `(T,)` (the default, e.g. (77,)) is the authors' fixed `padding='max_length'`: nothing is cut and nothing
changes. With buckets, the BN statistics of the token projection (`train.text_bn_all_tokens`) use real tokens
only (docs/paper_vs_authors.md Q7), since the number of padding positions would otherwise depend on the bucket.
"""

import jax
import numpy as np

from ovseg_jax import errors

TEXT_KEYS = (('text_ids', 'text_mask'), ('question_ids', 'question_mask'), ('answer_ids', 'answer_mask'),
             ('cross_entity_ids', 'cross_entity_mask'))
LADDER = (16, 24, 32, 48, 64, 77)   # the default ladder of the opt-in configs (data/build_report.py too)


def buckets(config) -> tuple[int, ...]:
  """The ascending bucket lengths of `config`: data.text_buckets cut to model.text.max_length, plus it."""
  ceiling = int(config.model.text.max_length)
  raw = tuple(config.data.text_buckets) or (ceiling,)
  if any(int(b) != b or int(b) < 1 for b in raw):
    raise errors.UsageError(f'--config.data.text_buckets={raw}: expected positive token counts')
  return tuple(sorted({min(int(b), ceiling) for b in raw} | {ceiling}))


def enabled(config) -> bool:
  """True when a batch may be padded to less than model.text.max_length."""
  on = len(buckets(config)) > 1
  if on and config.model.decoder.attend_padding:
    raise errors.UsageError('--config.data.text_buckets with model.decoder.attend_padding=True: the decoder '
                            'would attend to a bucket-dependent number of padding tokens; use buckets '
                            f'({config.model.text.max_length},) or attend_padding=False')
  return on


def longest(batch: dict) -> int:
  """The longest text (tokens incl. [CLS]/[SEP]) among the four texts of these rows."""
  return max(int(np.max(np.sum(np.asarray(batch[m]) != 0, axis=1), initial=0)) for _, m in TEXT_KEYS
             if m in batch)


def global_longest(batch: dict) -> int:
  """`longest` over the rows of every host (one int all-gathered; the same answer on every host)."""
  n = longest(batch)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    n = int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int32))))
  return n


def choose(length: int, lengths) -> int:
  """The smallest bucket >= length (the largest when none is: the tokenizer already cut to it)."""
  return next((b for b in lengths if b >= length), lengths[-1])


def pad_to(batch: dict, t: int) -> dict:
  """The text arrays of `batch` cut (or zero-padded) to t columns; other arrays as they are."""
  out = dict(batch)
  for pair in TEXT_KEYS:
    for k in pair:
      if k in out:
        x = np.asarray(out[k])
        out[k] = x[:, :t] if x.shape[1] >= t else np.pad(x, ((0, 0), (0, t - x.shape[1])))
  return out


def bucket_batch(batch: dict, config) -> tuple[dict, int]:
  """A host batch -> (the batch with its texts at the global batch's bucket, that bucket length)."""
  lengths = buckets(config)
  if len(lengths) == 1:
    return batch, lengths[0]
  t = choose(global_longest(batch), lengths)
  return pad_to(batch, t), t
