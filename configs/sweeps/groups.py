"""Paper Table 5: number of output groups K x selection ratio r (tau in the table).

  python -m ovseg_jax.sweep --config=configs/vitb.py --sweep=configs/sweeps/groups.py

  K \\ r     0.25   0.5    0.75   1.0        (VOC mIoU)
  8         49.0   53.6   51.8   50.4
  16        42.3   43.2   43.1   42.9

Keys: model.binding.num_output_groups (K) and loss.group_ratio (r; gradient only through the r*K groups nearest
the shared entity). K=16 is past the on-device DP matcher's limit (K <= 10), so those runs also set
loss.matcher=scipy (exact Hungarian on the host). With `binding=paper` (the paper's binding module, K learnable
tokens and no token MLP) num_group_tokens follows K; in the official binding the 64 input tokens stay.
All losses on, under `recipe` (configs/sweeps/common.py).
"""

from ovseg_jax import sweep

from configs.sweeps import common

GROUPS = (8, 16)
RATIOS = (0.25, 0.5, 0.75, 1.0)
DP_MAX_GROUPS = 10


def get_sweep(arg=None):
  arg = common.parse(arg, binding='official')
  if arg.binding not in ('official', 'paper'):
    raise ValueError(f"binding={arg.binding!r}: expected 'official' or 'paper'")
  base = common.recipe_base(arg.recipe)
  if arg.binding == 'paper':
    base = sweep.merge(base, {'config_arg': 'binding=paper'})
  runs = []
  for k in GROUPS:
    per_k = {'model.binding.num_output_groups': k}
    if arg.binding == 'paper':
      per_k['model.binding.num_group_tokens'] = k
    if k > DP_MAX_GROUPS:
      per_k['loss.matcher'] = 'scipy'
    runs += sweep.with_base(per_k, sweep.grid({'loss.group_ratio': RATIOS}))
  return sweep.with_base(base, runs)
