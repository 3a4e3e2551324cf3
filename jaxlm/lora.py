"""LoRA: low-rank adapters on the attention and MLP projections of a frozen model.

    lcfg = LoRAConfig(rank=16, alpha=32, targets=('q_proj', 'v_proj'))
    attach(model, lcfg, seed=0)           # adapters added in place; the base is frozen
    model(tokens)                         # W x + scale * B(A(dropout(x))) at each target
    save_peft(model, lcfg, 'out/adapter') # Hugging Face PEFT's adapter format
    save_hf(cfg, merge(model), 'out/hf')  # or the merged model, as a plain checkpoint

A projection with weight W ([in..., out...] in jaxlm's layout) gets A [in..., r] and
B [r, out...]; its output becomes x W + scale * (dropout(x) A) B with scale = alpha / r
(alpha / sqrt(r) with use_rslora), as PEFT's `LoraLayer` computes it. A starts as PEFT's
Kaiming-uniform draw (bound 1 / sqrt(fan_in)), B at zero, so an attached model computes
exactly what the base did.

Trainable and frozen: adapters are `LoRAParam`s (a subclass of nnx.Param), so `TRAINABLE`
(the filter the trainer differentiates and gives an optimizer) selects them alone; the base
parameters stay nnx.Params, cast once to the model's compute dtype by `attach` (the stored
copy is what every step reads, so no float32 master copy and no optimizer state exists for
them). Adapter axes follow their base weight's logical axes on the side they share (A: the
input axes, B: the output axes) and the rank axis is replicated, so `jaxlm.sharding` shards
them like the base with no rule of its own; scanned layers keep the leading 'layers' axis.

Dropout (`LoRAConfig.dropout`) applies to the adapter's input only, as in PEFT, and only
inside `dropout_key(key)` (the trainer's step derives that key from the run's seed, the
step and the micro-batch, so a resumed run draws the same masks); evaluation and
generation run without it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model import DTYPES, Mistral, _matmul

ATTENTION_TARGETS = ('q_proj', 'k_proj', 'v_proj', 'o_proj')
MLP_TARGETS = ('gate_proj', 'up_proj', 'down_proj')
TARGETS = ATTENTION_TARGETS + MLP_TARGETS
_IN_DIMS = {'o_proj': 2}   # input dimensions of a weight ([H, E, D]: heads and head width)
SUFFIX = '_lora'           # the adapter of `q_proj` is the attribute `q_proj_lora`
PEFT_CONFIG = 'adapter_config.json'
PEFT_WEIGHTS = 'adapter_model.safetensors'


class LoRAError(ValueError):
  """A LoRA configuration or adapter file that cannot be used; the message names it."""


class LoRAParam(nnx.Param):
  """An adapter weight: the only parameters a LoRA run trains."""


class LoRAIndex(nnx.Variable):
  """An adapter's number (layer * len(TARGETS) + target): folds into the dropout key."""


TRAINABLE = LoRAParam   # the nnx filter of trainable parameters under LoRA


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
  """rank 0 turns LoRA off (full fine-tuning)."""
  rank: int = 0
  alpha: float = 16.0
  dropout: float = 0.0
  targets: tuple[str, ...] = TARGETS
  use_rslora: bool = False   # scale alpha / sqrt(rank) (PEFT's rank-stabilized LoRA)

  def __post_init__(self):
    if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
      raise LoRAError(f'lora rank={self.rank!r}: must be an integer >= 0 (0: no LoRA)')
    if not isinstance(self.alpha, (int, float)) or not 0 < self.alpha < float('inf'):
      raise LoRAError(f'lora alpha={self.alpha!r}: must be a positive number')
    if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
      raise LoRAError(f'lora dropout={self.dropout!r}: must be in [0, 1)')
    targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
    unknown = [t for t in targets if t not in TARGETS]
    if unknown or not targets or len(set(targets)) != len(targets):
      raise LoRAError(f'lora targets={self.targets!r}: must be distinct names among '
                      f'{TARGETS}' + (f' ({unknown} are not)' if unknown else ''))
    object.__setattr__(self, 'targets', tuple(t for t in TARGETS if t in targets))

  @property
  def enabled(self) -> bool:
    return self.rank > 0

  @property
  def scale(self) -> float:
    return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

  @classmethod
  def from_config(cls, c) -> 'LoRAConfig':
    """From a run config's `train.lora` section (absent: LoRA off); LoRAError names the
    field."""
    section = c.train.get('lora') if 'train' in c else None
    if section is None:
      return cls()
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section.keys()) - known)
    if unknown:
      raise LoRAError(f'train.lora has unknown field(s) {unknown}; valid: {sorted(known)}')
    try:
      return cls(**{k: (tuple(v) if k == 'targets' and not isinstance(v, str) else v)
                    for k, v in section.items()})
    except LoRAError as e:
      raise LoRAError(f'train.lora: {e}') from None


# ----------------------------------------------------------------------------- adapters

_DROPOUT_KEY: contextvars.ContextVar = contextvars.ContextVar('jaxlm_lora_dropout', default=None)


@contextlib.contextmanager
def dropout_key(key: jax.Array | None) -> Iterator[None]:
  """Adapters traced inside this block apply their dropout with masks drawn from `key`
  (folded with each adapter's index); outside it they apply none."""
  token = _DROPOUT_KEY.set(key)
  try:
    yield
  finally:
    _DROPOUT_KEY.reset(token)


class LoRA(nnx.Module):
  """The adapter of one projection (or of a stack of layers' projections): A, B, scale."""

  def __init__(self, weight: nnx.Param, n_in: int, lcfg: LoRAConfig, index, *,
               stacked: bool, dtype, key: jax.Array):
    shape = tuple(weight.shape)
    axes = tuple(weight.get_metadata().get('out_sharding') or (None,) * len(shape))
    lead = 1 if stacked else 0   # scanned layers: a leading [num_layers] axis
    split = lead + n_in
    in_shape, out_shape = shape[lead:split], shape[split:]
    fan_in = int(np.prod(in_shape))
    bound = 1.0 / math.sqrt(fan_in)   # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, fan_in]
    a = jax.random.uniform(key, (*shape[:split], lcfg.rank), jnp.float32, -bound, bound)
    b = jnp.zeros((*shape[:lead], lcfg.rank, *out_shape), jnp.float32)
    self.a = LoRAParam(a.astype(dtype), out_sharding=axes[:split] + (None,),
                       eager_sharding=False)
    self.b = LoRAParam(b.astype(dtype), out_sharding=axes[:lead] + (None,) + axes[split:],
                       eager_sharding=False)
    self.index = LoRAIndex(jnp.asarray(index, jnp.int32))
    self.n_in, self.stacked = n_in, stacked
    self.scale, self.dropout = float(lcfg.scale), float(lcfg.dropout)

  def __call__(self, x: jax.Array) -> jax.Array:
    dt = x.dtype
    key = _DROPOUT_KEY.get()
    if self.dropout and key is not None:
      keep = jax.random.bernoulli(jax.random.fold_in(key, self.index[...]),
                                  1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(dt)
    h = _matmul(x, self.a[...].astype(dt), self.n_in)
    return _matmul(h, self.b[...].astype(dt)) * jnp.asarray(self.scale, dt)


def _blocks(model: Mistral) -> list[tuple[Any, Any]]:
  """[(block, layer index or None for the stacked block)]."""
  if model.cfg.scan_layers:
    return [(model.layers, None)]
  return [(block, i) for i, block in enumerate(model.layers)]


def _parent(block, target: str):
  return block.attn if target in ATTENTION_TARGETS else block.mlp


def adapters(model: Mistral) -> Iterator[tuple[int | None, str, Any, LoRA]]:
  """(layer or None when stacked, target, module holding it, adapter) for each adapter."""
  for block, i in _blocks(model):
    for target in TARGETS:
      parent = _parent(block, target)
      adapter = getattr(parent, target + SUFFIX, None)
      if adapter is not None:
        yield i, target, parent, adapter


def has_adapters(model: Mistral) -> bool:
  return next(adapters(model), None) is not None


def attach(model: Mistral, lcfg: LoRAConfig, seed: int = 0) -> Mistral:
  """Add adapters to `model` in place (A random, B zero: outputs unchanged) and freeze the
  base: its parameters are cast to the compute dtype (cfg.dtype) and stay nnx.Params,
  which `TRAINABLE` does not select. Adapters are stored in cfg.param_dtype. Returns the
  model."""
  if not lcfg.enabled:
    raise LoRAError('attach: lora rank is 0 (LoRA off)')
  if has_adapters(model):
    raise LoRAError('attach: the model already has LoRA adapters')
  cfg = model.cfg
  _cast_params(model, DTYPES[cfg.dtype])
  store = DTYPES[cfg.param_dtype]
  root = jax.random.key(seed)
  for block, i in _blocks(model):
    for target in lcfg.targets:
      parent = _parent(block, target)
      t = TARGETS.index(target)
      layers = np.arange(cfg.num_layers) if i is None else i   # stacked: every layer at once
      index = layers * len(TARGETS) + t
      key = jax.random.fold_in(root, t if i is None else len(TARGETS) * (1 + i) + t)
      setattr(parent, target + SUFFIX,
              LoRA(getattr(parent, target), _IN_DIMS.get(target, 1), lcfg, index,
                   stacked=i is None, dtype=store, key=key))
  return model


def _cast_params(model: Mistral, dtype) -> None:
  """Cast every floating-point parameter of `model` to `dtype`, in place."""
  for var in jax.tree.leaves(nnx.state(model, nnx.Param),
                             is_leaf=lambda v: isinstance(v, nnx.Variable)):
    if jnp.issubdtype(var.dtype, jnp.floating) and var.dtype != dtype:
      var.set_value(var[...].astype(dtype))


def attach_from_config(model: Mistral, c) -> Mistral:
  """`attach` with the run config's train.lora (and seed) when its rank is > 0."""
  lcfg = LoRAConfig.from_config(c)
  return attach(model, lcfg, seed=c.get('seed', 0)) if lcfg.enabled else model


def count(model: Mistral, trained=TRAINABLE) -> tuple[int, int]:
  """(parameters the nnx filter `trained` selects: the adapters by default, all
  parameters including the adapters)."""
  size = lambda state: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
  return size(nnx.state(model, trained)), size(nnx.state(model, nnx.Param))


def _delta(adapter: LoRA) -> jax.Array:
  """scale * A B in float32, in the base weight's layout ([L, ...] when stacked)."""
  a, b = adapter.a[...].astype(jnp.float32), adapter.b[...].astype(jnp.float32)
  product = lambda a, b: jnp.tensordot(a, b, axes=[[a.ndim - 1], [0]])
  return (jax.vmap(product) if adapter.stacked else product)(a, b) * adapter.scale


def merge(model: Mistral) -> Mistral:
  """A new model without adapters whose weights are W + scale * A B, computed in float32
  and stored in cfg.param_dtype (every parameter; the frozen base came in the compute
  dtype). The model given keeps its adapters (arrays not changed by the merge are shared)."""
  cfg = model.cfg
  store = DTYPES[cfg.param_dtype]
  deltas = {(i, target): _delta(adapter) for i, target, _, adapter in adapters(model)}
  graphdef, state = nnx.split(model)
  merged = nnx.merge(graphdef, state, copy=True)   # new variables over the same arrays
  for i, target, parent, _ in list(adapters(merged)):
    weight = getattr(parent, target)
    weight.set_value((weight[...].astype(jnp.float32) + deltas[(i, target)]).astype(store))
    delattr(parent, target + SUFFIX)
  _cast_params(merged, store)
  return merged


# ----------------------------------------------------------------------------- PEFT format


def _peft_name(layer: int, target: str, which: str) -> str:
  group = 'self_attn' if target in ATTENTION_TARGETS else 'mlp'
  return f'base_model.model.model.layers.{layer}.{group}.{target}.lora_{which}.weight'


def _per_layer(adapter: LoRA, layer: int | None, num_layers: int):
  """[(layer, A, B)] as host arrays in jaxlm layout, one per layer."""
  from jaxlm.convert import _to_host
  a, b = _to_host(adapter.a[...]), _to_host(adapter.b[...])
  if layer is not None:
    return [(layer, a, b)]
  return [(i, a[i], b[i]) for i in range(num_layers)]


def save_peft(model: Mistral, lcfg: LoRAConfig, path: str, *,
              base_model_name_or_path: str = '', dtype: str | None = None) -> None:
  """Write the adapters alone in Hugging Face PEFT's format: adapter_config.json and
  adapter_model.safetensors (lora_A [r, in], lora_B [out, r] per projection, in Hugging
  Face's [out, in] layout), loadable by `peft.PeftModel.from_pretrained(base, path)` on the
  base checkpoint. dtype: stored dtype (default cfg.param_dtype). Every process of a
  multi-process run must call this; process 0 writes."""
  from jaxlm.convert import _SAFETENSORS_DTYPES, _write_safetensors
  cfg = model.cfg
  dtype = dtype or cfg.param_dtype
  if dtype not in _SAFETENSORS_DTYPES:
    raise LoRAError(f'save_peft dtype={dtype!r} is not one of {sorted(_SAFETENSORS_DTYPES)}')
  found = list(adapters(model))
  if not found:
    raise LoRAError('save_peft: the model has no LoRA adapters')
  tensors = []
  for layer, target, _, adapter in found:
    for i, a, b in _per_layer(adapter, layer, cfg.num_layers):
      r = a.shape[-1]
      a_hf, b_hf = a.reshape(-1, r).T, b.reshape(r, -1).T   # [r, in], [out, r]
      tensors.append((_peft_name(i, target, 'A'), a_hf.shape, dtype, lambda x=a_hf: x))
      tensors.append((_peft_name(i, target, 'B'), b_hf.shape, dtype, lambda x=b_hf: x))
  tensors.sort(key=lambda t: [int(p) if p.isdigit() else p for p in t[0].split('.')])
  if jax.process_index() != 0:
    return
  os.makedirs(path, exist_ok=True)
  config = {
      'peft_type': 'LORA', 'task_type': 'CAUSAL_LM',
      'base_model_name_or_path': base_model_name_or_path or None,
      'r': lcfg.rank, 'lora_alpha': lcfg.alpha, 'lora_dropout': lcfg.dropout,
      'target_modules': list(lcfg.targets), 'use_rslora': lcfg.use_rslora,
      'bias': 'none', 'fan_in_fan_out': False, 'inference_mode': True,
      'init_lora_weights': True, 'modules_to_save': None,
  }
  with open(os.path.join(path, PEFT_CONFIG), 'w') as f:
    json.dump(config, f, indent=2)
  _write_safetensors(os.path.join(path, PEFT_WEIGHTS), tensors)


def read_peft_config(path: str) -> LoRAConfig:
  """The LoRAConfig of a PEFT adapter directory; LoRAError for what jaxlm cannot apply."""
  file = os.path.join(path, PEFT_CONFIG)
  if not os.path.exists(file):
    raise LoRAError(f'{path}: no {PEFT_CONFIG} (not a PEFT adapter directory)')
  with open(file) as f:
    hf = json.load(f)
  if hf.get('peft_type', 'LORA') != 'LORA':
    raise LoRAError(f'{file}: peft_type={hf.get("peft_type")!r}; jaxlm reads LORA adapters')
  for key, off in (('use_dora', False), ('fan_in_fan_out', False), ('bias', 'none'),
                   ('rank_pattern', {}), ('alpha_pattern', {}), ('modules_to_save', None),
                   ('layers_to_transform', None)):
    if hf.get(key) is not None and hf[key] != off:
      raise LoRAError(f'{file}: {key}={hf[key]!r} is not supported (jaxlm reads plain LoRA '
                      f'adapters: {key}={off!r})')
  targets = hf.get('target_modules')
  if isinstance(targets, str) or not targets:
    raise LoRAError(f'{file}: target_modules={targets!r}; jaxlm needs a list of names '
                    f'among {TARGETS}')
  try:
    return LoRAConfig(rank=int(hf['r']), alpha=float(hf.get('lora_alpha', 8)),
                      dropout=float(hf.get('lora_dropout') or 0.0),
                      targets=tuple(targets), use_rslora=bool(hf.get('use_rslora', False)))
  except (LoRAError, KeyError) as e:
    raise LoRAError(f'{file}: {e}') from None


def load_peft(model: Mistral, path: str) -> LoRAConfig:
  """Attach the adapters of a PEFT directory to `model` (in place; the base is frozen as
  by `attach`). Returns their LoRAConfig. LoRAError names a missing or misshapen tensor."""
  from jaxlm.convert import _open
  lcfg = read_peft_config(path)
  attach(model, lcfg)
  cfg = model.cfg
  with _open(os.path.join(path, PEFT_WEIGHTS)) as f:
    names = set(f.keys())
    expected = set()
    for layer, target, _, adapter in adapters(model):
      layers = range(cfg.num_layers) if layer is None else [layer]
      for which, var in (('A', adapter.a), ('B', adapter.b)):
        per_layer = []
        for i in layers:
          name = _peft_name(i, target, which)
          expected.add(name)
          if name not in names:
            raise LoRAError(f'{path}: tensor {name} is missing from {PEFT_WEIGHTS}')
          x = f.get_tensor(name)
          shape = var.shape[1:] if layer is None else var.shape
          want = (shape[-1], int(np.prod(shape[:-1]))) if which == 'A' else (
              int(np.prod(shape[1:])), shape[0])
          if tuple(x.shape) != want:
            raise LoRAError(f'{path}: tensor {name} has shape {tuple(x.shape)}, expected '
                            f'{want} for this model')
          per_layer.append(x.T.reshape(shape))
        value = np.stack(per_layer) if layer is None else per_layer[0]
        var.set_value(jax.device_put(value.astype(var.dtype), var[...].sharding))
    extra = sorted(n for n in names - expected)
    if extra:
      raise LoRAError(f'{path}: {len(extra)} tensor(s) this model has no place for, e.g. '
                      f'{extra[:3]}')
  return lcfg
