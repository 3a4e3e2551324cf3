"""Orbax checkpoints of a training run: WORKDIR/checkpoints/<step>/.

A checkpoint holds `state` (nnx.split((model, optimizer)) as a pure dict: parameters,
optimizer moments, step) and `data_stream` (the data iterator's state as JSON; the stream
is the same on every process, so any process count can resume it). Restoring reads each
array straight into the sharding the restoring run asks for, so a run may resume on another
mesh or device count. The newest readable checkpoint wins: an unreadable one (a crash while
writing, a truncated copy) is reported, skipped and deleted.

    mngr = manager(workdir, keep=3)
    save(mngr, step, state, data_iter)
    step = restore(mngr, state, shardings, data_iter, log)     # None: nothing to resume
    cfg, model, step = restore_model(c, workdir, mesh)           # parameters only
"""

from __future__ import annotations

import dataclasses
import os

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


def restore(mngr, state, shardings, data_iter, log) -> int | None:
  """Restore the newest readable checkpoint into (state, data_iter), each array into its
  sharding in `shardings`; returns its step, or None when there is none."""
  import orbax.checkpoint as ocp
  abstract = _abstract(state, shardings)
  unreadable = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      restored = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # noqa: BLE001  (any unreadable checkpoint: fall back)
      log(f'[train] checkpoint at step {step} is unreadable ({type(e).__name__}: '
          f'{str(e)[:200]}); trying the previous one')
      unreadable.append(step)
      continue
    nnx.replace_by_pure_dict(state, restored['state'])
    _restore_data(mngr, step, data_iter, log)
    for bad in unreadable:   # training will write these steps again
      log(f'[train] deleting the unreadable checkpoint at step {bad}')
      mngr.delete(bad)
    return step
  return None


def _restore_data(mngr, step: int, data_iter, log) -> None:
  import orbax.checkpoint as ocp
  if (mngr.directory / str(step) / 'data_stream').exists():
    data_iter.set_state(mngr.restore(step, args=ocp.args.Composite(
        data_stream=ocp.args.JsonRestore()))['data_stream'])
    return
  # Checkpoints written before data_stream (December 2026) hold grain's per-process
  # files under `data`; a one-process stream then was the global stream it is now.
  try:
    if jax.process_count() != 1:
      raise ValueError('written per process')
    import grain
    mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
  except Exception as e:  # noqa: BLE001
    log(f'[train] WARNING: the data-iterator state at step {step} cannot be restored '
        f'({str(e)[:200]}); the data stream restarts from its beginning (examples may repeat)')


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
  abstract_model = nnx.eval_shape(lambda: init_model(cfg))
  graphdef, abstract = nnx.split(abstract_model)
  target = _abstract(abstract, shd.state_shardings(abstract, mesh))
  # The saved tree is nnx.split((model, optimizer)): the model's subtree is key 0.
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={0: target}, partial_restore=True)))
  nnx.replace_by_pure_dict(abstract, restored['state'][0])
  model = nnx.merge(graphdef, abstract)
  mngr.close()
  return cfg, model, step
