"""Sweep files for `python -m ovseg_jax.sweep`: each exports get_sweep(arg) -> list of override dicts.

One file per paper table: ablations.py (Table 3), masking.py (Table 4 + the mask-loss objective choices),
groups.py (Table 5), threshold.py (Table 9). common.py holds the recipe every table is run under.
"""
