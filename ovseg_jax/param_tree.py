"""Names of pytree leaves: the '/'-joined key path that rules tables, loaders and tests match against.

    path_str(path)     -> 'img_encoder/blocks_0/attn/qkv/kernel'
    named_leaves(tree) -> [('img_encoder/blocks_0/attn/qkv/kernel', leaf), ...]   (tree-flatten order)

One naming for the optimizer's decay and frozen masks (optim.py), the sharding rules (sharding.py), the
init_from loader and the converters, so a regex written for one matches the same leaves in the others.
"""

from typing import Any

import jax


def path_str(path) -> str:
  """A jax key path -> 'img_encoder/blocks_0/attn/qkv/kernel' (dict keys, attributes and indices)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return '/'.join(parts)


def named_leaves(tree) -> list[tuple[str, Any]]:
  """[(path string, leaf)] in tree-flatten order."""
  return [(path_str(p), x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
