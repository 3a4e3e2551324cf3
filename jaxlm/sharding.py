"""Logical axis names -> mesh axes.

Parameters carry logical names (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, see `jaxlm.model`). A rule table maps each logical name to zero or more mesh
axes. A mesh axis that the mesh lacks, that is already used by another dimension of
the same array, or that does not divide the dimension is dropped, so one table
serves every mesh from a single CPU device to a pod.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# Logical name -> mesh axes, in priority order. FSDP shards the embedding dimension of
# weights; tensor parallelism shards heads and the MLP width.
DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    'vocab': ('tensor',),
    'embed': ('fsdp',),
    'heads': ('tensor',),
    'kv_heads': ('tensor',),
    'head_dim': (),
    'mlp': ('tensor',),
}


def logical_to_spec(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                    rules: dict[str, tuple[str, ...]] | None = None) -> PartitionSpec:
  """PartitionSpec for an array of `shape` whose dimensions have logical `names`."""
  rules = DEFAULT_RULES if rules is None else rules
  if len(names) != len(shape):
    raise ValueError(f'logical names {tuple(names)} do not match shape {tuple(shape)}')
  used: set[str] = set()
  spec = []
  for name, dim in zip(names, shape):
    axes = []
    for axis in (rules.get(name, ()) if name is not None else ()):
      size = mesh.shape.get(axis)
      if size is None or axis in used:
        continue
      if dim % (int(np.prod([mesh.shape[a] for a in axes])) * size) == 0:
        axes.append(axis)
    used.update(axes)
    spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
  return PartitionSpec(*spec)


def param_sharding(variable, mesh: Mesh, rules=None) -> NamedSharding:
  """NamedSharding for an nnx Variable (real or abstract) from its logical names."""
  names = variable.get_metadata().get('out_sharding') or (None,) * len(variable.shape)
  return NamedSharding(mesh, logical_to_spec(names, variable.shape, mesh, rules))


def make_array(host_array: np.ndarray, sharding: jax.sharding.Sharding | None,
               dtype=None) -> jax.Array:
  """Place a host array (possibly a memory map) on devices, casting each shard.

  With a sharding, each device reads only its own slice, and in multi-host runs each
  process only the slices of its addressable devices.
  """
  dtype = np.dtype(dtype or host_array.dtype)
  if sharding is None:
    return jax.device_put(np.asarray(host_array, dtype=dtype))
  return jax.make_array_from_callback(
      host_array.shape, sharding, lambda idx: np.asarray(host_array[idx], dtype=dtype))
