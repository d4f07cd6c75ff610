"""The embedded default: a tiny OVSegmentor that trains on the built-in synthetic caption dataset on a CPU.

  python -m ovseg_jax.train --config=configs/tiny.py --workdir=runs/tiny
  python -m ovseg_jax.train --config=configs/tiny.py:ablation=contrast ...   # paper Table 3 rows

Variants: ablation=all|contrast|entity|mask (which paper losses are on), binding=official|paper|slot,
grounding=patch|none (patch-level grounding on top of the paper's losses, or the paper's losses alone), steps=N.
The model is trained from scratch (no DINO/BERT download is possible offline), single run with the mask loss
switched on for the last quarter (the paper's single-run schedule). Two choices are not the authors' and exist
for the from-scratch CPU budget: a small conv stem in front of the patch projection, and random RGB channel
permutation of the training images (bench/RESULTS.md "End to end"). A third is on by default: patch-level
grounding with a background prompt (docs/paper_vs_authors.md Q34), without which the groups collapse and the
held-out mIoU is about 18 (bench/RESULTS.md "Patch-level grounding").
"""

from configs import common

_ABLATIONS = {  # (entity loss on, mask loss on): paper Table 3
    'contrast': (False, False),
    'entity': (True, False),
    'mask': (False, True),
    'all': (True, True),
}


def get_config(arg=None):
  arg = common.parse_arg(arg, ablation='all', binding='official', grounding='patch', steps=1500)
  c = common.base_config()
  c.model = common.model_config(
      width=128, depth=4, heads=4, text_width=128, text_layers=2, text_heads=4, text_intermediate=512,
      proj_hidden=256, proj_out=128, num_group_tokens=32, num_output_groups=8, patch_size=8, img_size=64)
  c.model.vision.drop_path_rate = 0.0
  # Two conv 3x3/2 layers before the 2x2 patch projection (vit.PatchEmbed; not in the paper): the group-level
  # accuracy of a 1 500-step run rose from 0.23 to 0.61 with it (bench/RESULTS.md, "End to end").
  c.model.vision.stem_channels = (32, 64)
  c.model.text.dropout = 0.0
  c.model.text.max_length = 24
  c.train.text_bn_all_tokens = False  # BN stats on the [CLS] embeddings inference uses (README: quirks)
  common.apply_binding_mode(c, arg.binding)

  if arg.ablation not in _ABLATIONS:
    raise ValueError(f'ablation={arg.ablation!r}: expected one of {sorted(_ABLATIONS)}')
  entity_on, mask_on = _ABLATIONS[arg.ablation]
  c.recipe = 'paper_single'
  c.stage = 2 if mask_on else 1
  c.loss.entity_weight = 1.0 if entity_on else 0.0
  c.loss.mask_weight = 0.1 if mask_on else 0.0
  if arg.grounding not in ('patch', 'none'):
    raise ValueError(f"grounding={arg.grounding!r}: expected 'patch' or 'none'")
  if arg.grounding == 'patch':
    # Not in the paper (docs/paper_vs_authors.md Q34): patches classified against the entity and background
    # prompts from the caption's entities, each group trained towards its own patches' classes, and the
    # background read from its prompt at inference. mIoU 25.81 -> 52.37 on the selection split, each at its
    # chosen scale (bench/RESULTS.md "Patch-level grounding").
    c.model.patch_head = True
    c.loss.patch_ground_weight = 1.0
    c.eval.background = 'prompt'
    # The background prompt wins groups that hold part of a thin object (triangles, stars): its cosine is
    # lowered by 0.25 before Eq. 1's softmax. Chosen on the selection split, mean of the three main-command
    # seeds: 48.20 at 0, 51.07 at 0.2, 51.55 at 0.25, 50.93 at 0.3 (bench/RESULTS.md "Background margin").
    c.eval.bg_prompt_margin = 0.25

  c.data.dataset = 'synthetic_captions'
  c.data.data_dir = 'runs/data'
  c.data.image_size = 64
  c.data.crop_scale = (0.6, 1.0)
  c.data.deit_aug = False
  # The held-out split pairs classes with colours never seen with them in training: permuting RGB takes hue
  # away as a shortcut (data/augment.shuffle_channels; not in the authors' recipe).
  c.data.channel_shuffle = True
  c.data.entity_mode = 'fixed'
  c.data.num_workers = 0

  c.optim.base_lr = 1e-3
  c.optim.warmup_lr = 1e-5
  c.optim.min_lr = 1e-5
  c.optim.lr_scale_batch = 0           # 0: no batch scaling of the lr
  c.optim.warmup_epochs = 0.0
  c.train.global_batch_size = 32
  c.train.total_steps = arg.steps
  c.train.log_every_steps = 25
  c.train.checkpoint_every_steps = 200
  c.train.keep_checkpoints = 2

  # Evaluate at the scale the objects have in training: the random crops of 60-100 % of the area enlarge them
  # by up to 1.29x before the 64 px resize. Chosen on a selection split that no table reports
  # (bench/RESULTS.md "Patch-level grounding"): with patch grounding 52.37 mIoU at 80 px against 52.34 at 72
  # and 46.14 at 64 (the same order for its top_k=8 variant); the paper's losses alone score best at 64.
  c.eval.short_side = 80 if arg.grounding == 'patch' else 64
  c.eval.window = 64
  c.eval.stride = 32
  c.eval.window_batch = 8
  # Zero-shot mIoU on the held-out synthetic split that launch/local.sh builds (RUN/val) every 250 steps
  # (bench/RESULTS.md "Evaluation during training": its cost). That split is the one local.sh reports, so
  # the run only watches it: keep_best stays False (selecting on it would be selection on the test split).
  c.eval_during_training.every_steps = 250
  c.eval_during_training.dataset = 'folder'
  c.eval_during_training.data_dir = 'runs/local/val'
  c.lock()
  return c
