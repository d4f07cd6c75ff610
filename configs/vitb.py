"""ViT-B/16 (DINO init) + BERT-base: the paper's main model, trained with the authors' recipe.

  python -m ovseg_jax.train --config=configs/vitb.py --workdir=gs://bucket/run
  python -m ovseg_jax.train --config=configs/vitb.py:stage=2 --config.train.init_from=gs://bucket/run ...
  python -m ovseg_jax.train --config=configs/vitb.py:binding=paper ...   # paper form of the binding module

Reproduces the released checkpoint's recipe (docs/paper_vs_authors.md Q2, Q18): stage 1 is 30 epochs at global batch
4096, lr 6.4e-4; stage 2 is 10 epochs at 1024, lr 1e-5, with the mask loss and a frozen text encoder.

Zero-shot evaluation during training (off by default; configs/common.py `eval_during_training`) reads any
VOC-layout folder (JPEGImages/, SegmentationClass/, ImageSets/Segmentation/val.txt, class_names.txt with
'background' first). To keep the best checkpoint in WORKDIR/best/, select on images the tables do not report,
e.g. a few hundred VOC train images copied into such a folder (the authors select on VOC val, which they
report: docs/paper_vs_authors.md Q21):

  --config.eval_during_training.every_steps=2000 --config.eval_during_training.data_dir=/data/voc_select \
  --config.eval_during_training.keep_best=True
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, stage=1, binding='official')
  c = common.base_config()
  c.model = common.model_config(width=768, depth=12, heads=8)
  common.apply_binding_mode(c, arg.binding)
  common.apply_stage(c, arg.stage)
  c.lock()
  return c
