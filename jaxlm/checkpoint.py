"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/.

A checkpoint holds `state` (nnx.split((model, optimizer)) as a pure dict: parameters,
optimizer moments, step) and `data_stream` (the data iterator's state as JSON; the stream
is the same on every process, so any process count can resume it). Restoring reads each
array straight into the sharding the restoring run asks for, so a run may resume on another
mesh or device count. The newest readable checkpoint wins: an unreadable one (a crash while
writing, a truncated copy, a damaged data-iterator state) is reported with its directory
and error, moved to WORKDIR/unreadable_checkpoints/ and the previous one used; a readable
one of another model raises CheckpointMismatchError (nothing moved). Nothing is deleted
here (Orbax's max_to_keep retires old steps as new ones are saved).

    mngr = manager(workdir, keep=3)
    save(mngr, step, state, data_iter)
    step = restore(mngr, state, shardings, data_iter, log)     # None: nothing to resume
    cfg, model, step = restore_model(c, workdir, mesh)           # parameters only
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
from flax import nnx

from jaxlm import config as config_lib
from jaxlm import sharding as shd
from jaxlm.model import init_model


def manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True))


def save(mngr, step: int, state, data_iter) -> None:
  """Start writing step's checkpoint (asynchronously; mngr.wait_until_finished() waits)."""
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
      data_stream=ocp.args.JsonSave(data_iter.get_state())), force=True)


def _abstract(state, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))


class CheckpointMismatchError(ValueError):
  """A readable checkpoint that holds another model or optimizer than the run asks for."""


def _path_key(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def _saved_arrays(step_dir) -> dict[str, Any]:
  """{path: metadata (shape, dtype)} of a checkpoint's `state` item (reads metadata only)."""
  import orbax.checkpoint as ocp
  from absl import logging
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)   # Orbax warns that state/ has no step metadata file
  try:
    meta = ocp.StandardCheckpointer().metadata(os.path.join(step_dir, 'state'))
  finally:
    logging.set_verbosity(level)
  tree = getattr(meta, 'item_metadata', meta)
  return {_path_key(k): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatch(saved: dict[str, Any], abstract) -> list[str]:
  """What differs between a checkpoint's arrays and the state a run asks for: missing or
  extra arrays, and shapes or dtypes (empty: they match)."""
  want = {_path_key(k): v for k, v in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  lines = [f'{k}: not in the checkpoint' for k in sorted(set(want) - set(saved))]
  lines += [f'{k}: in the checkpoint only' for k in sorted(set(saved) - set(want))]
  for k in sorted(set(want) & set(saved)):
    w, s = want[k], saved[k]
    if tuple(w.shape) != tuple(s.shape) or jax.numpy.dtype(w.dtype) != jax.numpy.dtype(s.dtype):
      lines.append(f'{k}: checkpoint {tuple(s.shape)} {s.dtype}, run {tuple(w.shape)} {w.dtype}')
  return lines


def restore(mngr, state, shardings, data_iter, log) -> int | None:
  """Restore the newest readable checkpoint into (state, data_iter), each array into its
  sharding in `shardings`; returns its step, or None when there is none.

  A checkpoint whose model, optimizer state or data-iterator state cannot be read is
  reported in full (its directory and the error), moved to WORKDIR/unreadable_checkpoints/
  and the previous one tried. A readable checkpoint that holds another model or optimizer
  raises CheckpointMismatchError and nothing is moved."""
  import orbax.checkpoint as ocp
  abstract = _abstract(state, shardings)
  unreadable = []
  restored_step = None
  for step in sorted(mngr.all_steps(), reverse=True):
    step_dir = os.path.join(str(mngr.directory), str(step))
    try:
      saved = _saved_arrays(step_dir)
      if not saved:   # what Orbax reads from a damaged state/_METADATA
        raise ValueError(f'{step_dir}/state/_METADATA lists no arrays')
    except Exception as e:  # noqa: BLE001  (unreadable metadata: a damaged checkpoint)
      unreadable.append((step, step_dir, e))
      continue
    if diffs := mismatch(saved, abstract):
      raise CheckpointMismatchError(
          f'the checkpoint {step_dir} holds another model or optimizer state than this run '
          f'builds ({len(diffs)} differences; first: ' + '; '.join(diffs[:6]) + '). Nothing '
          'was changed. Resume with the config it was written with, or use a new workdir.')
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
      _restore_data(mngr, step, data_iter, log)
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back)
      unreadable.append((step, step_dir, e))
      continue
    nnx.replace_by_pure_dict(state, restored['state'])
    restored_step = step
    break
  for step, step_dir, e in unreadable:
    log(f'[train] the checkpoint {step_dir} is unreadable ({type(e).__name__}: {e})')
  if unreadable:
    _set_aside_unreadable(mngr, [s for s, _, _ in unreadable], log)
  if unreadable and restored_step is not None:
    log(f'[train] resuming from the previous readable checkpoint, step {restored_step}')
  return restored_step


def _set_aside_unreadable(mngr, steps, log) -> None:
  """Move unreadable step directories out of Orbax's way (training writes those steps
  again) into WORKDIR/unreadable_checkpoints/; nothing is deleted."""
  from jax.experimental import multihost_utils
  root = str(mngr.directory)
  dest = os.path.join(os.path.dirname(root), 'unreadable_checkpoints')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxlm: before moving unreadable checkpoints')
  if jax.process_index() == 0:
    os.makedirs(dest, exist_ok=True)
    for step in steps:
      target = os.path.join(dest, f'{step}-{time.strftime("%Y%m%d-%H%M%S", time.gmtime())}')
      os.rename(os.path.join(root, str(step)), target)
      log(f'[train] moved the unreadable checkpoint at step {step} to {target}')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('jaxlm: moved unreadable checkpoints')
  mngr.reload()


def _restore_data(mngr, step: int, data_iter, log) -> None:
  """The data iterator's state at `step`; an error here makes the checkpoint unreadable
  (the caller falls back), except for checkpoints older than data_stream (below)."""
  import orbax.checkpoint as ocp
  if (mngr.directory / str(step) / 'data_stream').exists():
    data_iter.set_state(mngr.restore(step, args=ocp.args.Composite(
        data_stream=ocp.args.JsonRestore()))['data_stream'])
    return
  # Checkpoints written before data_stream (December 2026) hold grain's per-process
  # files under `data`; a one-process stream then was the global stream it is now.
  if jax.process_count() != 1:
    log(f'[train] WARNING: the checkpoint at step {step} predates data_stream and holds '
        f'per-process data-iterator files, which {jax.process_count()} processes cannot '
        f'read; the data stream restarts from its beginning (examples may repeat)')
    return
  import grain
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))


def restore_model(c, workdir: str, mesh, step: int | None = None):
  """(model config, model, step) from a training run's checkpoint: the parameters only,
  placed straight into their shardings on `mesh` (the optimizer state stays on disk).
  `workdir` is the run directory or its checkpoints/ folder; step None: the newest."""
  import orbax.checkpoint as ocp
  # the trainer's zigzag batches are a training-time layout; inference reads natural order
  cfg = dataclasses.replace(config_lib.model_config(c), ring_layout='natural')
  root = workdir if os.path.basename(os.path.normpath(workdir)) == 'checkpoints' else \
      os.path.join(workdir, 'checkpoints')
  if not os.path.isdir(root):
    raise FileNotFoundError(f'no checkpoints/ directory in {workdir!r}')
  mngr = ocp.CheckpointManager(os.path.abspath(root))
  steps = mngr.all_steps()
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {root!r}')
  step = max(steps) if step is None else step
  if step not in steps:
    raise FileNotFoundError(f'no checkpoint at step {step} in {root!r}; have {sorted(steps)}')
  from jaxlm import lora   # a LoRA run's checkpoint holds the adapters and the frozen base
  abstract_model = nnx.eval_shape(lambda: lora.attach_from_config(init_model(cfg), c))
  graphdef, abstract = nnx.split(abstract_model)
  target = _abstract(abstract, shd.state_shardings(abstract, mesh))
  # The saved tree is nnx.split((model, optimizer)): the model's subtree is key 0.
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={0: target}, partial_restore=True)))
  nnx.replace_by_pure_dict(abstract, restored['state'][0])
  model = nnx.merge(graphdef, abstract)
  mngr.close()
  return cfg, model, step
