"""Eval-mode parity with the authors' model: `convert official` on golden_small/official_ckpt.pth, then our
OVSegmentor reproduces golden.npz (produced by their PyTorch code; README in golden_small).

Golden arrays are NCHW / [B, 1, K, L]; they are transposed here, at the test boundary.
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import vitb
from ovseg_jax import checkpoint
from ovseg_jax.convert import __main__ as convert_main
from ovseg_jax.convert import official
from ovseg_jax.models import visual
from ovseg_jax.models import vit
from ovseg_jax.models.ovsegmentor import OVSegmentor

TOL = 1e-4  # abs, or relative for values > 1


def _worst(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape, (ours.shape, ref.shape)
  return float(np.max(np.abs(ours - ref) / np.maximum(1.0, np.abs(ref))))


@pytest.fixture(scope='module')
def converted(golden_dir):
  return official.load_official(os.path.join(golden_dir, 'official_ckpt.pth'), vitb.get_config().model)


@pytest.fixture(scope='module')
def golden(golden_dir):
  return dict(np.load(os.path.join(golden_dir, 'golden.npz')))


def _fns(model_config):
  model = OVSegmentor(ml_collections.FrozenConfigDict(model_config))
  enc_img = jax.jit(lambda v, x: model.apply(v, x, False, method=OVSegmentor.encode_image))
  enc_txt = jax.jit(lambda v, i, m: model.apply(v, i, m, False, True, method=OVSegmentor.encode_text))
  dec = jax.jit(lambda v, a, q, m: model.apply(v, a, q, m, False, method=OVSegmentor.decode_entity))
  return enc_img, enc_txt, dec


@pytest.fixture(scope='module')
def ours(converted, golden):
  model_config, variables, _, _ = converted
  enc_img, enc_txt, dec = _fns(model_config)
  out = {}
  for res in ('224', '448'):
    o = enc_img(variables, golden[f'img{res}'].transpose(0, 2, 3, 1))
    for k in ('image_x', 'image_feat', 'image_x_before_proj', 'image_feat_before_proj', 'soft', 'hard', 'q', 'k',
              'assign_query', 'assign_key'):
      out[f'enc{res}_{k}'] = np.asarray(o[k])
  t = enc_txt(variables, golden['text_ids'], golden['text_mask'])
  for k in ('text_x', 'text_x_before_proj', 'text_feat_before_proj', 'text_feat_after_proj'):
    out[k] = np.asarray(t[k])
  q = enc_txt(variables, golden['mec_question_ids'], golden['mec_question_mask'])['text_feat_before_proj']
  out['mec_question_feat'] = np.asarray(q)
  visual = out['enc224_image_feat_before_proj'][golden['mec_visual_index']]
  d = dec(variables, visual, q, golden['mec_question_mask'])
  out['mec_decoder_tokens'], out['mec_answer_vec'] = np.asarray(d['tokens']), np.asarray(d['answer_vec'])
  out['mec_question_out'] = np.asarray(d['question_out'])
  out['mec_answer_x'] = np.asarray(enc_txt(variables, golden['mec_answer_ids'], golden['mec_answer_mask'])['text_x'])
  return out


_IMAGE_KEYS = [f'enc{r}_{k}' for r in ('224', '448') for k in (
    'image_x', 'image_feat', 'image_x_before_proj', 'image_feat_before_proj', 'soft', 'hard', 'q', 'k',
    'assign_query', 'assign_key')]
_TEXT_KEYS = ['text_x', 'text_x_before_proj', 'text_feat_before_proj', 'text_feat_after_proj', 'mec_question_feat',
              'mec_decoder_tokens', 'mec_answer_vec', 'mec_question_out', 'mec_answer_x']


def test_converted_config_matches_the_golden_model(converted):
  model_config, _, teacher, stored = converted
  assert model_config.vision.width == 64 and tuple(model_config.vision.depths) == (6, 6)
  assert model_config.vision.num_heads == 8  # head dim 8, from the stored config
  assert (model_config.binding.num_group_tokens, model_config.binding.num_output_groups) == (64, 8)
  assert (model_config.text.width, model_config.text.num_layers, model_config.text.num_heads) == (64, 2, 4)
  assert model_config.decoder.attend_padding  # the authors' decoder ignores the padding mask
  assert stored['bert_config']['num_attention_heads'] == 4
  assert teacher is not None


def test_logit_scale_and_bn_stats(converted):
  model_config, variables, _, _ = converted
  model = OVSegmentor(ml_collections.FrozenConfigDict(model_config))
  scale = model.apply(variables, method=OVSegmentor.logit_scale_exp)
  np.testing.assert_allclose(float(scale), 90.0, rtol=1e-5)  # golden README: log(90)
  for head in ('img_projector', 'text_projector', 'bridge_projector'):
    assert variables['batch_stats'][head]['bn']['var'].shape == (4096,)


@pytest.mark.parametrize('key', _IMAGE_KEYS + _TEXT_KEYS)
def test_golden_parity(ours, golden, key):
  ref = golden[key]
  if ref.ndim == 4:  # [B, heads=1, K, L] / [B, 1, K, D]
    ref = ref[:, 0]
  worst = _worst(ours[key], ref)
  print(f'{key}: worst diff {worst:.2e}')
  assert worst < TOL, f'{key}: worst diff {worst:.2e}'


def test_hard_assignment_identical(ours, golden):
  for res in ('224', '448'):
    np.testing.assert_array_equal(ours[f'enc{res}_hard'].argmax(1), golden[f'enc{res}_hard'][:, 0].argmax(1))


def test_other_shape_and_batch_consistency(converted):
  """A 320x256 input, batch 3: each row equals the same image run alone; grid 20x16; pos-embed resize equals
  torch's bicubic; soft maps sum to 1 over groups."""
  torch = pytest.importorskip('torch')
  model_config, variables, _, _ = converted
  enc_img, _, _ = _fns(model_config)
  images = np.random.default_rng(3).normal(size=(3, 320, 256, 3)).astype(np.float32)
  batch = enc_img(variables, images)
  assert batch['grid'] == (20, 16) and batch['soft'].shape == (3, 8, 320)
  np.testing.assert_allclose(np.asarray(batch['soft']).sum(1), 1.0, atol=1e-5)
  one = enc_img(variables, images[1:2])
  for k in ('image_x', 'image_feat', 'soft', 'k'):
    worst = _worst(batch[k][1:2], one[k])
    assert worst < 1e-5, (k, worst)
  pos = np.asarray(variables['params']['img_encoder']['pos_embed'])
  ref = torch.nn.functional.interpolate(torch.from_numpy(pos.reshape(1, 14, 14, 64)).permute(0, 3, 1, 2),
                                        size=(20, 16), mode='bicubic', align_corners=False)
  ref = ref.permute(0, 2, 3, 1).reshape(320, 64).numpy()
  assert _worst(vit.resize_pos_embed(pos, (20, 16)), ref) < 1e-5


def test_cli_writes_an_inference_checkpoint(golden_dir, golden, ours, tmp_path):
  dst = str(tmp_path / 'ckpt')
  assert convert_main.main(['official', '--src', os.path.join(golden_dir, 'official_ckpt.pth'), '--dst', dst]) == 0
  model_config, variables = checkpoint.load_inference(dst)
  enc_img, _, _ = _fns(model_config)
  out = enc_img(variables, golden['img224'].transpose(0, 2, 3, 1))
  assert _worst(out['image_x'], ours['enc224_image_x']) < 1e-6
  assert os.path.isdir(os.path.join(dst, 'teacher'))


def test_bfloat16_compute_runs_close(converted, golden):
  model_config, variables, _, _ = converted
  mc = ml_collections.ConfigDict(model_config.to_dict())
  mc.dtype = 'bfloat16'
  enc_img, _, _ = _fns(mc)
  out = enc_img(variables, golden['img224'].transpose(0, 2, 3, 1))
  ref = golden['enc224_image_feat_before_proj']
  assert out['image_feat_before_proj'].dtype == np.dtype('bfloat16')
  cos = np.sum(np.asarray(out['image_feat_before_proj'], np.float32) * ref, -1) / (
      np.linalg.norm(np.asarray(out['image_feat_before_proj'], np.float32), axis=-1) * np.linalg.norm(ref, axis=-1))
  assert cos.min() > 0.95, cos.min()
  assert jax.tree.leaves(variables['params'])[0].dtype == np.float32



def test_train_mode_forward_matches_train_golden(converted, golden_dir):
  """Deterministic train mode (no Gumbel noise, no drop-path; BN on batch statistics over B*L positions)
  reproduces the forward values of train_golden.npz, including the EMA teacher imported from
  img_encoder_momentum.* (the mask logits q' k'^T / sqrt(C) of the cross image)."""
  tg = dict(np.load(os.path.join(golden_dir, 'train_golden.npz')))
  model_config, variables, teacher, _ = converted
  model = OVSegmentor(ml_collections.FrozenConfigDict(model_config))
  rngs = {'dropout': jax.random.PRNGKey(0), 'gumbel': jax.random.PRNGKey(1)}

  @jax.jit
  def forward(v, t):
    app = lambda *a, **k: model.apply(v, *a, rngs=rngs, mutable=['batch_stats'], **k)[0]  # noqa: E731
    img = app(tg['train_image'].transpose(0, 2, 3, 1), True, True, method=OVSegmentor.encode_image)
    txt = app(tg['train_text_ids'], tg['train_text_mask'], True, True, method=OVSegmentor.encode_text)
    q = app(tg['train_question_ids'], tg['train_question_mask'], True, True,
            method=OVSegmentor.encode_text)['text_feat_before_proj']
    dec = app(img['image_feat_before_proj'], q, None, True, method=OVSegmentor.decode_entity)
    ans = app(tg['train_answer_ids'], tg['train_answer_mask'], True, True, method=OVSegmentor.encode_text)
    enc = visual.VisualEncoder(ml_collections.FrozenConfigDict(model_config))
    cross = enc.apply({'params': t}, tg['train_cross_image'].transpose(0, 2, 3, 1), True, True)
    scale = model_config.vision.width ** -0.5
    return dict(train_image_x=img['image_x'], train_text_x=txt['text_x'], train_question_out=dec['question_out'],
                train_answer_x=ans['text_x'],
                train_mask_teacher=jnp.einsum('bkc,blc->bkl', cross['q'], cross['k']) * scale,
                train_mask_online=jnp.einsum('bkc,blc->bkl', img['q'], cross['k']) * scale)

  out = forward(variables, teacher)
  for key, value in out.items():
    worst = _worst(value, tg[key])
    print(f'{key}: worst diff {worst:.2e}')
    assert worst < TOL, (key, worst)


def test_decoder_padding_mask(converted, golden):
  """attend_padding=False: padded question positions cannot change the answer vector; True (the authors'
  quirk, used for the golden run) lets them."""
  model_config, variables, _, _ = converted
  q = np.random.default_rng(0).normal(size=(2, 10, 64)).astype(np.float32)
  mask = np.array([[1] * 6 + [0] * 4, [1] * 10], np.int32)
  visual_in = golden['enc224_image_feat_before_proj']
  q2 = q.copy()
  q2[0, 6:] = np.random.default_rng(1).normal(size=(4, 64))  # a shift alone would vanish in LN_tokens
  for attend, changes in ((False, False), (True, True)):
    mc = ml_collections.ConfigDict(model_config.to_dict())
    mc.decoder.attend_padding = attend
    _, _, dec = _fns(mc)
    a = np.asarray(dec(variables, visual_in, q, mask)['answer_vec'])
    b = np.asarray(dec(variables, visual_in, q2, mask)['answer_vec'])
    assert (np.abs(a[0] - b[0]).max() > 1e-3) == changes
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
