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
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
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

from jaxlm import convert, flops
from jaxlm import sharding as shd
from jaxlm.data.pipeline import DataConfig, make_dataset
from jaxlm.embed_init import compose_embeddings, piece_splits
from jaxlm.model import MistralConfig, get_config, init_model
from jaxlm.tokenizer import load_tokenizer

_FLAGS: dict[str, Any] = {}


def _define_flags() -> None:
  """Command-line flags, defined only when the trainer is the program (other entry
  points, e.g. python -m jaxlm.evaluate, import this module and define their own)."""
  _FLAGS['config'] = config_flags.DEFINE_config_file('config', None, 'training config file',
                                                     lock_config=True)
  _FLAGS['workdir'] = flags.DEFINE_string('workdir', None,
                                          'run directory (checkpoints, metrics, outputs)')
  _FLAGS['aot_only'] = flags.DEFINE_boolean('aot_only', False,
                                            'compile the train step, report memory, exit')
  _FLAGS['topology'] = flags.DEFINE_string(
      'topology', None, 'with --aot_only: compile for a TPU topology (v5p-32, v5e-16, v6e-8, '
      '2xv5p-32 for two slices) instead of this machine; needs libtpu')


def load_config_file(path: str):
  """get_config() of a config file (configs/NAME.py), as --config=PATH would load it."""
  import importlib.util
  if not os.path.exists(path):
    raise ConfigError(f'config file {path!r} not found')
  spec = importlib.util.spec_from_file_location('_jaxlm_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field and value."""


# ----------------------------------------------------------------------------- set-up


# Model config fields that a run chooses and a checkpoint does not: numerics and kernels.
RUN_FIELDS = ('param_dtype', 'dtype', 'attention_impl', 'attention_block_q',
              'attention_block_kv', 'ring_layout', 'remat')


def _check_init(c) -> None:
  """How the parameters start: checked before any checkpoint is read."""
  if c.embed_init not in ('random', 'compose'):
    raise ConfigError(f"embed_init={c.embed_init!r} must be 'random' or 'compose'")
  if c.embed_init == 'compose' and c.init_from:
    raise ConfigError(f"embed_init='compose' initializes a model trained from scratch, but "
                      f"init_from={c.init_from!r} loads trained embeddings; drop one "
                      f"(--config.embed_init=random keeps init_from)")


def model_config(c) -> MistralConfig:
  """The model a run trains: the preset with config.model's fields, or, with init_from,
  the checkpoint's architecture with config.model's numerics (RUN_FIELDS). An
  architecture field of config.model that contradicts the checkpoint is an error."""
  _check_init(c)
  fields = {k: v for k, v in c.model.items() if k != 'preset'}
  if not c.init_from:
    try:
      return get_config(c.model.preset, **fields)
    except ValueError as e:
      raise ConfigError(f'config.model: {e}') from None
  try:
    cfg = convert.checkpoint_config(c.init_from, **{k: v for k, v in fields.items()
                                                    if k in RUN_FIELDS})
  except (ValueError, OSError) as e:
    raise ConfigError(f'init_from={c.init_from!r}: {e}') from None
  for k, v in fields.items():
    if k not in RUN_FIELDS and k != 'initializer_range' and getattr(cfg, k, v) != v:
      raise ConfigError(f'config.model.{k}={v!r} but the checkpoint init_from={c.init_from!r} '
                        f'has {k}={getattr(cfg, k)!r}; the checkpoint defines the architecture')
  return cfg


def load_run_tokenizer(c):
  """config.tokenizer, or the tokenizer of the init_from checkpoint when it is ''."""
  spec = c.tokenizer or c.init_from
  if not spec:
    raise ConfigError("tokenizer='' takes the tokenizer of init_from, but init_from is '' too")
  try:
    return load_tokenizer(spec)
  except (ValueError, OSError) as e:
    raise ConfigError(f'tokenizer={spec!r}: {e}') from None


def validate(c, cfg: MistralConfig, num_devices: int) -> tuple[int, ...]:
  """Start-up checks with clear errors; returns the resolved mesh shape."""
  sizes = {k: v for k, v in c.mesh.items() if k != 'devices'}
  if c.mesh.devices:
    if c.mesh.devices > num_devices:
      raise ConfigError(f'mesh.devices={c.mesh.devices} but only {num_devices} devices exist')
    num_devices = c.mesh.devices
  try:
    shape = shd.mesh_shape(sizes, num_devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh: {e}') from None
  sizes = dict(zip(shd.MESH_AXES, shape))
  t = c.train
  batch_par = sizes['data'] * sizes['fsdp']
  if t.batch_size % batch_par:
    raise ConfigError(f'train.batch_size={t.batch_size} is not divisible by data*fsdp='
                      f'{batch_par} (mesh {sizes})')
  if t.batch_size % t.grad_accum or (t.batch_size // t.grad_accum) % batch_par:
    raise ConfigError(f'train.batch_size={t.batch_size} / train.grad_accum={t.grad_accum} must '
                      f'be a whole micro-batch divisible by data*fsdp={batch_par}')
  if cfg.num_kv_heads % sizes['tensor']:
    raise ConfigError(f'mesh.tensor={sizes["tensor"]} does not divide the model\'s '
                      f'num_kv_heads={cfg.num_kv_heads} (or num_heads={cfg.num_heads})')
  if sizes['context'] > 1:
    if cfg.attention_impl not in ('ring', 'auto'):
      raise ConfigError(f'mesh.context={sizes["context"]} needs model.attention_impl=ring '
                        f'(got {cfg.attention_impl!r})')
    if c.data.seq_len % (2 * sizes['context']):
      raise ConfigError(f'mesh.context={sizes["context"]} but data.seq_len={c.data.seq_len} '
                        f'is not divisible by 2*{sizes["context"]}')
  if t.schedule not in ('cosine', 'linear', 'constant'):
    raise ConfigError(f"train.schedule={t.schedule!r} must be 'cosine', 'linear' or 'constant'")
  _check_init(c)
  if t.loss_positions < 0 or (t.loss_positions and t.prompt_loss_weight):
    raise ConfigError(f'train.loss_positions={t.loss_positions} must be >= 0 and 0 when '
                      f'train.prompt_loss_weight={t.prompt_loss_weight} (the prompt loss needs '
                      f'logits at every position)')
  if t.steps <= 0 or t.warmup_steps < 0:
    raise ConfigError(f'train.steps={t.steps} must be positive, train.warmup_steps='
                      f'{t.warmup_steps} non-negative')
  return shape


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


def loss_sums(model, batch, prompt_weight: float = 0.0, loss_positions: int = 0):
  """(objective, (answer-token count, correct answer tokens, answer-token CE sum)).

  The objective is the sum of answer-token cross-entropies (the paper's loss) plus
  `prompt_weight` times that of the other real tokens (an auxiliary language-modelling
  loss that helps a model trained from scratch learn the prompt's structure; 0 for
  fine-tuning). Padding (segment id 0) never counts. loss_positions=K > 0 computes the
  output projection only at the first K answer positions of each row (the trainer checks
  that no row has more), which is the same loss for a fraction of the head's cost."""
  targets, mask = batch['targets'], batch['loss_mask']
  kwargs = {}
  if loss_positions:
    idx_BxK = answer_positions(mask, loss_positions)
    targets, mask = (jnp.take_along_axis(x, idx_BxK, axis=1) for x in (targets, mask))
    kwargs['logit_positions_BxK'] = idx_BxK
  logits = model(batch['inputs'], batch['positions'], segment_ids_BxT=batch['segment_ids'],
                 **kwargs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  mask = mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * mask
  answer = jnp.sum(ce * mask)
  objective = answer
  if prompt_weight:
    prompt = (batch['segment_ids'] > 0).astype(jnp.float32) * (1.0 - mask)
    objective = answer + prompt_weight * jnp.sum(ce * prompt)
  return objective, (jnp.sum(mask), jnp.sum(correct), answer)


def make_train_step(graphdef, grad_accum: int, schedule, prompt_loss_weight: float = 0.0,
                    loss_positions: int = 0):
  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    micro = jax.tree.map(lambda x: x.reshape(grad_accum, -1, *x.shape[1:]), batch)
    model_def, params, rest = nnx.split(model, nnx.Param, ...)
    grad_fn = jax.value_and_grad(
        lambda params, mb: loss_sums(nnx.merge(model_def, params, rest), mb,
                                     prompt_weight=prompt_loss_weight,
                                     loss_positions=loss_positions), has_aux=True)

    def accumulate(carry, mb):
      grads, objective, loss, count, correct = carry
      (o, (n, c, l)), g = grad_fn(params, mb)
      return (jax.tree.map(jnp.add, grads, g), objective + o, loss + l, count + n,
              correct + c), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.float32(0), jnp.float32(0), jnp.float32(0), jnp.float32(0))
    (grads, objective, loss, count, correct), _ = jax.lax.scan(accumulate, init, micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    step = optimizer.step[...]
    optimizer.update(model, grads)
    metrics = {'loss': loss / denom, 'objective': objective / denom,
               'token_accuracy': correct / denom,
               'answer_tokens': count, 'grad_norm': optax.tree.norm(grads),
               'lr': schedule(step)}
    return nnx.state((model, optimizer)), metrics
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


def _checkpointer(workdir, keep):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                           create=True))


def _save(mngr, step, state, data_iter):
  import grain
  import orbax.checkpoint as ocp
  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
      data=grain.checkpoint.CheckpointSave(data_iter)), force=True)


def _restore(mngr, state, shardings, data_iter, log):
  """Restore the newest readable checkpoint into (state, data_iter); returns its step
  or None. An unreadable checkpoint is reported and the one before it tried."""
  import grain
  import orbax.checkpoint as ocp
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nnx.to_pure_dict(state), nnx.to_pure_dict(shardings))
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
    try:
      mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iter)))
    except Exception as e:  # noqa: BLE001
      # Saved by a different number of processes: per-process data slices do not map.
      log(f'[train] WARNING: the data-iterator state at step {step} does not fit this run '
          f'({jax.process_count()} process(es)): {str(e)[:200]}; the data stream restarts '
          f'from its beginning (examples may repeat)')
    for bad in unreadable:   # training will write these steps again
      log(f'[train] deleting the unreadable checkpoint at step {bad}')
      mngr.delete(bad)
    return step
  return None


def restore_model(c, workdir: str, mesh, step: int | None = None):
  """(model config, model, step) from a training run's checkpoint: the parameters only,
  placed straight into their shardings on `mesh` (the optimizer state stays on disk).
  `workdir` is the run directory or its checkpoints/ folder; step None: the newest."""
  import orbax.checkpoint as ocp
  cfg = model_config(c)
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
  shardings = shd.state_shardings(abstract, mesh)
  target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        nnx.to_pure_dict(abstract), nnx.to_pure_dict(shardings))
  # The saved tree is nnx.split((model, optimizer)): the model's subtree is key 0.
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item={0: target}, partial_restore=True)))
  nnx.replace_by_pure_dict(abstract, restored['state'][0])
  model = nnx.merge(graphdef, abstract)
  mngr.close()
  return cfg, model, step


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


def compile_only(c, workdir: str, topology: str | None, log=_print) -> dict[str, Any]:
  """--aot_only: compile the train step for this machine's devices (the configured mesh) or
  for a TPU topology (jaxlm.aot), report memory and FLOPs, write WORKDIR/aot.json."""
  from jaxlm import aot
  cfg = model_config(c)
  topo = aot.parse_topology(topology) if topology else None
  if topo:
    devices = aot.topology_devices(topo)
    c = c.copy_and_resolve_references()
    if c.mesh.devices and c.mesh.devices != len(devices):
      log(f'[aot] mesh.devices={c.mesh.devices} ignored: {topo.name} has {len(devices)} devices')
    c.mesh.devices = 0
    if topo.slices > 1 and c.mesh.data == 1:
      c.mesh.data = topo.slices   # data parallel across slices: only gradients cross DCN
      log(f'[aot] {topo.slices} slices: mesh.data set to {topo.slices}')
  else:
    if c.distributed:
      initialize_distributed()
    devices = jax.devices()[:c.mesh.devices] if c.mesh.devices else jax.devices()
  shape = validate(c, cfg, len(devices))
  if topo and topo.slices > 1 and shape[0] % topo.slices:
    raise ConfigError(f'mesh.data={shape[0]} must be a multiple of the {topo.slices} slices of '
                      f'{topo.name} (the data axis spans slices)')
  if topo and cfg.attention_impl == 'auto':   # what auto picks on a TPU for training batches
    impl = 'ring' if shape[shd.MESH_AXES.index('context')] > 1 else 'blockwise'
    log(f"[aot] attention 'auto' compiles as {impl!r} on a TPU topology")
    cfg = dataclasses.replace(cfg, attention_impl=impl)
  mesh = aot.make_mesh(shape, devices, topo)
  load_run_tokenizer(c).check_model(cfg)
  schedule = make_schedule(c.train)
  report = aot.compile_report(
      c, cfg, mesh,
      lambda graphdef: make_train_step(graphdef, c.train.grad_accum, schedule,
                                       c.train.prompt_loss_weight, c.train.loss_positions),
      topology=topo, log=log)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'aot.json'), 'w') as f:
      json.dump(report, f, indent=2)
  return report


def train(c, workdir: str, *, aot_only: bool = False, topology: str | None = None,
          log=_print) -> dict[str, Any]:
  if topology and not aot_only:
    raise ConfigError(f'--topology={topology} only applies with --aot_only (it compiles for '
                      f'TPUs that are not here)')
  if aot_only:
    return compile_only(c, workdir, topology, log)
  if c.distributed:
    initialize_distributed()
  cfg = model_config(c)
  shape = validate(c, cfg, jax.device_count())
  devices = jax.devices()[:c.mesh.devices] if c.mesh.devices else jax.devices()
  mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices)
  is_main = jax.process_index() == 0
  if not is_main:
    log = lambda line: None   # one console, written by process 0
  tokenizer = load_run_tokenizer(c)
  tokenizer.check_model(cfg)
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(c.to_json(indent=2))

  schedule = make_schedule(c.train)
  tx = make_optimizer(c.train, schedule)
  if c.init_from:   # streamed straight into the parameter shardings
    _, model = convert.load_checkpoint(c.init_from, mesh=mesh, **dataclass_fields(cfg))
  else:
    model = init_model(cfg, seed=c.seed)
    if c.embed_init == 'compose':   # merged pieces start from their parts (embed_init.py)
      model.embed[...] = jnp.asarray(compose_embeddings(
          np.asarray(model.embed[...]), piece_splits(tokenizer)), model.embed[...].dtype)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  shardings = shd.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  seq_sharded = shape[shd.MESH_AXES.index('context')] > 1
  batch_sharding = NamedSharding(mesh, shd.batch_spec(seq_sharded))
  step_fn = jax.jit(make_train_step(graphdef, c.train.grad_accum, schedule,
                                    c.train.prompt_loss_weight, c.train.loss_positions),
                    in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                    donate_argnums=0)

  data_cfg = DataConfig.from_dict({**c.data.to_dict(), 'global_batch_size': c.train.batch_size})
  dataset = make_dataset(data_cfg, tokenizer, process_index=jax.process_index(),
                         process_count=jax.process_count())
  data_iter = iter(dataset)
  mngr = _checkpointer(workdir, c.train.keep_checkpoints)
  start = _restore(mngr, state, shardings, data_iter, log) or 0
  if start:
    log(f'[train] resumed from step {start} in {workdir}')
  writer = MetricWriter(workdir, is_main)
  if c.eval.before and start == 0:
    with jax.set_mesh(mesh):
      _evaluate(c, nnx.merge(graphdef, state)[0], tokenizer, workdir, 0, writer, log,
                before=True)
  peak = flops.device_peak(c.train.peak_flops_per_device)
  stop = {'signal': None}
  previous = signal.signal(signal.SIGTERM, lambda *_: stop.update(signal='SIGTERM'))
  log(f'[train] {cfg.num_params() / 1e6:.1f}M params, mesh {dict(zip(shd.MESH_AXES, shape))}, '
      f'{c.train.steps} steps of {c.train.batch_size} x {c.data.seq_len} tokens')

  result: dict[str, Any] = {'start_step': start}
  tokens_per_step = c.train.batch_size * c.data.seq_len
  t_last, step, pending = time.perf_counter(), start, None
  try:
    with jax.set_mesh(mesh):
      while step < c.train.steps:
        local = next(data_iter)
        _check_answer_tokens(local['loss_mask'], c.train.loss_positions, step + 1)
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, np.asarray(v))
                 for k, v in local.items()}
        state, metrics = step_fn(state, batch)
        step += 1
        # The loss is read one step late, so that the host builds the next batch while the
        # device runs this step; a step is settled before it is logged, evaluated or saved,
        # so a non-finite loss never reaches a checkpoint.
        pending = _settle(pending, mngr, workdir)
        pending = (step, metrics['objective'])   # = the answer loss unless prompt_loss_weight
        if step % c.train.log_every == 0 or step == c.train.steps:
          pending = _settle(pending, mngr, workdir)
          now = time.perf_counter()
          dt = (now - t_last) / (step - (result.get('last_logged') or start))
          t_last, result['last_logged'] = now, step
          m = {k: float(v) for k, v in metrics.items()}
          m.update(step_time=dt, tokens_per_s=tokens_per_step / dt,
                   mfu=flops.mfu(tokens_per_step / dt, cfg, c.data.seq_len,
                                 mesh.size, peak, head_positions=c.train.loss_positions))
          writer.write(step, m)
          eta = (c.train.steps - step) * dt
          log(f'[train] step {step}/{c.train.steps} loss {m["loss"]:.4f} '
              f'acc {m["token_accuracy"]:.3f} lr {m["lr"]:.2e} gnorm {m["grad_norm"]:.2f} '
              f'{m["tokens_per_s"]:,.0f} tok/s {dt:.2f}s/step'
              + (f' MFU {100 * m["mfu"]:.1f}%' if m['mfu'] is not None else '')
              + f' ETA {eta:.0f}s')
          result['loss'] = m['loss']
        if c.eval.every and step % c.eval.every == 0 and step < c.train.steps:
          pending = _settle(pending, mngr, workdir)
          _evaluate(c, nnx.merge(graphdef, state)[0], tokenizer, workdir, step, writer, log)
          t_last, result['last_logged'] = time.perf_counter(), step   # keep eval out of step time
        if c.debug.kill_at_step and step == c.debug.kill_at_step:
          mngr.wait_until_finished()
          os.kill(os.getpid(), signal.SIGKILL)
        if c.debug.sigterm_at_step and step == c.debug.sigterm_at_step:
          os.kill(os.getpid(), signal.SIGTERM)
        if step % c.train.checkpoint_every == 0 or step == c.train.steps or stop['signal']:
          pending = _settle(pending, mngr, workdir)
          _save(mngr, step, state, data_iter)
        if stop['signal']:
          log(f'[train] {stop["signal"]}: saved the checkpoint at step {step}; exiting')
          result['stopped'] = stop['signal']
          break
  finally:
    mngr.wait_until_finished()
    mngr.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous)

  result['step'] = step
  if step >= c.train.steps and not result.get('stopped'):
    model = nnx.merge(graphdef, state)[0]
    if c.eval.every is not None and c.eval.per_position:
      result['eval'] = _evaluate(c, model, tokenizer, workdir, step, None, log, final=True)
    if c.export_hf:
      convert.save_hf(cfg, model, os.path.join(workdir, 'hf'))
      if jax.process_index() == 0:
        tokenizer.save_hf(os.path.join(workdir, 'hf'))
      log(f'[train] exported a Hugging Face checkpoint to {workdir}/hf')
  result['state'] = state
  result['graphdef'] = graphdef
  return result


def _check_answer_tokens(loss_mask, k: int, step: int) -> None:
  """With train.loss_positions=k, no row may carry more than k answer tokens."""
  if k and (n := int(np.asarray(loss_mask).sum(axis=1).max())) > k:
    raise ConfigError(f'train.loss_positions={k} but a row of the batch for step {step} has '
                      f'{n} answer tokens; raise it (0: logits at every position)')


def _settle(pending, mngr, workdir: str) -> None:
  """Read the loss of a dispatched step, `pending` = (step, objective) or None, and stop on
  a non-finite one; returns None (nothing is pending afterwards)."""
  if pending is not None and not math.isfinite(loss := float(pending[1])):
    raise FloatingPointError(
        f'non-finite loss {loss} at step {pending[0]}; stopping. The last good checkpoint '
        f'(step {mngr.latest_step()}) is kept in {workdir}/checkpoints')


def dataclass_fields(cfg: MistralConfig) -> dict[str, Any]:
  """Config fields that a checkpoint does not hold (numerics, kernels)."""
  return {k: getattr(cfg, k) for k in RUN_FIELDS}


def _evaluate(c, model, tokenizer, workdir, step, writer, log, final=False, before=False):
  """Held-out retrieval accuracy by gold position. `before`: of the initial model, kept in
  WORKDIR/eval_kv_before.json; `final`: WORKDIR/eval_kv.json (+ .png), with the `before`
  result beside it when there is one, and the task fields."""
  from jaxlm.evaluate import retrieval
  e = c.eval
  fields = {**c.data.task_fields.to_dict(), **e.task_fields.to_dict()}
  fields.pop('curriculum_examples', None)   # a training-stream schedule, not an eval setting
  result = retrieval.evaluate_retrieval(
      model, tokenizer, c.data.task, fields,
      positions=list(e.positions), per_position=e.per_position, seed=e.seed,
      chat_format=c.data.chat_format, max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
      verbose=jax.process_index() == 0)   # a progress line per gold position
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
    result['task'] = {'name': c.data.task, **fields}
    if os.path.exists(before_file):
      with open(before_file) as f:
        result['before'] = {k: v for k, v in json.load(f).items()
                            if k not in ('predictions', 'samples')}
    log(retrieval.format_table(result, result.get('before')))
    retrieval.write(result, os.path.join(workdir, 'eval_kv.json'),
                    os.path.join(workdir, 'eval_kv.png'))
    log(f'[eval] wrote {workdir}/eval_kv.json and {workdir}/eval_kv.png')
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if _FLAGS['config'].value is None:
    raise app.UsageError('--config=configs/NAME.py is required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)   # Orbax logs every save step at INFO
  workdir = _FLAGS['workdir'].value or os.environ.get('WORKDIR') or 'runs/default'
  try:
    train(_FLAGS['config'].value, workdir, aot_only=_FLAGS['aot_only'].value,
          topology=_FLAGS['topology'].value)
  except ConfigError as e:
    sys.exit(f'config error: {e}')
  except ValueError as e:   # jaxlm.aot.TopologyError: a bad --topology or no libtpu
    if type(e).__name__ != 'TopologyError':
      raise
    sys.exit(f'topology error: {e}')


if __name__ == '__main__':
  _define_flags()
  app.run(main)
