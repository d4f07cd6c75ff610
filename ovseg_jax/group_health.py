"""Health signals of the binding: is each image still split into several distinct groups?

From scratch the binding can collapse within a few hundred steps: the group tokens (or slots) all point one
way, the assignment queries form two opposite bundles, and Eq. 4 then splits each image in two whatever the
objects (bench/RESULTS.md "End to end"). These four numbers show it in the train log and TensorBoard long
before an evaluation does:

  token_cosine    mean cosine between an image's group tokens after stage 1 (`slots_init`; in 'slot' mode
                  the drawn slots s_0)                                           1.0 = collapsed
  query_cosine    mean cosine between an image's K assignment queries q          1.0 = collapsed; -1/(K-1)
                  is the most spread K vectors can be
  groups_used     groups that win at least one patch (argmax_k A[k, l]), per image   of K
  assign_entropy  mean over patches of -sum_k A[k, l] log A[k, l], in nats       log K = uniform, 0 = hard
"""

import jax
import jax.numpy as jnp

HEALTH_KEYS = ('token_cosine', 'query_cosine', 'groups_used', 'assign_entropy')


def mean_pairwise_cosine(x: jax.Array) -> jax.Array:
  """x [B, K, C] -> scalar: the mean over images and ordered pairs k != k' of cos(x_k, x_k')."""
  x = x.astype(jnp.float32)
  z = x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-6)
  gram = jnp.einsum('bkc,bjc->bkj', z, z, precision=jax.lax.Precision.HIGHEST)
  k = x.shape[1]
  off_diagonal = jnp.sum(gram, axis=(1, 2)) - jnp.trace(gram, axis1=1, axis2=2)
  return jnp.mean(off_diagonal / (k * (k - 1)))


def groups_used(soft: jax.Array) -> jax.Array:
  """soft [B, K, L] assignment (softmax over K) -> scalar: mean over images of the groups that win a patch."""
  k = soft.shape[1]
  winners = jax.nn.one_hot(jnp.argmax(soft, axis=1), k, axis=1)   # [B, K, L]
  return jnp.mean(jnp.sum(jnp.any(winners > 0, axis=-1), axis=-1).astype(jnp.float32))


def assignment_entropy(soft: jax.Array) -> jax.Array:
  """soft [B, K, L] -> scalar: mean over images and patches of the entropy over the K groups (nats)."""
  p = soft.astype(jnp.float32)
  return jnp.mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-12)), axis=1))


def binding_health(visual_out: dict) -> dict:
  """The VisualEncoder's output dict (`slots_init`, `q`, `soft`) -> {HEALTH_KEYS: float32 scalar}."""
  x = jax.lax.stop_gradient(visual_out)
  return {'token_cosine': mean_pairwise_cosine(x['slots_init']),
          'query_cosine': mean_pairwise_cosine(x['q']),
          'groups_used': groups_used(x['soft']),
          'assign_entropy': assignment_entropy(x['soft'])}
