"""The fine-tuning loop: sharded jit step, AdamW, Orbax checkpoints, metrics, evaluation.

  python -m jaxlm.train --config=configs/tiny_kv.py --workdir=runs/tiny
  python -m jaxlm.train --config=configs/mistral7b_simple_kv.py --workdir=gs://... \\
      --config.init_from=/ckpt/Mistral-7B-Instruct-v0.1 --config.mesh.fsdp=-1
  python -m jaxlm.train --config=configs/mistral7b_simple_kv.py --aot_only   # does it fit?

A run resumes automatically from the newest readable checkpoint in WORKDIR/checkpoints
(model, optimizer, step and data-iterator state; an unreadable newest one is reported and
the previous one used). SIGTERM saves a checkpoint and exits cleanly. The step is
`jax.jit` with the parameters, optimizer state and batch placed by the logical-axis
rules of `jaxlm.sharding`, the state donated, and gradient accumulation inside the step
(the loss is summed over micro-batches and divided by the answer-token count once, so
accumulation does not change the result).

Config files and their checks live in jaxlm.config, checkpoints in jaxlm.checkpoint, the
mesh in jaxlm.sharding, the will-it-fit compile in jaxlm.aot; this module is the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from jax.sharding import NamedSharding
from ml_collections import config_flags

from jaxlm import checkpoint as ckpt
from jaxlm.aot import BATCH_KEYS, step_input_avals
from jaxlm import config as config_lib
from jaxlm import convert, flops, freeze, lora
from jaxlm import sharding as shd
from jaxlm import workdir as workdir_lib
from jaxlm.data.pipeline import DataConfig, make_dataset
from jaxlm.model import init_model
# Moved to jaxlm.config and jaxlm.checkpoint; kept here for scripts that import them from
# the trainer.
from jaxlm.config import (ConfigError, RUN_FIELDS, load_config_file,  # noqa: F401
                          load_run_tokenizer, model_config, validate)
from jaxlm.checkpoint import restore_model  # noqa: F401

dataclass_fields = config_lib.run_fields
_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Command-line flags, defined only when the trainer is the program."""
  _FLAGS['config'] = config_flags.DEFINE_config_file('config', None, 'training config file',
                                                     lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'run directory (checkpoints, metrics, outputs)')
  _FLAGS['aot_only'] = flags.DEFINE_boolean('aot_only', False,
                                            'compile the train step, report memory, exit')
  _FLAGS['restart'] = flags.DEFINE_boolean(
      'restart', False, 'start WORKDIR over: the run in it moves to WORKDIR/previous/<time>/')
  _FLAGS['reevaluate'] = flags.DEFINE_boolean(
      'reevaluate', False, 'a finished run: evaluate and export it again')
  _FLAGS['topology'] = flags.DEFINE_string(
      'topology', None, 'with --aot_only: compile for a TPU topology (v5p-32, v5e-16, v6e-8, '
      '2xv5p-32 for two slices) instead of this machine; needs libtpu')


# ----------------------------------------------------------------------------- the step


def make_schedule(t):
  decay_steps = max(1, t.steps - t.warmup_steps)
  end = t.lr * t.end_lr_frac
  decay = {'cosine': optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.end_lr_frac),
           'linear': optax.linear_schedule(t.lr, end, decay_steps),
           'constant': optax.constant_schedule(t.lr)}[t.schedule]
  if not t.warmup_steps:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, t.lr, t.warmup_steps), decay],
                              [t.warmup_steps])


def make_optimizer(t, schedule):
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # not norm scales
  return optax.chain(
      optax.clip_by_global_norm(t.clip_norm) if t.clip_norm else optax.identity(),
      optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                  mask=decay_mask))


def answer_positions(loss_mask_BxT: jax.Array, k: int) -> jax.Array:
  """int32 [B, k]: the first k positions of each row whose target carries loss, in order,
  then other positions (whose mask is 0) to fill the row."""
  order = jnp.argsort(1 - loss_mask_BxT.astype(jnp.int32), axis=1, stable=True)
  return order[:, :k].astype(jnp.int32)


def loss_sums(model, batch, loss_positions: int = 0):
  """(sum of answer-token cross-entropies, (answer-token count, correct answer tokens)):
  the paper's loss, on the tokens whose loss_mask is 1 (padding never is).
  loss_positions=K > 0 computes the output projection only at the first K answer positions
  of each row (the trainer checks that no row has more), which is the same loss for a
  fraction of the head's cost."""
  targets, mask = batch['targets'], batch['loss_mask']
  kwargs = {}
  if loss_positions:
    idx_BxP = answer_positions(mask, loss_positions)
    targets, mask = (jnp.take_along_axis(x, idx_BxP, axis=1) for x in (targets, mask))
    kwargs['logit_positions_BxP'] = idx_BxP
  # the pipeline's rows: positions run 0..n-1 within each segment (fused kernels apply)
  logits = model(batch['inputs'], batch['positions'], segment_ids_BxT=batch['segment_ids'],
                 segment_positions=True, **kwargs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
  return jnp.sum(ce * mask), (jnp.sum(mask), jnp.sum(correct))


def make_train_step(graphdef, grad_accum: int, schedule, loss_positions: int = 0,
                    trainable=nnx.Param, dropout_seed: int | None = None):
  """step(state, batch) -> (state, metrics): the gradient of the answer loss summed over
  grad_accum micro-batches and divided by the answer-token count once (accumulation does
  not change the result), then the optimizer's update, applied only when the loss and the
  gradient norm are finite (metrics['skipped'] is 1 and the state is returned unchanged
  otherwise; the loop decides whether to stop).
  trainable: the nnx filter of what is differentiated and updated (jaxlm.lora.TRAINABLE
  for LoRA: the adapters). dropout_seed: LoRA dropout masks drawn from this seed, the step
  and the micro-batch (a resumed run draws the same ones); None: no dropout."""
  def train_step(state, batch):
    batch = dict(batch)
    stop = batch.pop('stop', None)   # several processes: one stop flag per device
    before = jax.tree.leaves(state)
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    model_def, params, rest = nnx.split(model, trainable, ...)
    grad_fn = jax.value_and_grad(
        lambda params, mb: loss_sums(nnx.merge(model_def, params, rest), mb,
                                     loss_positions=loss_positions), has_aux=True)
    step_key = None if dropout_seed is None else jax.random.fold_in(
        jax.random.key(dropout_seed), step)

    def accumulate(carry, xs):
      mb, i = xs
      grads, loss, count, correct = carry
      key = None if step_key is None else jax.random.fold_in(step_key, i)
      with lora.dropout_key(key):
        (l, (n, c)), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, g), loss + l, count + n, correct + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (grads, loss, count, correct), _ = jax.lax.scan(
        accumulate, init, (micro, jnp.arange(grad_accum, dtype=jnp.int32)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    optimizer.update(model, grads)
    after = nnx.state((model, optimizer))
    # a non-finite step changes nothing (an elementwise select: fused into the update)
    kept = [jnp.where(finite, a, b) for a, b in zip(jax.tree.leaves(after), before)]
    metrics = {'loss': loss / denom, 'token_accuracy': correct / denom,
               'answer_tokens': count, 'grad_norm': grad_norm, 'lr': schedule(step),
               'skipped': 1.0 - finite.astype(jnp.float32)}
    if stop is not None:   # the same on every process: a collective over the devices
      metrics['stop'] = jnp.max(stop).astype(jnp.float32)
    return jax.tree.unflatten(jax.tree.structure(after), kept), metrics
  return train_step


# ----------------------------------------------------------------------------- run


class MetricWriter:
  """metrics.jsonl (one object per logged step) and TensorBoard event files."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter
      self.jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, Any]):
    if not self.enabled:
      return
    clean = {k: (float(v) if v is not None else None) for k, v in metrics.items()}
    self.jsonl.write(json.dumps({'step': step, **clean}) + '\n')
    self.jsonl.flush()
    for k, v in clean.items():
      if v is not None:
        self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _print(line: str) -> None:
  print(line, flush=True)   # progress must show promptly when piped to a file


def initialize_distributed() -> None:
  """Join a multi-process JAX runtime. On TPU pods and SLURM clusters JAX finds its
  peers itself; elsewhere (several processes on one machine, custom launchers) set
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. CPU processes talk
  through gloo collectives."""
  if jax.distributed.is_initialized():
    return
  env = os.environ
  kwargs = {}
  if 'JAX_COORDINATOR_ADDRESS' in env:
    kwargs = dict(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                  num_processes=int(env['JAX_NUM_PROCESSES']),
                  process_id=int(env['JAX_PROCESS_ID']))
  if os.environ.get('JAX_PLATFORMS', '') == 'cpu':
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(**kwargs)


def _step_maker(c, cfg):
  schedule = make_schedule(c.train)
  lcfg = lora.LoRAConfig.from_config(c)
  dropout_seed = c.seed + 7919 if lcfg.enabled and lcfg.dropout else None
  return schedule, lambda graphdef: make_train_step(
      graphdef, c.train.grad_accum, schedule, c.train.loss_positions,
      trainable=freeze.trainable_filter(c, cfg), dropout_seed=dropout_seed)


def compile_only(c, workdir: str, topology: str | None, log=_print) -> dict[str, Any]:
  """--aot_only: compile the train step for this machine's devices (the configured mesh) or
  for a TPU topology (jaxlm.aot), report memory and FLOPs, write WORKDIR/aot.json."""
  from jaxlm import aot
  cfg = model_config(c)
  topo = aot.parse_topology(topology) if topology else None
  devices = None
  if topo:
    devices = aot.topology_devices(topo)
    c = c.copy_and_resolve_references()
    if c.mesh.devices and c.mesh.devices != len(devices):
      log(f'[aot] mesh.devices={c.mesh.devices} ignored: {topo.name} has {len(devices)} devices')
    c.mesh.devices = 0
  elif c.distributed:
    initialize_distributed()
  mesh, shape = config_lib.run_mesh(c, cfg, devices)   # the trainer's mesh, slices included
  if topo and topo.slices > 1:
    log(f'[aot] {topo.slices} slices: the data axis ({shape[0]}) spans them')
  if topo and cfg.attention_impl == 'auto':   # what auto picks on a TPU for training batches
    from jaxlm.attention import choose_impl
    impl, why = choose_impl('auto', T=c.data.seq_len, S=c.data.seq_len, mesh=mesh,
                            custom_positions=True, segments=True,
                            segment_positions=cfg.ring_layout == 'natural', platform='tpu')
    log(f"[aot] attention 'auto' compiles as {impl!r} on a TPU topology ({why})")
    cfg = dataclasses.replace(cfg, attention_impl=impl)
  load_run_tokenizer(c).check_model(cfg)
  schedule, step_maker = _step_maker(c, cfg)
  from jaxlm.attention.splash import compiling_for_tpu
  with compiling_for_tpu() if topo else contextlib.nullcontext():
    report = aot.compile_report(c, cfg, mesh, step_maker,
                                make_optimizer(c.train, schedule), topology=topo, log=log)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'aot.json'), 'w') as f:
      json.dump(report, f, indent=2)
  return report


@dataclasses.dataclass
class _Run:
  """What a training run is built from: model config, mesh, tokenizer, jitted step, state."""
  cfg: Any
  mesh: Any
  tokenizer: Any
  graphdef: Any
  state: Any
  shardings: Any
  batch_sharding: Any
  step_fn: Any

  @property
  def model(self):
    return nnx.merge(self.graphdef, self.state)[0]


def _check(c, workdir: str):
  """Every start-up check, before any file is written or anything compiled: the workdir,
  the config's values, the model, the mesh, the tokenizer against the model, the tasks and
  the chat format. Returns (model config, mesh, mesh shape, tokenizer)."""
  cfg = model_config(c)
  mesh, shape = config_lib.run_mesh(c, cfg)    # validate(): every field's value included
  tokenizer = load_run_tokenizer(c)
  try:
    tokenizer.check_model(cfg)
  except ValueError as e:
    raise ConfigError(f'tokenizer={c.tokenizer or c.init_from!r}: {e}') from None
  config_lib.check_data(c, tokenizer)
  workdir_lib.check_path(workdir)   # last: it creates the (empty) directory
  return cfg, mesh, shape, tokenizer


def _claim(c, workdir: str, restart: bool, log) -> None:
  """Make `workdir` this run's: --restart sets an old run aside; otherwise its config must
  be this run's (workdir.check_resume) and allowed changes are logged."""
  if restart:
    if jax.process_index() == 0 and (moved := workdir_lib.set_aside(workdir)):
      log(f'[train] --restart: moved the previous run in {workdir} to {moved}')
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('jaxlm: workdir set aside')
    return
  for note in workdir_lib.check_resume(workdir, c):
    log(f'[train] {note}')


def _build(c, checked, workdir: str, log) -> _Run:
  """The initial model and optimizer placed in their shardings, the jitted step; writes
  WORKDIR/config.json."""
  cfg, mesh, shape, tokenizer = checked
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:   # atomic: the other processes may be reading it (_claim)
    workdir_lib.write_atomic(os.path.join(workdir, workdir_lib.CONFIG), c.to_json(indent=2))
  schedule, step_maker = _step_maker(c, cfg)
  hook = config_lib.init_hook(c)
  if c.init_from:   # streamed straight into the parameter shardings
    _, model = convert.load_checkpoint(c.init_from, mesh=mesh, **dataclass_fields(cfg))
    if hook:
      log(f'[train] init_hook={c.init_hook!r} skipped: init_from={c.init_from!r} loads '
          f'trained parameters')
  else:
    model = init_model(cfg, seed=c.seed)
    if hook:
      hook(model, tokenizer, c)
  lcfg = lora.LoRAConfig.from_config(c)
  if lcfg.enabled:   # adapters added, the base frozen in the compute dtype
    lora.attach(model, lcfg, seed=c.seed)
    n, total = lora.count(model)
    log(f'[train] LoRA rank {lcfg.rank} (alpha {lcfg.alpha:g}) on {",".join(lcfg.targets)}: '
        f'{n / 1e6:.2f}M trainable parameters ({100 * n / total:.2f}% of {total / 1e6:.1f}M); '
        f'the base is frozen in {cfg.dtype}')
  elif freeze.trainable_layers(c):
    n, total = lora.count(model, freeze.trainable_filter(c, cfg))
    log(f'[train] training the top {freeze.trainable_layers(c)} of {cfg.num_layers} layers '
        f'and the final norm: {n / 1e6:.2f}M trainable parameters '
        f'({100 * n / total:.2f}% of {total / 1e6:.1f}M); the rest is frozen')
  optimizer = nnx.Optimizer(model, make_optimizer(c.train, schedule),
                            wrt=freeze.trainable_filter(c, cfg))
  graphdef, state = nnx.split((model, optimizer))
  shardings = shd.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  seq_sharded = shape[shd.MESH_AXES.index('context')] > 1
  batch_sharding = NamedSharding(mesh, shd.batch_spec(seq_sharded))
  in_batch = {k: batch_sharding for k in BATCH_KEYS}
  if jax.process_count() > 1:   # the stop flag (see _loop): one element per device
    in_batch['stop'] = _stop_sharding(mesh)
  step_fn = jax.jit(step_maker(graphdef), in_shardings=(shardings, in_batch),
                    out_shardings=(shardings, None), donate_argnums=0)
  return _Run(cfg, mesh, tokenizer, graphdef, state, shardings, batch_sharding, step_fn)


def train(c, workdir: str, *, aot_only: bool = False, topology: str | None = None,
          restart: bool = False, reevaluate: bool = False, log=_print) -> dict[str, Any]:
  """Train (or resume) the run `c` in `workdir`; returns a summary dict (step, loss, eval,
  final state). A run that already finished returns {'finished': True, ...} without work
  unless `reevaluate` (its final evaluation and export again); `restart` sets an existing
  run in `workdir` aside and starts over (jaxlm.workdir)."""
  if topology and not aot_only:
    raise ConfigError(f'--topology={topology} only applies with --aot_only (it compiles for '
                      f'TPUs that are not here)')
  if aot_only:
    return compile_only(c, workdir, topology, log)
  if c.distributed:
    initialize_distributed()
  if jax.process_index() != 0:
    log = lambda line: None   # one console, written by process 0
  checked = _check(c, workdir)
  _claim(c, workdir, restart, log)
  done = workdir_lib.finished_step(workdir)
  if done is not None and done >= c.train.steps and not reevaluate:
    log(f'[train] the run in {workdir} finished at step {done} ({workdir_lib.FINISHED}); '
        f'nothing to do (--reevaluate evaluates and exports it again; a larger '
        f'train.steps trains on)')
    return {'finished': True, 'start_step': done, 'step': done}
  run = _build(c, checked, workdir, log)
  data_cfg = DataConfig.from_dict({**c.data.to_dict(), 'global_batch_size': c.train.batch_size})
  data_iter = iter(make_dataset(data_cfg, run.tokenizer, process_index=jax.process_index(),
                                process_count=jax.process_count()))
  mngr = ckpt.manager(workdir, c.train.keep_checkpoints)
  start = ckpt.restore(mngr, run.state, run.shardings, data_iter, log) or 0
  if start:
    log(f'[train] resumed from step {start} in {workdir}')
  _check_space(c, run, workdir, start, log)
  writer = MetricWriter(workdir, jax.process_index() == 0)
  result: dict[str, Any] = {'start_step': start}
  complete = False
  try:
    with jax.set_mesh(run.mesh):
      if c.eval.before and start == 0:
        compiling = _CompileAhead(run, c.train.batch_size, c.data.seq_len)
        _evaluate(c, run.model, run.tokenizer, workdir, 0, writer, log, before=True)
        compiling.join(log)
      log(f'[train] {run.cfg.num_params() / 1e6:.1f}M params, mesh {dict(run.mesh.shape)}, '
          f'{c.train.steps} steps of {c.train.batch_size} x {c.data.seq_len} tokens')
      _loop(c, run, data_iter, mngr, writer, workdir, start, result, log)
      complete = result['step'] >= c.train.steps and not result.get('stopped')
      if complete:   # while the last checkpoint is still being written
        _finish(c, run, workdir, result, log)
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
  if complete and jax.process_index() == 0:   # only once the last checkpoint is on disk
    workdir_lib.mark_finished(workdir, result['step'])
  result['state'], result['graphdef'] = run.state, run.graphdef
  return result


def _nbytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def _check_space(c, run, workdir: str, start: int, log) -> None:
  """Before the first step: the workdir's disk can take a checkpoint (and the export);
  workdir.check_space. On several processes only process 0 looks, and warns: one process
  raising alone would leave the others waiting."""
  t = c.train
  saves = t.steps // t.checkpoint_every - start // t.checkpoint_every + bool(
      t.steps % t.checkpoint_every)
  if saves <= 0 or jax.process_index() != 0:
    return
  note = workdir_lib.check_space(   # run.state: (the model's, the optimizer's)
      workdir, checkpoint_bytes=_nbytes(run.state), checkpoints=min(saves, t.keep_checkpoints + 1),
      export_bytes=_nbytes(run.state[0]) if c.export_hf else 0,
      strict=jax.process_count() == 1)
  if note:
    log(f'[train] warning: {note}')


class _CompileAhead:
  """Lowers and compiles the train step (and the state check before each save,
  `all_finite`) on a background thread, e.g. while the evaluation before fine-tuning runs:
  jit's cache then holds the executables, so the first step starts at once instead of
  compiling (~20 s for SmolLM2 on 2 cores; the check ~4 s at the first save). The inputs
  are built from their shapes and shardings (the state's, and int32 [batch, seq_len] for
  each batch field), as `_next_batch` makes them; an error in the thread is raised by
  join()."""

  def __init__(self, run, batch_size: int, seq_len: int):
    self.error: BaseException | None = None
    self.seconds = 0.0
    state, batch = step_input_avals(run.state, run.shardings, run.batch_sharding, batch_size,
                                    seq_len)
    if jax.process_count() > 1:   # the stop flag, as _next_batch adds it
      batch['stop'] = jax.ShapeDtypeStruct((run.mesh.size,), jnp.int32,
                                           sharding=_stop_sharding(run.mesh))

    def work():
      t0 = time.perf_counter()
      try:
        with jax.set_mesh(run.mesh):
          run.step_fn.lower(state, batch).compile()
          all_finite.lower(state).compile()
      except BaseException as e:   # noqa: BLE001 (re-raised by join)
        self.error = e
      self.seconds = time.perf_counter() - t0

    self.thread = threading.Thread(target=work, name='jaxlm-compile-step', daemon=True)
    self.thread.start()

  def join(self, log) -> None:
    self.thread.join()
    if self.error is not None:
      raise self.error
    log(f'[train] the train step compiled in {self.seconds:.1f} s, alongside the evaluation')


class _Clock:
  """Step time, throughput, MFU and ETA over the steps since the last logged one."""

  def __init__(self, c, run, start: int):
    self.c, self.cfg, self.devices = c, run.cfg, run.mesh.size
    self.lora = lora.LoRAConfig.from_config(c)
    self.peak = flops.device_peak(c.train.peak_flops_per_device)
    self.tokens = c.train.batch_size * c.data.seq_len
    self.reset(start)

  def reset(self, step: int) -> None:   # after an evaluation: keep it out of the step time
    self.time, self.step = time.perf_counter(), step

  def line(self, step: int, metrics) -> tuple[dict[str, float], str]:
    now = time.perf_counter()
    dt = (now - self.time) / max(1, step - self.step)
    self.reset(step)
    t = self.c.train
    m = {k: float(v) for k, v in metrics.items() if k != 'stop'}
    m.update(step_time=dt, tokens_per_s=self.tokens / dt,
             mfu=flops.mfu(self.tokens / dt, self.cfg, self.c.data.seq_len, self.devices,
                           self.peak, head_positions=t.loss_positions, lora=self.lora,
                           trainable_layers=freeze.trainable_layers(self.c)))
    line = (f'[train] step {step}/{t.steps} loss {m["loss"]:.4f} '
            f'acc {m["token_accuracy"]:.3f} lr {m["lr"]:.2e} gnorm {m["grad_norm"]:.2f} '
            f'{m["tokens_per_s"]:,.0f} tok/s {dt:.2f}s/step'
            + (f' MFU {100 * m["mfu"]:.1f}%' if m['mfu'] is not None else '')
            + f' ETA {(t.steps - step) * dt:.0f}s')
    return m, line


def _loop(c, run, data_iter, mngr, writer, workdir, start, result, log) -> None:
  """Steps start+1 .. train.steps: log, evaluate, checkpoint; SIGTERM or Ctrl-C saves and
  stops (a second Ctrl-C aborts). Each step's loss and gradient norm are read one step
  late (_Guard), so that the host builds the next batch while the device runs this step;
  a step is settled before it is logged, evaluated or saved, and the state is checked
  before each save, so nothing non-finite reaches a checkpoint."""
  t = c.train
  stop = _StopSignals(log)
  clock, step, guard = _Clock(c, run, start), start, _Guard(c, mngr, workdir, log)
  zigzag = _zigzag_permutation(c, run)
  one = jax.process_count() == 1
  try:
    while step < t.steps:
      batch = _next_batch(c, run, data_iter, step + 1, zigzag, stop=bool(stop.signal))
      run.state, metrics = run.step_fn(run.state, batch)
      step += 1
      guard.push(step, metrics)
      if step % t.log_every == 0 or step == t.steps:
        guard.settle()
        m, line = clock.line(step, metrics)
        writer.write(step, m)
        log(line)
        result['loss'] = m['loss']
      if c.eval.every and step % c.eval.every == 0 and step < t.steps:
        guard.settle()
        _evaluate(c, run.model, run.tokenizer, workdir, step, writer, log)
        clock.reset(step)
      _inject_faults(c, step, mngr)
      # One process stops at once; several stop together, when a settled step's stop flag
      # (a max over every device) shows that any of them was signalled.
      stopping = bool(stop.signal) if one else guard.stop_requested
      if step % t.checkpoint_every == 0 or step == t.steps or stopping:
        guard.settle()
        guard.check_state(run, step)
        ckpt.save(mngr, step, run.state, data_iter)
      if stopping:
        name = stop.signal or 'a stop signal on another process'
        log(f'[train] {name}: saved the checkpoint at step {step}; exiting')
        result['stopped'] = name
        break
  finally:
    stop.restore()
    result['step'] = step
    result['skipped_steps'] = guard.skipped


class _StopSignals:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save and stop after the
  current step; a second Ctrl-C raises KeyboardInterrupt at once (nothing saved)."""

  def __init__(self, log):
    self.signal, self.log = None, log
    self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.signal == 'SIGINT':
      raise KeyboardInterrupt('a second Ctrl-C: aborted without saving')
    self.signal = signal.Signals(signum).name
    if signum == signal.SIGINT:
      self.log('[train] Ctrl-C: saving a checkpoint after this step and stopping '
               '(Ctrl-C again aborts without saving)')

  def restore(self):
    for s, handler in self.previous.items():
      signal.signal(s, handler)


class NonFiniteError(FloatingPointError):
  """A step with a non-finite loss or gradient norm (its update was not applied), or a
  non-finite state before a save; names the step and the last finite checkpoint."""


class _Guard:
  """Reads each dispatched step's loss and gradient norm one step late and acts on a
  non-finite step, whose update the step did not apply: train.on_nonfinite='stop' ends the
  run; 'skip' logs it and goes on, unless train.max_skipped_steps steps in a row were
  skipped. check_state() is the final check before a save."""

  def __init__(self, c, mngr, workdir: str, log):
    self.c, self.mngr, self.workdir, self.log = c, mngr, workdir, log
    self.pending, self.skipped, self.in_a_row = None, 0, 0
    self.stop_requested = False   # several processes: a settled step's stop flag

  def push(self, step: int, metrics) -> None:
    self.settle()
    self.pending = (step, metrics)

  def settle(self) -> None:
    if self.pending is None:
      return
    (step, m), self.pending = self.pending, None
    loss, gnorm, skipped, stop = (float(x) for x in jax.device_get(
        (m['loss'], m['grad_norm'], m['skipped'], m.get('stop', 0.0))))
    self.stop_requested = self.stop_requested or stop > 0
    if not skipped and math.isfinite(loss) and math.isfinite(gnorm):
      self.in_a_row = 0
      return
    self.skipped, self.in_a_row = self.skipped + 1, self.in_a_row + 1
    what = (f'non-finite {"loss" if not math.isfinite(loss) else "gradient norm"} at step '
            f'{step} (loss {loss}, gradient norm {gnorm}); its update was not applied')
    t = self.c.train
    if t.on_nonfinite == 'skip' and self.in_a_row < t.max_skipped_steps:
      self.log(f'[train] WARNING: {what}; skipped ({self.skipped} steps skipped so far)')
      return
    why = (f' ({self.in_a_row} in a row = train.max_skipped_steps)'
           if t.on_nonfinite == 'skip' else '')
    raise NonFiniteError(f'{what}; the run stops{why}. {self._last()}')

  def _last(self) -> str:
    self.mngr.wait_until_finished()
    last = self.mngr.latest_step()
    if last is None:
      return 'No checkpoint was saved yet: a rerun starts from step 0.'
    return (f'The last finite checkpoint is step {last} in {self.workdir}/checkpoints; it '
            f'resumes cleanly (lower train.lr, or train.on_nonfinite=\'skip\').')

  def check_state(self, run, step: int) -> None:
    """Every floating-point value of the state is finite (else NonFiniteError, not saved)."""
    if not bool(all_finite(run.state)):
      raise NonFiniteError(f'the state after step {step} holds non-finite values; it was not '
                           f'saved and the run stops. {self._last()}')


@jax.jit
def all_finite(state) -> jax.Array:
  """Whether every floating-point value of `state` is finite (a boolean scalar)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def _next_batch(c, run, data_iter, step: int, zigzag, stop: bool = False
                ) -> dict[str, jax.Array]:
  """This process's rows of the next global batch, placed into the batch sharding; with
  several processes also this process's stop flag (one element per local device)."""
  batch = {k: jax.make_array_from_process_local_data(run.batch_sharding, v)
           for k, v in _host_batch(c, data_iter, step, zigzag).items()}
  if jax.process_count() > 1:
    sharding = _stop_sharding(run.mesh)
    n = len(run.mesh.local_devices)
    batch['stop'] = jax.make_array_from_process_local_data(
        sharding, np.full([n], int(stop), np.int32), (run.mesh.size,))
  return batch


def _stop_sharding(mesh) -> NamedSharding:
  """Where the multi-process stop flag lives: one element per device."""
  return NamedSharding(mesh, jax.sharding.PartitionSpec(mesh.axis_names))


def _host_batch(c, data_iter, step: int, zigzag) -> dict[str, np.ndarray]:
  local = {k: np.asarray(v) for k, v in next(data_iter).items()}
  _check_answer_tokens(local['loss_mask'], c.train.loss_positions, step)
  if zigzag is not None:   # ring attention's zigzag layout, permuted once on the host
    local = {k: v[:, zigzag] for k, v in local.items()}
  return local


def _zigzag_permutation(c, run) -> np.ndarray | None:
  """model.ring_layout='zigzag' with a context axis: the sequence order the ring kernel
  reads (jaxlm.attention.ring.zigzag_indices); None: batches stay in natural order."""
  n = run.mesh.shape['context']
  if run.cfg.ring_layout != 'zigzag' or n == 1:
    return None
  from jaxlm.attention.ring import zigzag_indices
  return zigzag_indices(c.data.seq_len, n)


def _inject_faults(c, step: int, mngr) -> None:
  """debug.kill_at_step / sigterm_at_step / sigint_at_step: a crash, a preemption or a
  Ctrl-C after that step, for the resume tests."""
  if c.debug.kill_at_step and step == c.debug.kill_at_step:
    mngr.wait_until_finished()
    os.kill(os.getpid(), signal.SIGKILL)
  if c.debug.get('signal_process', -1) not in (-1, jax.process_index()):
    return   # the signals below go to one process only
  if c.debug.sigterm_at_step and step == c.debug.sigterm_at_step:
    os.kill(os.getpid(), signal.SIGTERM)
  if c.debug.get('sigint_at_step') and step == c.debug.sigint_at_step:
    os.kill(os.getpid(), signal.SIGINT)


def _finish(c, run, workdir: str, result, log) -> None:
  """After the last step: the final evaluation and the Hugging Face export (the caller
  marks the run finished once its last checkpoint is written)."""
  model = run.model
  if c.eval.every is not None and c.eval.per_position:
    result['eval'] = _evaluate(c, model, run.tokenizer, workdir, result['step'], None, log,
                               final=True)
  if c.export_hf:
    lcfg = lora.LoRAConfig.from_config(c)
    if lcfg.enabled:   # the adapters alone (PEFT's format), then the merged model
      lora.save_peft(model, lcfg, os.path.join(workdir, 'hf_adapter'),
                     base_model_name_or_path=c.init_from)
      log(f'[train] exported the LoRA adapter (Hugging Face PEFT format) to '
          f'{workdir}/hf_adapter')
      model = lora.merge(model)
    convert.save_hf(run.cfg, model, os.path.join(workdir, 'hf'))
    if jax.process_index() == 0:
      run.tokenizer.save_hf(os.path.join(workdir, 'hf'))
    log(f'[train] exported a Hugging Face checkpoint to {workdir}/hf'
        + (' (adapters merged)' if lcfg.enabled else ''))


def _check_answer_tokens(loss_mask, k: int, step: int) -> None:
  """With train.loss_positions=k, no row may carry more than k answer tokens."""
  if k and (n := int(np.asarray(loss_mask).sum(axis=1).max())) > k:
    raise ConfigError(f'train.loss_positions={k} but a row of the batch for step {step} has '
                      f'{n} answer tokens; raise it (0: logits at every position)')


def _evaluate(c, model, tokenizer, workdir, step, writer, log, final=False, before=False):
  """Held-out retrieval accuracy by gold position. `before`: of the initial model, kept in
  WORKDIR/eval_kv_before.json; `final`: WORKDIR/eval_kv.json (+ .png), with the `before`
  result beside it when there is one, and the task fields."""
  from jaxlm.data.tasks import eval_task
  from jaxlm.evaluate import retrieval
  e = c.eval
  task, fields = eval_task(c)
  result = retrieval.evaluate_retrieval(
      model, tokenizer, task, fields,
      positions=list(e.positions), per_position=e.per_position, seed=e.seed,
      chat_format=c.data.chat_format, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
      verbose=jax.process_index() == 0)   # progress lines with rate and ETA
  result['step'] = step
  log(f'[eval] {"before fine-tuning" if before else f"step {step}"}: held-out accuracy '
      f'{result["accuracy"]:.3f} (value {result["value_accuracy"]:.3f})')
  if writer is not None and not before:
    writer.write(step, {'eval_accuracy': result['accuracy'],
                        'eval_value_accuracy': result['value_accuracy']})
  main = jax.process_index() == 0
  before_file = os.path.join(workdir, 'eval_kv_before.json')
  if before and main:
    log(retrieval.format_table(result))
    retrieval.write(result, before_file)
  if final and main:
    result['task'] = {'name': task, **fields}
    if os.path.exists(before_file):
      with open(before_file) as f:
        result['before'] = {k: v for k, v in json.load(f).items()
                            if k not in ('predictions', 'samples')}
    log(retrieval.format_table(result, result.get('before')))
    retrieval.write(result, os.path.join(workdir, 'eval_kv.json'),
                    os.path.join(workdir, 'eval_kv.png'))
    log(f'[eval] wrote {workdir}/eval_kv.json and {workdir}/eval_kv.png')
  return result


def _parse_flags(argv):
  """absl's flag parsing, with a config that cannot load or an unknown or malformed
  --config.FIELD reported in one line (`config error: ...`), not a traceback."""
  try:
    rest = flags.FLAGS(argv)
    if _FLAGS['config'].value is None:
      sys.exit('config error: --config=configs/NAME.py is required')
    _FLAGS['config'].value.keys()   # a config that failed to load raises here
    return rest
  except flags.Error as e:          # e.g. --config.train.steps=abc
    sys.exit(f'config error: {e}')
  except OSError as e:              # the config file is missing or fails to load
    path = next((a.split('=', 1)[1] for a in argv if a.startswith('--config=')), '?')
    cause = e.__cause__ or e
    sys.exit(f'config error: --config={path}: cannot load it ({type(cause).__name__}: '
             f'{str(cause).splitlines()[-1].strip() if str(cause) else cause})')
  except (AttributeError, KeyError) as e:   # ml_collections: no such --config.FIELD
    field = next((a for a in argv if a.startswith('--config.')
                  and re.search(rf"\b{re.escape(a.split('=')[0].rsplit('.', 1)[-1])}\b",
                                str(e).split('Did you mean')[0])), '--config.?')
    hint = re.search(r'Did you mean "([^"]+)"', str(e))
    sys.exit(f'config error: {field}: no such config field'
             + (f' (did you mean {hint.group(1)!r}?)' if hint else ''))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  workdir = _FLAGS['workdir'].value or os.environ.get('WORKDIR') or 'runs/default'
  try:
    train(_FLAGS['config'].value, workdir, aot_only=_FLAGS['aot_only'].value,
          topology=_FLAGS['topology'].value, restart=_FLAGS['restart'].value,
          reevaluate=_FLAGS['reevaluate'].value)
  except ConfigError as e:
    sys.exit(f'config error: {e}')
  except workdir_lib.PathError as e:
    sys.exit(f'path error: {e}')
  except ckpt.CheckpointMismatchError as e:
    sys.exit(f'checkpoint error: {e}')
  except NonFiniteError as e:
    sys.exit(f'training stopped: {e}')
  except KeyboardInterrupt as e:
    print(f'[train] {e or "interrupted"}', file=sys.stderr)
    sys.exit(130)
  except ValueError as e:   # jaxlm.aot.TopologyError: a bad --topology or no libtpu
    if type(e).__name__ != 'TopologyError':
      raise
    sys.exit(f'topology error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=_parse_flags)
