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
    'layers': (),   # the stacked axis of scanned layers (model.scan_layers): every device
                    # holds every layer's shard; the scan slices one layer at a time
    # Activations (jaxlm.model constrains them with `constrain`): the batch over data and
    # fsdp, the sequence over context (ring attention), heads / MLP width / vocabulary of
    # activations over tensor, the model dimension replicated.
    'act_batch': ('data', 'fsdp'),
    'act_length': ('context',),
    'act_embed': (),
    'act_heads': ('tensor',),
    'act_kv_heads': ('tensor',),
    'act_mlp': ('tensor',),
    'act_vocab': ('tensor',),
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


def constrain(x: jax.Array, names: Sequence[str | None], rules=None) -> jax.Array:
  """Pin an activation's layout by logical names under the current mesh (jax.set_mesh);
  without a mesh (or on one device) it returns x unchanged. Without these constraints XLA
  may propagate the weights' fsdp sharding onto activations and keep the whole batch on
  every device."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, x.shape, mesh, rules))


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


# ----------------------------------------------------------------------------- meshes

MESH_AXES = ('data', 'fsdp', 'tensor', 'context')
BATCH_AXES = ('data', 'fsdp')   # the global batch is split over both


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve a {axis: size} mapping (one size may be -1) against the device count."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f'unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}')
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  wild = [a for a, s in zip(MESH_AXES, shape) if s == -1]
  if len(wild) > 1:
    raise ValueError(f'only one mesh axis may be -1, got {wild}')
  bad = [f'{a}={s}' for a, s in zip(MESH_AXES, shape) if s == 0 or s < -1]
  if bad:
    raise ValueError(f'mesh sizes must be positive or -1, got {", ".join(bad)}')
  fixed = int(np.prod([s for s in shape if s != -1]))
  if wild:
    if num_devices % fixed:
      raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))}: {num_devices} devices are not '
                       f'divisible by the product of the fixed axes ({fixed})')
    shape[MESH_AXES.index(wild[0])] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'mesh {dict(zip(MESH_AXES, shape))} has {fixed} devices but '
                     f'{num_devices} are available; make the product match or set one axis to -1')
  return tuple(shape)


def tpu_slice_index(device) -> int:
  """The TPU slice a device belongs to; 0 for other platforms (GPU hosts also report a
  slice_index, one per host or NVLink domain, but a GPU cluster's mesh stays flat)."""
  if getattr(device, 'platform', None) != 'tpu':
    return 0
  return getattr(device, 'slice_index', 0) or 0


def make_mesh(sizes: dict[str, int], devices=None, *, num_slices: int | None = None,
              slice_index=None) -> Mesh:
  """The (data, fsdp, tensor, context) mesh sized from `sizes` (one size may be -1): the
  one mesh factory of every entry point (trainer, --aot_only, evaluation, studies).

  `devices`: local devices, all processes' devices of a multi-process run, or a TPU
  topology's abstract devices (default: jax.devices()). Devices of several slices (TPU
  multi-slice: `slice_index` differs) get a hybrid mesh: the data axis is split across the
  slices (only gradient reductions cross the slower data-center network), every other
  axis stays within a slice. `num_slices` defaults to the number of distinct slice indices;
  `slice_index(device)` to `tpu_slice_index` (a TPU device's slice; 0 elsewhere).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  slice_of = slice_index or tpu_slice_index
  groups: dict[int, list] = {}
  for d in devices:
    groups.setdefault(int(slice_of(d)), []).append(d)
  num_slices = len(groups) if num_slices is None else num_slices
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if num_slices <= 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  if len(groups) != num_slices or len({len(g) for g in groups.values()}) != 1:
    raise ValueError(f'num_slices={num_slices} but the devices form {len(groups)} slice(s) of '
                     f'sizes {sorted(len(g) for g in groups.values())}')
  if shape[0] % num_slices:
    raise ValueError(f'mesh data={shape[0]} must be a multiple of the {num_slices} slices '
                     f'(the data axis spans slices); mesh {dict(zip(MESH_AXES, shape))}')
  from jax.experimental import mesh_utils
  ici = (shape[0] // num_slices, *shape[1:])
  grid = np.concatenate([mesh_utils.create_device_mesh(ici, groups[k],
                                                       allow_split_physical_axes=True)
                         for k in sorted(groups)], axis=0)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def state_shardings(state, mesh: Mesh, rules=None):
  """NamedShardings for an nnx State (parameters, optimizer state), from logical names;
  variables without names (step counters) are replicated."""
  def one(v):
    names = v.get_metadata().get('out_sharding') if hasattr(v, 'get_metadata') else None
    shape = getattr(v, 'shape', ())
    if not names or len(names) != len(shape):
      return v.replace(NamedSharding(mesh, PartitionSpec()))
    return v.replace(NamedSharding(mesh, logical_to_spec(names, shape, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: hasattr(x, 'get_metadata'))


def batch_spec(sequence_sharded: bool) -> PartitionSpec:
  """[B, T] batches: batch over data and fsdp; sequence over context for ring attention."""
  return PartitionSpec(BATCH_AXES, 'context' if sequence_sharded else None)
