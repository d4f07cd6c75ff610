"""Shared defaults for every OVSegmentor config: the authors' recipe (official code behaviour).

Every default lives here or in the per-model config files, never scattered through the code; the one
exception is `c.eval`, built from ovseg_jax/eval_config.py, which inference needs without a config. Configs are
returned locked (`lock()`), so a misspelt override such as `--config.optim.lr=1` fails with the list of
valid keys instead of being silently ignored.

Paper-vs-code choices (see README "Paper vs. official code"):
  * model.binding.mode     'official' (64 -> 8 tokens, token MLP, Gumbel hard assignment) | 'paper'
  * model.decoder.attend_padding   True reproduces the official decoder, which ignores the padding mask.
  * loss.mask_cost         'l2' (official) | 'neg_cos' (paper)
  * loss.dice_norm         'official' (sum over batch / K) | 'mean' (per-sample mean)
  * data.entity_mode       'official' (case-sensitive match, strip("'s") quirk) | 'fixed'
"""

import ml_collections

from ovseg_jax import eval_config


def model_config(*, width: int, depth: int = 12, heads: int = 8, text_width: int = 768,
                 text_layers: int = 12, text_heads: int = 12, text_intermediate: int = 3072,
                 proj_hidden: int = 4096, proj_out: int = 256, num_group_tokens: int = 64,
                 num_output_groups: int = 8, patch_size: int = 16, img_size: int = 224,
                 vocab_size: int = 30522) -> ml_collections.ConfigDict:
  """Model hyper-parameters. Shapes of every parameter follow from these."""
  m = ml_collections.ConfigDict()
  m.vision = ml_collections.ConfigDict(dict(
      img_size=img_size,               # training resolution; eval resizes the pos-embed bicubically
      patch_size=patch_size,
      stem_channels=(),                # () = the authors' linear patch embed; see vit.PatchEmbed
      width=width,
      depths=(depth // 2, depth - depth // 2),  # blocks before / after the binding module
      num_heads=heads,                 # official: DINO's ViT-B qkv run as 8 heads (head dim 96)
      mlp_ratio=4.0,
      qkv_bias=True,
      ln_eps=1e-5,                     # official uses PyTorch's default, not DINO's 1e-6
      drop_path_rate=0.1,              # rises linearly over all blocks
  ))
  m.binding = ml_collections.ConfigDict(dict(
      mode='official',                 # 'official' | 'paper' | 'slot' (apply_binding_mode sets the keys below)
      num_group_tokens=num_group_tokens,  # K_in: learnable tokens entering the first stage
      num_output_groups=num_output_groups,  # K_out: groups after the binding module
      assignment='gumbel_hard',        # 'gumbel_hard' (official, train) | 'soft' (paper Eq. 4)
      token_mlp_ratio=0.5,             # hidden width of the K_in->K_out token-mixing MLP, x width
      gumbel_tau=1.0,
      slot_iters=3,                    # 'slot' mode: refinement rounds (models/binding.SlotBinding)
      slot_cosine=False,               # 'slot' mode: cosine attention with a learned inverse temperature
      slot_values='context',           # 'slot' mode: the slots pool the ViT tokens ('context') or the patch
                                       # embeddings ('local': a slot is then only its own patches' content)
  ))
  m.text = ml_collections.ConfigDict(dict(
      vocab_size=vocab_size,
      width=text_width,
      num_layers=text_layers,
      num_heads=text_heads,
      intermediate=text_intermediate,
      max_position=512,
      type_vocab=2,
      ln_eps=1e-12,
      dropout=0.1,                     # the official BERT stays in train mode (dropout on) when training
      max_length=77,
  ))
  m.proj = ml_collections.ConfigDict(dict(hidden=proj_hidden, out=proj_out, bn_momentum=0.9,
                                          bn_eps=1e-5))
  # Not in the paper: a projection head on the stage-1 patch tokens, trained by loss.patch_ground_weight
  # (losses.patch_grounding_loss). False = the authors' model (no such head).
  m.patch_head = False
  m.decoder = ml_collections.ConfigDict(dict(
      num_heads=heads,
      mlp_ratio=4.0,
      attend_padding=False,            # True = official quirk: the decoder ignores the padding mask
  ))
  m.temperature_init = 0.07            # logit_scale = log(1 / 0.07), learnable
  m.max_logit_scale = 100.0            # exp(logit_scale) is clamped here (official)
  m.dtype = 'float32'                  # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  m.remat = 'none'                     # ViT blocks / BERT layers: 'none' | 'full' | 'dots' (models/vit.py remat)
  return m


def base_config() -> ml_collections.ConfigDict:
  """Every non-model key with the authors' defaults. Model configs fill `model` and override the rest."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stage = 1                          # 1: contrast + entity; 2: + mask loss, EMA teacher, frozen text
  c.recipe = 'two_stage'               # 'two_stage' (authors) | 'paper_single' (lambda=0 then 0.1)

  c.loss = ml_collections.ConfigDict(dict(
      entity_weight=1.0,
      mask_weight=0.1,                 # lambda of Eq. 13 once the mask loss is on
      mask_start_fraction=0.75,        # paper_single recipe: mask loss starts after 30 of 40 epochs
      mask_cost='l2',                  # Hungarian cost: 'l2' (official cdist) | 'neg_cos' (paper)
      dice_norm='official',            # 'official' (sum_b / K) | 'mean'
      cross_threshold=0.6,             # delta: relative threshold on the teacher's sigmoid
      group_ratio=0.5,                 # r: the int(r*K) groups LEAST similar to the entity are detached (official)
      matcher='dp',                    # 'dp' (exact, on device, K <= 10) | 'scipy' (host callback)
      contrast_chunk=0,                # >0: compute InfoNCE in row chunks of this size (memory)
      dice_per_device_batch=128,       # dice_norm='official' = sum over this many samples / K (official
                                       # stage-2 per-GPU batch); 0: the global batch. Mesh-independent.
      # Not in the paper: the caption's entities matched one-to-one to groups (Hungarian), the other groups to
      # a background prompt (losses.group_match_loss); 0 = off (the authors' losses only).
      group_match_weight=0.0,
      group_match_background_weight=1.0,
      # Not in the paper: patch-level grounding (losses.patch_grounding_loss, needs model.patch_head). Each
      # patch is classified among the entity prompts and a background prompt; a multiple-instance loss ties
      # the top patches of each class to the caption's entities, each group is trained towards its own
      # patches' classes (distill), and Eq. 4 towards grouping patches of one class (purity). 0 = off.
      patch_ground_weight=0.0,
      patch_top_k=4,                   # patches averaged per class for the image-level score
      patch_distill_weight=1.0,
      patch_purity_weight=1.0,
  ))

  c.optim = ml_collections.ConfigDict(dict(
      base_lr=6.4e-4,                  # at global batch 4096; scaled by global_batch / 4096
      warmup_lr=1.6e-5,
      min_lr=1.6e-4,
      warmup_epochs=2.0,
      warmup_steps=-1,                 # >=0 overrides warmup_epochs
      weight_decay=0.05,
      b1=0.9, b2=0.999, eps=1e-8,
      grad_clip_norm=5.0,
      lr_scale_batch=4096,
      frozen=(),                       # regexes of parameter paths that get no update
  ))

  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=4096,
      total_epochs=30.0,
      total_steps=0,                   # >0 overrides total_epochs
      ema_momentum=0.99,
      log_every_steps=50,
      checkpoint_every_steps=1000,
      keep_checkpoints=3,
      init_from='',                    # Orbax dir from `convert dino|bert|official` or a stage-1 workdir
      init_bert='',                    # Orbax dir from `convert bert`
      init_teacher_from_student=True,  # stage 2: teacher <- stage-1 visual encoder
      deterministic=False,             # no drop-path, dropout or Gumbel noise (parity tests)
      # Authors' quirk (docs/paper_vs_authors.md Q7): the text projector also runs on every token of every text in train
      # mode, so its BN running statistics mix [CLS] and (mostly padding) token statistics. False keeps
      # the statistics on the [CLS] embeddings that inference actually projects.
      text_bn_all_tokens=True,
      peak_tflops_per_device=0.0,      # MFU denominator; 0: measure a float32 matmul peak at start-up
  ))

  c.data = ml_collections.ConfigDict(dict(
      dataset='cc4m',                  # tfds dataset name written by build_cc4m / data.synthetic
      data_dir='',                     # the tfds data_dir holding it
      image_size=224,
      crop_scale=(0.4, 1.0),           # stage-2 RandomResizedCrop scale; stage 1 uses deit_aug
      deit_aug=True,                   # stage-1 DeiT recipe: RandAugment + random erasing
      channel_shuffle=False,           # random RGB permutation (not official; tiny's synthetic data)
      entity_mode='official',
      num_workers=8,
      read_threads=2,                  # threads per grain worker (PIL decode releases the GIL)
      split='train',                   # tfds split the trainer reads
      shuffle_seed=0,
      prompt_template='A photo of {}',
      # The prompted-entity sentence h(E) of Eq. 8: '' = a random ImageNet template prefix + entities joined
      # by ' and ' (official); a format string such as 'a photo of a {}.' = one fixed prompt (paper's form).
      answer_template='',
      # Text padding buckets (ovseg_jax/text_buckets.py): each global batch's texts are padded to the smallest
      # bucket holding its longest text; model.text.max_length is the ceiling. (77,) = the authors' fixed
      # padding='max_length'. With several buckets the token-projection BN statistics of
      # train.text_bn_all_tokens skip padding (docs/paper_vs_authors.md Q7), and decoder.attend_padding must
      # be False. e.g. (16, 24, 32, 48, 64, 77): one compile per bucket.
      text_buckets=(77,),
  ))

  # Segmentation settings (short_side, window, stride, templates, bg_threshold, ...). Their defaults live in
  # the package, so inference without a config file has them too; an exported checkpoint carries these.
  c.eval = eval_config.defaults()

  # Zero-shot evaluation during training (ovseg_jax/train_eval.py): every `every_steps` steps and at the last
  # step, the online model segments a validation split with the `c.eval` settings above (a run shorter than
  # every_steps is not evaluated). The scores go to metrics.jsonl and TensorBoard as eval/mIoU, eval/aAcc,
  # eval/mAcc (percent) and eval/seconds; train throughput is timed without the evaluation.
  c.eval_during_training = ml_collections.ConfigDict(dict(
      every_steps=0,                   # 0: off
      dataset='folder',                # an evaluate --dataset name; 'folder' = any VOC-layout folder with
                                       # ImageSets/Segmentation/val.txt and class_names.txt
      data_dir='',                     # its root
      max_images=0,                    # the first N images of the split (0: all)
      metric='mIoU',                   # 'mIoU' | 'aAcc' | 'mAcc': what keep_best ranks by
      # True: WORKDIR/best/ holds the inference checkpoint (export's format) with the best `metric` so far.
      # Its meta.json `selection` records the split, so `evaluate` warns when it scores that split. The
      # benchmarks' own names (voc, context, ...) are their reported val splits, so selecting on them is
      # refused. The authors select on VOC val (docs/paper_vs_authors.md Q21). Select on a folder of images
      # the tables do not report instead, e.g. some VOC train images in the VOC layout.
      keep_best=False,
  ))

  c.mesh = (('data', -1), ('fsdp', 1))  # axis name, size (-1: all remaining devices)
  # Parameter / optimizer-state / EMA sharding (sharding.py): (regex on the '/'-joined path, rule), first
  # match wins. 'fsdp': the largest weight axis divisible by the fsdp mesh size is split over 'fsdp';
  # 'replicate': a full copy on every device. Arrays under fsdp_min_size elements are always replicated.
  c.sharding = ml_collections.ConfigDict(dict(rules=(('.*', 'fsdp'),), fsdp_min_size=2 ** 14))
  c.distributed = False                # call jax.distributed.initialize() (pods, SLURM)
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses `configs/x.py:key=value,key2=value2` variant strings (big_vision style).

  Only keys given in `defaults` are accepted, so a typo in a variant is an error, not a silent default.
  """
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    if '=' not in item:
      raise ValueError(f'config variant {item!r} must look like key=value; known keys: {sorted(out)}')
    key, value = item.split('=', 1)
    if key not in out:
      raise ValueError(f'unknown config variant key {key!r}; known keys: {sorted(out)}')
    out[key] = type(defaults[key])(value) if defaults[key] is not None else value
  return ml_collections.ConfigDict(out)


def apply_binding_mode(c: ml_collections.ConfigDict, mode: str) -> None:
  """'official': 64 tokens -> token MLP -> 8 groups, Gumbel hard assignment in training.
  'paper': K = 8 learnable tokens, no token MLP, soft assignment throughout (paper Eq. 3-6).
  'slot': slot attention (binding.SlotBinding; not in the authors' code, docs/paper_vs_authors.md Q32)."""
  if mode == 'official':
    c.model.binding.mode = 'official'
    c.model.binding.assignment = 'gumbel_hard'
  elif mode == 'paper':
    c.model.binding.mode = 'paper'
    c.model.binding.num_group_tokens = c.model.binding.num_output_groups
    c.model.binding.assignment = 'soft'
  elif mode == 'slot':
    c.model.binding.mode = 'slot'
    c.model.binding.num_group_tokens = c.model.binding.num_output_groups
  else:
    raise ValueError(f"binding={mode!r}: expected 'official', 'paper' or 'slot'")


def apply_stage(c: ml_collections.ConfigDict, stage: int) -> None:
  """Stage 2 of the authors' recipe: mask loss on, text encoder frozen, stage-2 lr (docs/paper_vs_authors.md Q18)."""
  c.stage = stage
  if stage == 2:
    c.optim.base_lr, c.optim.warmup_lr, c.optim.min_lr = 1e-5, 4e-6, 1e-6
    c.optim.warmup_epochs = 0.0
    c.optim.frozen = ('text_encoder/.*',)
    c.train.total_epochs = 10.0
    c.train.global_batch_size = 1024
    c.data.deit_aug = False
  elif stage != 1:
    raise ValueError(f'stage={stage}: expected 1 or 2')
