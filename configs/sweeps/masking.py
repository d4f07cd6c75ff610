"""Paper Table 4 (masking objectives of the entity-completion task) and the mask-loss objective choices.

  python -m ovseg_jax.sweep --config=configs/vitb.py --sweep=configs/sweeps/masking.py

Table 4 rows and what the config can express:
  row                        VOC / Context   config
  All entities (ours)        48.9 / 19.9     the default: every entity of the caption is masked
                                             (data.entity_mode='official' matches entities as the authors' code
                                             does, 'fixed' without its quirks; both rows are run)
  Single entity              47.0 / 18.5     not expressible: the pipeline always masks all entities
  All nouns                  45.4 / 17.4     not expressible: needs a noun tagger in the data pipeline
  Multi-label contrastive    44.5 / 17.0     not expressible: GroupViT's loss is not implemented
  MLM (w/ groups)            42.8 / 16.3     not expressible: no token-classification head over the entity set
  MLM (w/o groups)           36.3 / 14.6     not expressible: same, predicting from the text encoder alone
Table 4 was run without the mask loss (its first row equals Table 3's "entity" row), so these runs switch
it off (loss.mask_weight=0, stage=1).

Mask-loss objective (paper Eq. 10-12 vs the official code), one choice changed at a time, all losses on:
  loss.mask_cost  'l2' (official cdist)        | 'neg_cos' (paper)   Hungarian matching cost
  loss.dice_norm  'official' (sum over b / K)  | 'mean'              Dice normalisation
and both paper choices together. The threshold delta is Table 9 (threshold.py); Table 6's "group consistency
(NCE)" row is not implemented.

Arguments: `part=entity|objective|all` (default all) and `recipe` (configs/sweeps/common.py).
"""

from ovseg_jax import sweep

from configs.sweeps import common


def entity_runs(recipe: str) -> list[dict]:
  base = common.recipe_base(recipe, mask_on=False)
  if recipe == 'config':  # the config's schedule, with the mask loss off as in the paper's Table 4
    base = {'stage': 1, 'loss.mask_weight': 0.0}
  return sweep.with_base(base, [
      {'name': 'all_entities-official', 'data.entity_mode': 'official'},
      {'name': 'all_entities-fixed', 'data.entity_mode': 'fixed'},
  ])


def objective_runs(recipe: str) -> list[dict]:
  return sweep.with_base(common.recipe_base(recipe), [
      {'name': 'mask-official', 'loss.mask_cost': 'l2', 'loss.dice_norm': 'official'},
      {'name': 'mask-neg_cos', 'loss.mask_cost': 'neg_cos', 'loss.dice_norm': 'official'},
      {'name': 'mask-dice_mean', 'loss.mask_cost': 'l2', 'loss.dice_norm': 'mean'},
      {'name': 'mask-paper', 'loss.mask_cost': 'neg_cos', 'loss.dice_norm': 'mean'},
  ])


def get_sweep(arg=None):
  arg = common.parse(arg, part='all')
  parts = {'entity': ('entity',), 'objective': ('objective',), 'all': ('entity', 'objective')}
  if arg.part not in parts:
    raise ValueError(f'part={arg.part!r}: expected one of {sorted(parts)}')
  if arg.recipe == 'two_stage' and 'entity' in parts[arg.part]:
    raise ValueError('the Table 4 rows are stage-1 runs; use part=objective with recipe=two_stage')
  runs = []
  for part in parts[arg.part]:
    runs += entity_runs(arg.recipe) if part == 'entity' else objective_runs(arg.recipe)
  return runs
