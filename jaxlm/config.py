"""Run configs: loading a config file, checking it, and what it implies.

    c = load_config_file('configs/smollm2_simple_kv.py')   # as --config=PATH loads it
    cfg = model_config(c)             # the MistralConfig the run trains
    mesh = run_mesh(c, cfg)           # checked against the devices, built by jaxlm.sharding
    tokenizer = load_run_tokenizer(c)

Overrides are ml_collections' (`--config.train.steps=10` on the command line; item
assignment in code). `configs/base.py` holds every field's default; the data fields are
those of `jaxlm.data.pipeline.DataConfig`. Errors are `ConfigError`s that name the field and
its value.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from typing import Any

from jaxlm import convert
from jaxlm import sharding as shd
from jaxlm.model import MistralConfig, get_config
from jaxlm.tokenizer import load_tokenizer


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field and value."""


# Model config fields that a run chooses and a checkpoint does not: numerics and kernels.
RUN_FIELDS = ('param_dtype', 'dtype', 'attention_impl', 'attention_block_q',
              'attention_block_kv', 'ring_layout', 'remat', 'scan_layers')


def load_config_file(path: str):
  """get_config() of a config file (configs/NAME.py), as --config=PATH would load it."""
  if not os.path.exists(path):
    raise ConfigError(f'config file {path!r} not found')
  spec = importlib.util.spec_from_file_location('_jaxlm_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def init_hook(c):
  """The function config.init_hook names ('module:function', called as
  function(model, tokenizer, config) on a model initialized from scratch), or None. A hook
  with a `check(config)` attribute has it called by `validate` (start-up checks)."""
  spec = c.get('init_hook', '')
  if not spec:
    return None
  module, _, name = spec.partition(':')
  try:
    return getattr(importlib.import_module(module), name)
  except (ImportError, AttributeError, ValueError) as e:
    raise ConfigError(f"init_hook={spec!r} must name a function as 'module:function' "
                      f'({type(e).__name__}: {e})') from None


def model_config(c) -> MistralConfig:
  """The model a run trains: the preset with config.model's fields, or, with init_from,
  the checkpoint's architecture with config.model's numerics (RUN_FIELDS). An
  architecture field of config.model that contradicts the checkpoint is an error."""
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


def run_fields(cfg: MistralConfig) -> dict[str, Any]:
  """Config fields that a checkpoint does not hold (numerics, kernels)."""
  return {k: getattr(cfg, k) for k in RUN_FIELDS}


def load_run_tokenizer(c):
  """config.tokenizer, or the tokenizer of the init_from checkpoint when it is ''."""
  spec = c.tokenizer or c.init_from
  if not spec:
    raise ConfigError("tokenizer='' takes the tokenizer of init_from, but init_from is '' too")
  try:
    return load_tokenizer(spec)
  except (ValueError, OSError) as e:
    raise ConfigError(f'tokenizer={spec!r}: {e}') from None


def mesh_sizes(c, num_devices: int, num_slices: int = 1) -> dict[str, int]:
  """config.mesh resolved against the device count: {axis: size}. Across several slices
  a data axis left at 1 becomes the slice count (data parallel across slices)."""
  sizes = {k: v for k, v in c.mesh.items() if k != 'devices'}
  if num_slices > 1 and sizes.get('data', 1) == 1:
    sizes['data'] = num_slices
  try:
    shape = shd.mesh_shape(sizes, num_devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh: {e}') from None
  if shape[0] % num_slices:
    raise ConfigError(f'mesh.data={shape[0]} must be a multiple of the {num_slices} slices '
                      f'(the data axis spans slices)')
  return dict(zip(shd.MESH_AXES, shape))


def validate(c, cfg: MistralConfig, num_devices: int, num_slices: int = 1
             ) -> tuple[int, ...]:
  """Start-up checks with clear errors; returns the resolved mesh shape."""
  check_values(c)
  from jaxlm import freeze
  try:
    freeze.check(c, cfg)   # against the model: its depth, scanned or not
  except freeze.FreezeError as e:
    raise ConfigError(str(e)) from None
  if c.mesh.devices:
    if c.mesh.devices > num_devices:
      raise ConfigError(f'mesh.devices={c.mesh.devices} but only {num_devices} devices exist')
    num_devices = c.mesh.devices
  sizes = mesh_sizes(c, num_devices, num_slices)
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
  hook = init_hook(c)
  if hook is not None and hasattr(hook, 'check'):   # the hook's own config fields
    hook.check(c)
  return tuple(sizes.values())


# field: (test, what it must be)
_POSITIVE = (lambda v: v >= 1, 'a positive integer')
_NON_NEGATIVE = (lambda v: v >= 0, '>= 0')
_VALUES = {
    'train.steps': _POSITIVE, 'train.batch_size': _POSITIVE, 'train.grad_accum': _POSITIVE,
    'train.log_every': _POSITIVE, 'train.checkpoint_every': _POSITIVE,
    'train.keep_checkpoints': _POSITIVE, 'train.warmup_steps': _NON_NEGATIVE,
    'train.loss_positions': _NON_NEGATIVE, 'train.lr': (lambda v: 0 <= v < float('inf'),
                                                        'finite and >= 0'),
    'train.end_lr_frac': (lambda v: 0 <= v <= 1, 'in [0, 1]'),
    'train.clip_norm': _NON_NEGATIVE, 'train.weight_decay': _NON_NEGATIVE,
    'train.b1': (lambda v: 0 <= v < 1, 'in [0, 1)'), 'train.b2': (lambda v: 0 <= v < 1,
                                                                  'in [0, 1)'),
    'train.eps': (lambda v: v > 0, '> 0'),
    'train.on_nonfinite': (lambda v: v in ('stop', 'skip'), "'stop' or 'skip'"),
    'train.max_skipped_steps': _POSITIVE,
    'eval.every': _NON_NEGATIVE, 'eval.per_position': _NON_NEGATIVE,
    'eval.batch_size': _POSITIVE, 'eval.max_new_tokens': _POSITIVE,
    'data.seq_len': _POSITIVE, 'data.num_epochs': _POSITIVE,
    'data.num_packing_bins': _POSITIVE, 'data.num_threads': _NON_NEGATIVE,
    'data.num_workers': _NON_NEGATIVE,
    'data.num_examples': (lambda v: v is None or v >= 1, 'None or a positive integer'),
}


def check_values(c) -> None:
  """Each field's own range (`config error: FIELD=VALUE: must be ...`), before anything is
  built; fields a config does not have are skipped."""
  for field, (ok, must) in _VALUES.items():
    section, name = field.split('.')
    if section not in c or name not in c[section]:
      continue
    v = c[section][name]
    try:
      good = ok(v)
    except TypeError:
      good = False
    if not good or isinstance(v, bool):
      raise ConfigError(f'{field}={v!r}: must be {must}')
  from jaxlm import freeze
  from jaxlm.lora import LoRAConfig, LoRAError
  try:
    LoRAConfig.from_config(c)
    freeze.check(c)
  except (LoRAError, freeze.FreezeError) as e:
    raise ConfigError(str(e)) from None


def check_data(c, tokenizer) -> None:
  """The training and evaluation tasks build with their fields, and the chat format fits
  the tokenizer (each a ConfigError naming the field), before anything is written."""
  from jaxlm.data.common import TaskConfigError
  from jaxlm.data.pipeline import DataConfig, resolve_chat_format
  from jaxlm.data.tasks import eval_task, make_task
  try:
    data = DataConfig.from_dict({**c.data.to_dict(), 'global_batch_size': c.train.batch_size})
  except TaskConfigError as e:
    raise ConfigError(f'config.data: {e}') from None
  where = f'data.task={data.task!r}'
  try:
    make_task(data.task, tokenizer, **dict(data.task_fields))
    if c.eval.per_position and c.eval.positions:
      name, fields = eval_task(c)
      where = f'eval.task={name!r}'
      for p in c.eval.positions:
        make_task(name, tokenizer, **{**fields, 'gold_position': p})
    where = f'data.chat_format={data.chat_format!r}'
    resolve_chat_format(data.chat_format, tokenizer)
  except (TaskConfigError, KeyError) as e:
    raise ConfigError(f'{where}: {e}') from None
  if data.on_long not in ('error', 'skip'):
    raise ConfigError(f"data.on_long={data.on_long!r}: must be 'error' or 'skip'")


def run_devices(c, devices=None) -> list:
  """The devices a run uses: `devices` (default jax.devices(), every process's), or the
  first config.mesh.devices of them."""
  import jax
  devices = list(jax.devices() if devices is None else devices)
  return devices[:c.mesh.devices] if c.mesh.devices else devices


def run_mesh(c, cfg: MistralConfig, devices=None, *, slice_index=None):
  """(mesh, shape): the run's mesh on `devices` (default: all), checked by `validate`.
  On several TPU slices (TPU devices whose `slice_index` differs; `slice_index(device)`
  overrides how a device's slice is read) the data axis spans the slices. GPU meshes stay
  flat (one slice)."""
  devices = run_devices(c, devices)
  slice_index = slice_index or shd.tpu_slice_index
  shape = validate(c, cfg, len(devices), len({slice_index(d) for d in devices}))
  try:
    return shd.make_mesh(dict(zip(shd.MESH_AXES, shape)), devices,
                         slice_index=slice_index), shape
  except ValueError as e:   # e.g. mesh.devices cutting through a slice
    raise ConfigError(f'config.mesh: {e}') from None
