"""Bucketed text padding (ovseg_jax/text_buckets.py): the same numbers as fixed padding, one compile per bucket.

  * buckets: the ladder is cut to model.text.max_length, which is always a bucket; (T,) is fixed padding;
  * a batch is cut to the smallest bucket holding its longest text, dropping padding columns only;
  * BERT outputs at real tokens, every loss and the decoder output are those of fixed padding (deterministic
    mode: BERT dropout draws depend on the padded shape, so the noise differs, not its law);
  * text_bn_all_tokens with buckets: the token-projection BN statistics skip padding, so the running
    statistics do not depend on the bucket (the documented deviation from the authors' all-positions stats).
The compile-once-per-bucket check is in tests/test_no_recompile.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import vitb
from ovseg_jax import errors
from ovseg_jax import optim
from ovseg_jax import text_buckets
from ovseg_jax import train_step as ts
from ovseg_jax.models import bert as bert_lib
from tests import train_fixtures


def _config(buckets, **train):
  config = train_fixtures.small_config(deterministic=True, **train)
  config.unlock()
  config.data.text_buckets = tuple(buckets)
  config.lock()
  return config


def test_buckets_are_cut_to_the_ceiling():
  config = _config((4, 8, 77))
  assert text_buckets.buckets(config) == (4, 8, 16)   # max_length 16 is the ceiling
  assert text_buckets.enabled(config)
  assert text_buckets.buckets(vitb.get_config()) == (77,)   # the authors' fixed padding by default
  assert not text_buckets.enabled(vitb.get_config())
  assert [text_buckets.choose(n, (4, 8, 16)) for n in (1, 4, 5, 8, 9, 16, 30)] == [4, 4, 8, 8, 16, 16, 16]
  with pytest.raises(errors.UsageError):
    text_buckets.buckets(_config((0, 8)))


def test_attend_padding_refuses_buckets():
  config = _config((8, 16))
  config.unlock()
  config.model.decoder.attend_padding = True
  with pytest.raises(errors.UsageError, match='attend_padding'):
    text_buckets.enabled(config)


def test_cut_drops_padding_only():
  config = _config((8, 12, 16))
  batch = next(train_fixtures.batches(config))
  n = text_buckets.longest(batch)
  assert 8 < n <= 12
  cut, t = text_buckets.bucket_batch(batch, config)
  assert t == 12
  for ids, mask in text_buckets.TEXT_KEYS:
    assert cut[ids].shape == cut[mask].shape == (8, 12)
    np.testing.assert_array_equal(cut[ids], batch[ids][:, :12])
    assert not batch[mask][:, 12:].any() and not batch[ids][:, 12:].any()
    np.testing.assert_array_equal(text_buckets.pad_to(cut, 16)[ids], batch[ids])
  assert cut['image'] is batch['image']
  fixed, t = text_buckets.bucket_batch(batch, _config((77,)))
  assert t == 16 and fixed is batch


def test_bert_outputs_at_real_tokens_match_fixed_padding():
  config = _config((16,))
  m = config.model.text
  bert = bert_lib.BertModel(m)
  batch = next(train_fixtures.batches(config))
  ids, mask = batch['text_ids'], batch['text_mask']
  params = bert.init(jax.random.key(0), ids, mask, None, False)
  full, _ = bert.apply(params, ids, mask, None, False)
  n = text_buckets.longest(batch)
  cut, _ = bert.apply(params, ids[:, :n], mask[:, :n], None, False)
  real = mask[:, :n].astype(bool)
  np.testing.assert_allclose(np.asarray(cut)[real], np.asarray(full)[:, :n][real], rtol=1e-5, atol=1e-5)


def _losses(config, batch, state, model):
  fn = jax.jit(lambda p, bs, t, b: ts.forward_losses(
      p, bs, t, b, jax.random.key(3), jnp.asarray(5), config=config, model=model, total_steps=10,
      return_intermediates=True)[1])
  return jax.device_get(fn(state['params'], state['batch_stats'], state['ema'], batch))


@pytest.mark.parametrize('all_tokens', [True, False])
def test_losses_match_fixed_padding(all_tokens):
  fixed = _config((16,), text_bn_all_tokens=all_tokens)
  bucketed = _config((8, 12, 16), text_bn_all_tokens=all_tokens)
  model = ts.make_model(fixed)
  tx, _ = optim.make_optimizer(fixed.optim, total_steps=10, warmup_steps=1, global_batch=8)
  state = ts.init_state(fixed, model, tx, jax.random.key(0))
  batch = next(train_fixtures.batches(fixed))
  cut, t = text_buckets.bucket_batch(batch, bucketed)
  assert t == 12
  m_f, bs_f, i_f = _losses(fixed, batch, state, model)
  m_b, bs_b, i_b = _losses(bucketed, cut, state, model)
  for k in ('loss', 'loss_contrast', 'loss_entity', 'loss_mask', 'masked_token_frac', 'mask_dice_mean'):
    np.testing.assert_allclose(m_b[k], m_f[k], rtol=1e-5, atol=1e-6, err_msg=k)
  assert m_f['loss_entity'] > 0 and m_f['loss_mask'] > 0
  for k in ('text_x', 'question_out', 'answer_x', 'group_logits'):
    np.testing.assert_allclose(i_b[k], i_f[k], rtol=1e-4, atol=1e-5, err_msg=k)
  for k in ('img_projector', 'bridge_projector'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), bs_b[k], bs_f[k])
  text_f, text_b = bs_f['text_projector']['bn'], bs_b['text_projector']['bn']
  if not all_tokens:   # [CLS] statistics only: the same under either padding
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), text_b, text_f)
  else:
    # The authors' quirk mixes (16 - n) padding positions per text into the statistics; with buckets they
    # are real tokens only, and then the same for every bucket (here: bucketed at 16 vs cut to 12).
    assert not np.allclose(text_b['var'], text_f['var'], rtol=1e-3)
    _, bs_b16, _ = _losses(bucketed, batch, state, model)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 bs_b16['text_projector'], bs_b['text_projector'])
