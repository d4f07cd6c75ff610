"""The training recipe a paper-table sweep runs under, shared by the sweep files.

  recipe=paper_single  the paper's single run (Sec. 4.1): 40 epochs at global batch 2048 (lr 6.4e-4 x 2048/4096
                       = 3.2e-4, the paper's value), the mask loss off (lambda=0) for the first 30 epochs and 0.1
                       after. `stage=2` is what switches the mask-loss machinery (EMA teacher, cross image) on,
                       exactly as configs/tiny.py does for its mask-on variants. For vitb / vits.
  recipe=config        the config's own recipe, untouched. configs/tiny.py already is the paper's single run
                       scaled down (600 steps, mask loss from 75%), so use this with tiny.
  recipe=two_stage     the authors' stage 2 (config variant stage=2: mask loss, frozen text encoder, lr 1e-5),
                       which must start from a stage-1 run: add `--config.train.init_from=<stage-1 workdir>`.
                       Only for the tables that ablate the mask loss (4, 5, 9); vitb / vits.
"""

from configs import common as config_common

RECIPES = ('paper_single', 'config', 'two_stage')


def parse(arg, **defaults):
  """`recipe=...` plus the sweep file's own keys; a typo is an error, as for configs."""
  out = config_common.parse_arg(arg, recipe='paper_single', **defaults)
  if out.recipe not in RECIPES:
    raise ValueError(f'recipe={out.recipe!r}: expected one of {RECIPES}')
  return out


def recipe_base(recipe: str, *, mask_on: bool = True) -> dict:
  """Overrides that put a config on `recipe`, with every loss on unless `mask_on` is False."""
  if recipe == 'paper_single':
    base = {'recipe': 'paper_single', 'train.total_epochs': 40.0, 'train.global_batch_size': 2048}
    base.update({'stage': 2, 'loss.mask_weight': 0.1} if mask_on else {'stage': 1, 'loss.mask_weight': 0.0})
    return base
  if recipe == 'config':
    return {}
  if recipe == 'two_stage':
    return {'config_arg': 'stage=2'}
  raise ValueError(f'recipe={recipe!r}: expected one of {RECIPES}')
