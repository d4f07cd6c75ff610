"""Which parts of the training recipe a config runs: one rule, read by the model side (train_step) and the
data side (data/pipeline.py). It imports nothing, so the grain workers stay free of jax.
"""


def uses_teacher(config) -> bool:
  """Stage 2, or the paper's single run with the mask loss switching on later (paper_single, mask_weight > 0):
  the run has an EMA teacher and a mask branch, the one reader of the cross-image partner."""
  return config.stage == 2 or (config.recipe == 'paper_single' and config.loss.mask_weight > 0)
