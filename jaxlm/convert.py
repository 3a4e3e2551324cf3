"""Hugging Face Mistral checkpoints <-> jaxlm models.

`load_hf` reads a checkpoint directory (config.json plus model.safetensors, or a
sharded model.safetensors.index.json) tensor by tensor: each tensor is read, laid
out for jaxlm, and placed on devices (into its target sharding when a mesh is
given) before the next is read, so host memory holds at most one tensor at a time.
`save_hf` writes the same format back, again one tensor at a time, so that
`transformers.MistralForCausalLM.from_pretrained` loads it.

Layout: Hugging Face linear weights are [out, in]; jaxlm kernels are [in, out] with
the head dimension split out, e.g. q_proj [H*Dh, D] -> [D, H, Dh].
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxlm import sharding as shd
from jaxlm.model import DTYPES, MistralConfig, Mistral, abstract_model


class CheckpointError(ValueError):
  """A checkpoint that does not match what the model expects."""


_SAFETENSORS_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}
_HARMLESS_EXTRA = ('.rotary_emb.inv_freq',)   # buffers some exporters save; recomputed here


# ----------------------------------------------------------------------------- names


def _layout(cfg: MistralConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
  """jaxlm state path -> (Hugging Face name, hf_to_ours, ours_to_hf)."""
  d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda x: x
  transpose = lambda x: x.T
  heads_in = lambda n: (lambda x: x.T.reshape(d, n, dh), lambda x: x.reshape(d, n * dh).T)
  table = {
      ('embed',): ('model.embed_tokens.weight', same, same),
      ('final_norm', 'scale'): ('model.norm.weight', same, same),
      ('lm_head',): ('lm_head.weight', transpose, transpose),
  }
  for i in range(cfg.num_layers):
    p, n = ('layers', i), f'model.layers.{i}.'
    table.update({
        p + ('input_norm', 'scale'): (n + 'input_layernorm.weight', same, same),
        p + ('post_attn_norm', 'scale'): (n + 'post_attention_layernorm.weight', same, same),
        p + ('attn', 'q_proj'): (n + 'self_attn.q_proj.weight', *heads_in(h)),
        p + ('attn', 'k_proj'): (n + 'self_attn.k_proj.weight', *heads_in(k)),
        p + ('attn', 'v_proj'): (n + 'self_attn.v_proj.weight', *heads_in(k)),
        p + ('attn', 'o_proj'): (n + 'self_attn.o_proj.weight',
                                 lambda x: x.T.reshape(h, dh, d),
                                 lambda x: x.reshape(h * dh, d).T),
        p + ('mlp', 'gate_proj'): (n + 'mlp.gate_proj.weight', transpose, transpose),
        p + ('mlp', 'up_proj'): (n + 'mlp.up_proj.weight', transpose, transpose),
        p + ('mlp', 'down_proj'): (n + 'mlp.down_proj.weight', transpose, transpose),
    })
  return table


def _hf_shape(ours_to_hf: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(ours_to_hf(np.empty(shape, np.bool_)).shape)


# ----------------------------------------------------------------------------- config


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> MistralConfig:
  """MistralConfig from a Hugging Face config.json dict."""
  archs = hf.get('architectures') or []
  if hf.get('model_type') != 'mistral' or (archs and 'MistralForCausalLM' not in archs):
    raise CheckpointError(
        f'unsupported architecture: model_type={hf.get("model_type")!r}, '
        f'architectures={archs!r}; jaxlm loads model_type "mistral" (MistralForCausalLM)')
  if hf.get('tie_word_embeddings', False):
    raise CheckpointError('unsupported: tie_word_embeddings=True (jaxlm Mistral has an untied LM head)')
  if hf.get('hidden_act', 'silu') != 'silu':
    raise CheckpointError(f'unsupported hidden_act={hf["hidden_act"]!r}; Mistral uses "silu"')
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  if rope.get('rope_type', rope.get('type', 'default')) != 'default':
    raise CheckpointError(f'unsupported RoPE scaling {rope!r}; only the default RoPE is implemented')
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  stored = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  stored = stored if stored in DTYPES else 'float32'
  fields = dict(
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'], rope_theta=float(theta),
      sliding_window=hf.get('sliding_window'),
      max_position_embeddings=hf.get('max_position_embeddings', 32768),
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
      initializer_range=hf.get('initializer_range', 0.02),
      bos_token_id=hf.get('bos_token_id', 1) if hf.get('bos_token_id') is not None else 1,
      eos_token_id=hf.get('eos_token_id', 2) if isinstance(hf.get('eos_token_id'), int) else 2,
      param_dtype=stored, dtype=stored)
  fields.update(overrides)
  return MistralConfig(**fields)


def config_to_hf(cfg: MistralConfig, dtype: str) -> dict[str, Any]:
  return {
      'architectures': ['MistralForCausalLM'], 'model_type': 'mistral',
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_position_embeddings, 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_theta': cfg.rope_theta,
      'rope_parameters': {'rope_type': 'default', 'rope_theta': cfg.rope_theta},
      'sliding_window': cfg.sliding_window, 'tie_word_embeddings': False,
      'initializer_range': cfg.initializer_range, 'attention_dropout': 0.0,
      'bos_token_id': cfg.bos_token_id, 'eos_token_id': cfg.eos_token_id,
      'use_cache': True, 'torch_dtype': dtype, 'dtype': dtype,
  }


# ----------------------------------------------------------------------------- load


def _tensor_files(path: str) -> dict[str, str]:
  """Tensor name -> safetensors file for a checkpoint directory."""
  index = os.path.join(path, 'model.safetensors.index.json')
  single = os.path.join(path, 'model.safetensors')
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)['weight_map']
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  if os.path.exists(single):
    with _open(single) as f:
      return {name: single for name in f.keys()}
  raise CheckpointError(f'{path}: no model.safetensors or model.safetensors.index.json '
                        f'(found {sorted(os.listdir(path))})')


def _open(file: str):
  try:
    return safe_open(file, framework='numpy')
  except (SafetensorError, OSError) as e:
    raise CheckpointError(f'{file}: not a readable safetensors file (truncated or corrupt?): {e}') from e


def load_hf(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            rules: dict[str, tuple[str, ...]] | None = None,
            **config_overrides: Any) -> tuple[MistralConfig, Mistral]:
  """Load a Hugging Face Mistral checkpoint directory into a jaxlm model.

  dtype: parameter and compute dtype ('float32', 'bfloat16'); None keeps the
    checkpoint's stored dtype. mesh/rules: place each parameter straight into the
    NamedSharding given by its logical axes (`jaxlm.sharding`). Extra keyword
    arguments override MistralConfig fields (e.g. attention_impl).
  Raises CheckpointError naming the tensor on missing, extra or misshapen tensors.
  """
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise CheckpointError(f'{path}: no config.json')
  with open(config_file) as f:
    hf_config = json.load(f)
  if dtype is not None:
    config_overrides = {'param_dtype': dtype, 'dtype': dtype, **config_overrides}
  cfg = config_from_hf(hf_config, **config_overrides)

  abstract = abstract_model(cfg)
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  layout = _layout(cfg)
  files = _tensor_files(path)

  expected = {layout[p][0]: (p, v) for p, v in flat}
  missing = sorted(set(expected) - set(files))
  extra = sorted(n for n in set(files) - set(expected) if not n.endswith(_HARMLESS_EXTRA))
  if missing or extra:
    raise CheckpointError(
        f'{path}: checkpoint does not match the config: missing tensors {missing[:8]}'
        f'{" ..." if len(missing) > 8 else ""} ({len(missing)}), unexpected tensors '
        f'{extra[:8]}{" ..." if len(extra) > 8 else ""} ({len(extra)})')

  # Validate every shape from the headers before reading any data.
  handles: dict[str, Any] = {}
  try:
    for file in sorted(set(files.values())):
      handles[file] = _open(file)
    for name, (p, var) in expected.items():
      got = tuple(handles[files[name]].get_slice(name).get_shape())
      want = _hf_shape(layout[p][2], var.shape)
      if got != want:
        raise CheckpointError(f'tensor {name} has shape {got} in {files[name]}, but the config '
                              f'expects {want}')
    target_dtype = DTYPES[cfg.param_dtype]
    values = []
    for p, var in flat:
      name, to_ours, _ = layout[p]
      try:
        host = to_ours(handles[files[name]].get_tensor(name))
      except SafetensorError as e:
        raise CheckpointError(f'tensor {name} in {files[name]} cannot be read '
                              f'(truncated or corrupt file?): {e}') from e
      sharding = shd.param_sharding(var, mesh, rules) if mesh is not None else None
      values.append((p, var.replace(value=shd.make_array(host, sharding, target_dtype))))
      del host
  finally:
    handles.clear()
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(values))


# ----------------------------------------------------------------------------- save


def _write_safetensors(file: str, tensors: list[tuple[str, tuple, str, Callable[[], np.ndarray]]]):
  """Write tensors one at a time: (name, shape, dtype name, fetch) -> file."""
  header, offset = {'__metadata__': {'format': 'pt'}}, 0
  for name, shape, dtype, _ in tensors:
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
    header[name] = {'dtype': _SAFETENSORS_DTYPES[dtype], 'shape': list(shape),
                    'data_offsets': [offset, offset + nbytes]}
    offset += nbytes
  blob = json.dumps(header, separators=(',', ':')).encode()
  blob += b' ' * (-len(blob) % 8)
  tmp = file + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(struct.pack('<Q', len(blob)))
    f.write(blob)
    for name, shape, dtype, fetch in tensors:
      array = np.ascontiguousarray(fetch(), dtype=DTYPES[dtype])
      assert array.shape == tuple(shape), (name, array.shape, shape)
      f.write(array.tobytes())
  os.replace(tmp, file)


def _to_host(x: jax.Array) -> np.ndarray:
  if not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_hf(cfg: MistralConfig, model: Mistral, path: str, *, dtype: str | None = None,
            max_shard_bytes: int = 5 * 2**30) -> None:
  """Write `model` as a Hugging Face checkpoint directory (config.json, safetensors).

  dtype: stored dtype, default the model's parameter dtype. Checkpoints larger than
  max_shard_bytes are split into model-0000i-of-0000n.safetensors files with an index.
  In multi-process runs every process must call this; process 0 writes.
  """
  dtype = dtype or cfg.param_dtype
  if dtype not in _SAFETENSORS_DTYPES:
    raise ValueError(f'save_hf dtype={dtype!r} is not one of {sorted(_SAFETENSORS_DTYPES)}')
  writer = jax.process_index() == 0
  layout = _layout(cfg)
  flat = list(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  if set(p for p, _ in flat) != set(layout):
    raise ValueError(f'model parameters {sorted(set(p for p, _ in flat) ^ set(layout))[:8]} '
                     f'do not match the config')
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  shards, current, size = [], [], 0
  for p, var in sorted(flat, key=lambda pv: _hf_sort_key(layout[pv[0]][0])):
    name, _, to_hf = layout[p]
    shape = _hf_shape(to_hf, var.shape)
    nbytes = int(np.prod(shape)) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    fetch = (lambda v=var, f=to_hf: f(_to_host(v[...])))
    current.append((name, shape, dtype, fetch))
    size += nbytes
  shards.append(current)

  if writer:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, 'config.json'), 'w') as f:
      json.dump(config_to_hf(cfg, dtype), f, indent=2)
    with open(os.path.join(path, 'generation_config.json'), 'w') as f:
      json.dump({'bos_token_id': cfg.bos_token_id, 'eos_token_id': cfg.eos_token_id}, f, indent=2)
  if len(shards) == 1:
    _save_shard(writer, os.path.join(path, 'model.safetensors'), shards[0])
    return
  weight_map, total = {}, 0
  for i, shard in enumerate(shards):
    file = f'model-{i + 1:05d}-of-{len(shards):05d}.safetensors'
    _save_shard(writer, os.path.join(path, file), shard)
    for name, shape, _, _ in shard:
      weight_map[name] = file
      total += int(np.prod(shape)) * itemsize
  if writer:
    with open(os.path.join(path, 'model.safetensors.index.json'), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)


def _save_shard(writer: bool, file: str, tensors) -> None:
  if writer:
    _write_safetensors(file, tensors)
  else:  # other processes still take part in the all-gathers of sharded arrays
    for *_, fetch in tensors:
      fetch()


def _hf_sort_key(name: str):
  """Order tensors as Hugging Face does: by layer number, then name."""
  parts = name.split('.')
  return [int(x) if x.isdigit() else x for x in parts] if 'layers' in parts else [name]
