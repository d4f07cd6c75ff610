"""ViT-B/16 (DINO init) + BERT-base: the paper's main model, trained with the authors' recipe.

  python -m ovseg_jax.train --config=configs/vitb.py --workdir=gs://bucket/run
  python -m ovseg_jax.train --config=configs/vitb.py:stage=2 --config.train.init_from=gs://bucket/run ...
  python -m ovseg_jax.train --config=configs/vitb.py:binding=paper ...   # paper form of the binding module

Reproduces the released checkpoint's recipe (docs/paper_vs_authors.md Q2, Q18): stage 1 is 30 epochs at global batch
4096, lr 6.4e-4; stage 2 is 10 epochs at 1024, lr 1e-5, with the mask loss and a frozen text encoder.
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
