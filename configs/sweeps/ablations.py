"""Paper Table 3: which losses are on (L_contrast always; L_entity and L_mask switched).

  python -m ovseg_jax.sweep --config=configs/vitb.py --sweep=configs/sweeps/ablations.py
  python -m ovseg_jax.sweep --config=configs/tiny.py --sweep=configs/sweeps/ablations.py:form=variants

  row        L_entity  L_mask   paper VOC / Context mIoU   keys (form=keys)
  contrast      -        -      40.5 / 15.1               loss.entity_weight=0, loss.mask_weight=0, stage=1
  entity        x        -      48.9 / 19.9               loss.entity_weight=1, loss.mask_weight=0, stage=1
  mask          -        x      44.8 / 17.0               loss.entity_weight=0, loss.mask_weight=0.1, stage=2
  all           x        x      53.8 / 20.4               loss.entity_weight=1, loss.mask_weight=0.1, stage=2

Arguments (`ablations.py:key=value,...`):
  form=keys      (default) the rows as config keys, under `recipe` (see configs/sweeps/common.py; the paper's
                 single run by default, `recipe=config` keeps the config's own schedule, e.g. for tiny).
  form=variants  the rows as configs/tiny.py's own variants (`ablation=contrast` ...), which set the same keys.
The mask loss only exists in a single run here (it needs lambda=0 for most of training, then the EMA teacher), so
recipe=two_stage is refused.
"""

from configs.sweeps import common

ROWS = (  # name, entity loss on, mask loss on (Table 3, top to bottom)
    ('contrast', False, False),
    ('entity', True, False),
    ('mask', False, True),
    ('all', True, True),
)


def get_sweep(arg=None):
  arg = common.parse(arg, form='keys')
  if arg.form == 'variants':
    return [{'name': name, 'config_arg': f'ablation={name}'} for name, _, _ in ROWS]
  if arg.form != 'keys':
    raise ValueError(f"form={arg.form!r}: expected 'keys' or 'variants'")
  if arg.recipe == 'two_stage':
    raise ValueError('Table 3 switches the mask loss within one run; use recipe=paper_single or recipe=config')
  runs = []
  for name, entity_on, mask_on in ROWS:
    run = {'name': name, **common.recipe_base(arg.recipe, mask_on=mask_on)}
    run.update({'stage': 2 if mask_on else 1, 'loss.entity_weight': 1.0 if entity_on else 0.0,
                'loss.mask_weight': 0.1 if mask_on else 0.0})
    runs.append(run)
  return runs
