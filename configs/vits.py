"""ViT-S/16 (DINO init) + BERT-base: the paper's smaller visual backbone (README model zoo row 2 uses RoBERTa;
this config keeps BERT-base, see README). 6 heads of 64, width 384; projectors 384->4096->256.
"""

from configs import common


def get_config(arg=None):
  arg = common.parse_arg(arg, stage=1, binding='official')
  c = common.base_config()
  c.model = common.model_config(width=384, depth=12, heads=6)
  c.model.decoder.num_heads = 6
  common.apply_binding_mode(c, arg.binding)
  common.apply_stage(c, arg.stage)
  c.lock()
  return c
