"""L2 normalisation, shared by the losses (paper Eq. 7-12) and zero-shot inference (Eq. 1).

Its own module because inference imports no training code (losses.py pulls in the matcher).
"""

import jax
import jax.numpy as jnp

_EPS = 1e-12  # torch.nn.functional.normalize's default eps


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||_2, 1e-12) along `axis`, exactly like torch `F.normalize`."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _EPS)
