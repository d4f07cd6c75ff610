"""The tokenizer equals transformers' BertTokenizerFast and the ids the authors' pipeline produced."""

import os

import numpy as np
import pytest

from ovseg_jax import tokenizer as tok_lib

TEXTS = ['Ça va? Héllo WORLD naïve café', 'x ' * 100, '', 'hello\tworld 中文 test', "don't stop-believing!!",
         'A photo of a [MASK] and [MASK].']


def test_matches_transformers_bert_tokenizer_fast():
  from transformers import BertTokenizerFast
  tok = tok_lib.get_tokenizer(max_length=77)
  hf = BertTokenizerFast(vocab_file=os.path.join(tok_lib.default_vocab_dir(), 'vocab.txt'))
  for padding in ('max_length', 'longest'):
    ref = hf(TEXTS, padding=padding, truncation=True, max_length=77)
    ids, mask = tok(TEXTS, padding=padding)
    np.testing.assert_array_equal(ids, np.asarray(ref['input_ids']))
    np.testing.assert_array_equal(mask, np.asarray(ref['attention_mask']))
  assert ids[0, 0] == tok_lib.CLS_ID and tok.mask_id == 103
  assert (tok(['a [MASK] b'])[0] == tok_lib.MASK_ID).sum() == 1


def test_matches_golden_ids(golden_dir):
  tok = tok_lib.get_tokenizer(max_length=77)
  g = np.load(os.path.join(golden_dir, 'train_golden.npz'))
  for name in ('train_text', 'train_question', 'train_answer', 'train_cross_entity'):
    ids, mask = tok(list(g[f'{name}_strings']))
    np.testing.assert_array_equal(ids, g[f'{name}_ids'])
    np.testing.assert_array_equal(mask, g[f'{name}_mask'])
  e = np.load(os.path.join(golden_dir, 'golden.npz'))
  ids, _ = tok(list(e['seg_prompts']), padding='longest')
  np.testing.assert_array_equal(ids, e['seg_text_ids'])


def test_rejects_non_text():
  with pytest.raises(TypeError, match='expected text'):
    tok_lib.get_tokenizer()([None])
  with pytest.raises(ValueError, match='padding'):
    tok_lib.get_tokenizer()(['a'], padding='bogus')
