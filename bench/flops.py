"""Analytic matmul FLOP count of OVSegmentor (maxtext-style MFU numerator), per image, from `config.model`.

    python -m bench.flops [--config configs/vitb.py] [--batch 8] [--tokens 16]

Counts 2 * M * N * K for every dense layer, conv-as-matmul and attention product (QK^T, AV) of one image
(one example: image + its captions), and nothing else (no softmax / LayerNorm / GELU / optimizer), i.e. the
"model FLOPs" of the MFU definition. A train step is

  stage 1: online visual fwd+bwd (3x fwd, minus the patch-embed input gradient), BERT fwd+bwd on caption,
           question and answer (3 calls), decoder fwd+bwd, projectors fwd+bwd;
  stage 2: as stage 1 but the text encoder is frozen (forward only), plus the EMA teacher forward on the
           cross image and a fourth BERT forward (cross entity), plus the mask logits and matching.

Backward = 2x forward for every layer whose weights get a gradient (dW and dX), 1x (dX only) where only the
input gradient is needed, 0 where nothing upstream is trainable (frozen BERT in stage 2: its inputs are token
ids). BN statistics of `text_projector(tokens)` (official: every caption token goes through the projector)
only need the hidden layer in the forward; its output layer is dead and XLA removes it.
"""

import importlib
import json
import sys

from absl import flags

from ovseg_jax import cli


def dense(m: int, k: int, n: int) -> float:
  return 2.0 * m * k * n


def vit_block(tokens: int, width: int, mlp_ratio: float = 4.0) -> float:
  """Pre-norm block on `tokens` tokens: qkv, attention (QK^T + AV), proj, fc1, fc2."""
  hidden = int(width * mlp_ratio)
  return (dense(tokens, width, 3 * width) + 2 * dense(tokens, width, tokens) + dense(tokens, width, width)
          + dense(tokens, width, hidden) + dense(tokens, hidden, width))


def cross_attn_block(nq: int, nk: int, width: int, mlp_ratio: float = 4.0) -> float:
  """Post-norm cross-attention block: q/k/v/proj, attention, MLP on the nq queries."""
  hidden = int(width * mlp_ratio)
  return (dense(nq, width, width) + 2 * dense(nk, width, width) + 2 * dense(nq, width, nk)
          + dense(nq, width, width) + dense(nq, width, hidden) + dense(nq, hidden, width))


def visual_forward(mc, img_size: int | None = None) -> dict:
  """Per-image forward FLOPs of the VisualEncoder, by part."""
  v, b = mc.vision, mc.binding
  size = img_size or v.img_size
  patches = (size // v.patch_size) ** 2
  c = v.width
  k_in, k_out = b.num_group_tokens, b.num_output_groups
  parts = {}
  parts['patch_embed'] = dense(patches, 3 * v.patch_size ** 2, c)
  parts['stage1_blocks'] = v.depths[0] * vit_block(patches + k_in, c, v.mlp_ratio)
  bind = 0.0
  if k_in != k_out:  # token-mixing MLP over the K axis, per channel
    hid = int(b.token_mlp_ratio * c)
    bind += dense(c, k_in, hid) + dense(c, hid, k_out)
  bind += cross_attn_block(k_out, patches, c, v.mlp_ratio)
  # AssignAttention: q/k/v, the [K, L] logits, the weighted sum, proj; then mlp_channels.
  bind += (dense(k_out, c, c) + 2 * dense(patches, c, c) + 2 * dense(k_out, c, patches) + dense(k_out, c, c)
           + dense(k_out, c, int(v.mlp_ratio * c)) + dense(k_out, int(v.mlp_ratio * c), c))
  parts['binding'] = bind
  parts['stage2_blocks'] = v.depths[1] * vit_block(k_out, c, v.mlp_ratio)
  parts['total'] = sum(parts.values())
  parts['patches'] = patches
  return parts


def bert_forward(mc, tokens: int | None = None) -> float:
  """One caption of `tokens` positions (default max_length) through BERT."""
  t = mc.text
  n = tokens or t.max_length
  layer = (dense(n, t.width, 3 * t.width) + 2 * dense(n, t.width, n) + dense(n, t.width, t.width)
           + dense(n, t.width, t.intermediate) + dense(n, t.intermediate, t.width))
  return t.num_layers * layer


def projector(mc, rows: int, in_width: int, hidden_only: bool = False) -> float:
  out = dense(rows, in_width, mc.proj.hidden)
  if not hidden_only:
    out += dense(rows, mc.proj.hidden, mc.proj.out)
  return out


def decoder_forward(mc, tokens: int | None = None) -> float:
  t = tokens or mc.text.max_length
  c = mc.vision.width
  k = mc.binding.num_output_groups
  return cross_attn_block(t, k, c, mc.decoder.mlp_ratio) + vit_block(t, c, mc.decoder.mlp_ratio)


def train_step_per_image(config, stage: int | None = None, tokens: int | None = None) -> dict:
  """Model FLOPs of one training example (fwd + bwd), by part; `stage` defaults to config.stage, `tokens`
  (the padded text length, e.g. a data.text_buckets bucket) to model.text.max_length."""
  mc = config.model
  stage = config.stage if stage is None else stage
  c, tw, t = mc.vision.width, mc.text.width, tokens or mc.text.max_length
  k = mc.binding.num_output_groups
  vis = visual_forward(mc)
  # Online visual: 3x forward, but the patch embed needs no input gradient (2x).
  out = {'visual_online': 3 * vis['total'] - vis['patch_embed']}
  bert = bert_forward(mc, t)
  text_mult = 3.0 if stage == 1 else 1.0         # BERT trained in stage 1, frozen in stage 2
  text_calls = 3                                  # caption, question, answer
  out['text_encoder'] = text_calls * text_mult * bert
  # Projectors (trainable, fwd+bwd 3x): img pooled + K groups, text [CLS], bridge; the token-level
  # projector calls only need the hidden layer's forward (BN statistics).
  proj = projector(mc, 1 + k, c) + projector(mc, 1, tw) + projector(mc, 1, c)
  out['projectors'] = 3 * proj + text_calls * projector(mc, t, tw, hidden_only=True)
  out['decoder'] = 3 * decoder_forward(mc, t)
  if stage == 2:
    out['teacher_forward'] = vis['total'] + projector(mc, 1 + k, c, hidden_only=True)
    out['cross_entity_text'] = bert + projector(mc, t, tw, hidden_only=True) + projector(mc, 1, tw)
    l = vis['patches']
    # mask logits online (fwd + dq bwd) and teacher, [K, C] x [C, L]; the group logits [K, P] . [P]
    out['mask_logits'] = 2 * dense(k, c, l) + dense(k, c, l) + dense(k, mc.proj.out, 1)
  out['total'] = sum(out.values())
  return out


def inference_window(mc, window: int = 448, num_classes: int = 21) -> float:
  """Forward FLOPs of one window: visual encoder at `window` px, img projector, Eq. 1 class scores."""
  k = mc.binding.num_output_groups
  return (visual_forward(mc, window)['total'] + projector(mc, 1 + k, mc.vision.width)
          + dense(1 + k, mc.proj.out, num_classes))


@cli.entry_point
def main(argv=None):
  fv = flags.FlagValues()
  flags.DEFINE_string('config', 'configs/vitb.py', 'configs/X.py[:variant]', flag_values=fv)
  flags.DEFINE_integer('batch', 1, 'images per step', flag_values=fv)
  flags.DEFINE_integer('tokens', 0, 'padded text length (0: model.text.max_length)', flag_values=fv)
  args = cli.parse(fv, argv, prog='python -m bench.flops', doc=__doc__)
  mod = importlib.import_module(args.config.replace('/', '.').removesuffix('.py'))
  out = {}
  for stage in (1, 2):
    cfg = mod.get_config(f'stage={stage}')
    parts = train_step_per_image(cfg, tokens=args.tokens or None)
    out[f'stage{stage}_train_gflop_per_image'] = {k: round(v / 1e9, 2) for k, v in parts.items()}
  out['inference_window448_gflop'] = round(inference_window(mod.get_config().model) / 1e9, 2)
  print(json.dumps(out, indent=1))


if __name__ == '__main__':
  sys.exit(main())
