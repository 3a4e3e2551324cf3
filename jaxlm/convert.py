"""Hugging Face Mistral / Llama / Qwen2 checkpoints <-> jaxlm models.

`load_hf` reads a checkpoint directory (config.json plus model.safetensors, or a
sharded model.safetensors.index.json) tensor by tensor: each tensor is read, laid
out for jaxlm, and placed on devices (into its target sharding when a mesh is
given) before the next is read, so host memory holds at most one tensor at a time.
`save_hf` writes the same format back, again one tensor at a time, so that
transformers loads it into the class the config names (`MistralConfig.architecture`:
MistralForCausalLM, LlamaForCausalLM or Qwen2ForCausalLM). `load_tensors` is the
loader behind `load_hf` for any source of Hugging Face-named tensors (e.g. GGUF).

Layout: Hugging Face linear weights are [out, in]; jaxlm kernels are [in, out] with
the head dimension split out, e.g. q_proj [H*Dh, D] -> [D, H, Dh]; q/k/v biases
[H*Dh] -> [H, Dh] (Llama's attention_bias adds an o_proj bias [D] as well). Tied checkpoints have no lm_head.weight (one stored as well is
accepted when it equals the embedding).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Callable, Protocol

import jax
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxlm import embedded
from jaxlm import sharding as shd
from jaxlm.gguf import GGUFCheckpoint
from jaxlm.model import DTYPES, MistralConfig, Mistral, abstract_model


class CheckpointError(ValueError):
  """A checkpoint that does not match what the model expects."""


_SAFETENSORS_DTYPES = {'float32': 'F32', 'bfloat16': 'BF16', 'float16': 'F16'}
_HARMLESS_EXTRA = ('.rotary_emb.inv_freq',)   # buffers some exporters save; recomputed here
# jaxlm architecture <-> Hugging Face (model_type, class).
HF_CLASSES = {'mistral': 'MistralForCausalLM', 'llama': 'LlamaForCausalLM',
              'qwen2': 'Qwen2ForCausalLM'}
_LLAMA3_KEYS = {'rope_factor': 'factor', 'rope_low_freq_factor': 'low_freq_factor',
                'rope_high_freq_factor': 'high_freq_factor',
                'rope_original_max_position': 'original_max_position_embeddings'}


# ----------------------------------------------------------------------------- names


def _layout(cfg: MistralConfig) -> dict[tuple, tuple[str | tuple[str, ...], Callable, Callable]]:
  """jaxlm state path -> (Hugging Face name, hf_to_ours, ours_to_hf). With scan_layers a
  stacked parameter's path ('layers', ...) maps to the tuple of its layers' names (one
  tensor per layer, converted one by one)."""
  table = _unrolled_layout(cfg)
  if not cfg.scan_layers:
    return table
  stacked: dict[tuple, tuple] = {}
  for path, (name, to_ours, to_hf) in table.items():
    if path[0] != 'layers':
      stacked[path] = (name, to_ours, to_hf)
      continue
    key = ('layers',) + path[2:]
    names = stacked.get(key, ((),))[0] + (name,)   # layers in order 0, 1, ...
    stacked[key] = (names, to_ours, to_hf)
  return stacked


def _unrolled_layout(cfg: MistralConfig) -> dict[tuple, tuple[str, Callable, Callable]]:
  d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  same = lambda x: x
  transpose = lambda x: x.T
  heads_in = lambda n: (lambda x: x.T.reshape(d, n, dh), lambda x: x.reshape(d, n * dh).T)
  bias = lambda n: (lambda x: x.reshape(n, dh), lambda x: x.reshape(n * dh))
  table = {
      ('embed',): ('model.embed_tokens.weight', same, same),
      ('final_norm', 'scale'): ('model.norm.weight', same, same),
  }
  if not cfg.tie_word_embeddings:
    table[('lm_head',)] = ('lm_head.weight', transpose, transpose)
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
    if cfg.attention_bias:
      table.update({
          p + ('attn', 'q_bias'): (n + 'self_attn.q_proj.bias', *bias(h)),
          p + ('attn', 'k_bias'): (n + 'self_attn.k_proj.bias', *bias(k)),
          p + ('attn', 'v_bias'): (n + 'self_attn.v_proj.bias', *bias(k)),
      })
    if cfg.attention_bias and cfg.architecture == 'llama':
      table[p + ('attn', 'o_bias')] = (n + 'self_attn.o_proj.bias', same, same)
  return table


def _hf_shape(ours_to_hf: Callable, shape: tuple[int, ...]) -> tuple[int, ...]:
  return tuple(ours_to_hf(np.empty(shape, np.bool_)).shape)


# ----------------------------------------------------------------------------- config


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
  """MistralConfig RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling`."""
  rope = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  kind = rope.get('rope_type', rope.get('type', 'default'))
  if kind not in ('default', 'llama3'):
    raise CheckpointError(f'unsupported RoPE scaling rope_type={kind!r} ({rope!r}); jaxlm '
                          f"implements 'default' and 'llama3'")
  if rope.get('partial_rotary_factor', hf.get('partial_rotary_factor', 1.0)) != 1.0:
    raise CheckpointError(f'unsupported RoPE scaling {rope!r}: partial_rotary_factor != 1')
  theta = rope.get('rope_theta', hf.get('rope_theta', 10000.0))
  fields = dict(rope_theta=float(theta), rope_type=kind)
  if kind == 'llama3':
    missing = [key for key in _LLAMA3_KEYS.values() if rope.get(key) is None]
    if missing:
      raise CheckpointError(f"RoPE scaling 'llama3' lacks {missing} in {rope!r}")
    for ours, theirs in _LLAMA3_KEYS.items():
      fields[ours] = int(rope[theirs]) if ours == 'rope_original_max_position' else float(
          rope[theirs])
  return fields


def _sliding_window_from_hf(hf: dict[str, Any], model_type: str) -> int | None:
  if model_type == 'mistral':
    return hf.get('sliding_window')
  if model_type == 'llama':
    return None
  # qwen2: a window only with use_sliding_window, and then on layers >= max_window_layers
  # (or as `layer_types` lists); jaxlm has one window for all layers.
  if not hf.get('use_sliding_window', False) or hf.get('sliding_window') is None:
    return None
  n = hf['num_hidden_layers']
  types = hf.get('layer_types') or [
      'sliding_attention' if i >= hf.get('max_window_layers', 28) else 'full_attention'
      for i in range(n)]
  if set(types) == {'full_attention'}:
    return None
  if set(types) != {'sliding_attention'}:
    raise CheckpointError(
        f'unsupported: qwen2 use_sliding_window=True with max_window_layers='
        f'{hf.get("max_window_layers")!r} < num_hidden_layers={n} (layer_types {types}): '
        f'a sliding window on some layers only is not implemented')
  return hf['sliding_window']


def config_from_hf(hf: dict[str, Any], **overrides: Any) -> MistralConfig:
  """MistralConfig from a Hugging Face config.json dict (mistral, llama or qwen2)."""
  model_type = hf.get('model_type')
  archs = hf.get('architectures') or []
  if model_type not in HF_CLASSES or (archs and HF_CLASSES[model_type] not in archs):
    raise CheckpointError(
        f'unsupported architecture: model_type={model_type!r}, architectures={archs!r}; '
        f'jaxlm loads ' + ', '.join(f'model_type "{t}" ({c})' for t, c in HF_CLASSES.items()))
  if hf.get('hidden_act', 'silu') != 'silu':
    raise CheckpointError(f'unsupported hidden_act={hf["hidden_act"]!r}; jaxlm uses "silu"')
  if hf.get('mlp_bias', False):
    raise CheckpointError('unsupported: mlp_bias=True (jaxlm MLPs have no biases)')
  if model_type == 'qwen2':
    attention_bias = True   # Qwen2 always has q/k/v biases
  elif model_type == 'llama':
    attention_bias = bool(hf.get('attention_bias', False))
  else:
    attention_bias = False
  stored = hf.get('dtype') or hf.get('torch_dtype') or 'float32'
  stored = stored if stored in DTYPES else 'float32'
  bos, eos = hf.get('bos_token_id'), hf.get('eos_token_id')
  if isinstance(eos, list):
    eos = eos[0] if eos else None
  fields = dict(
      architecture=model_type,
      vocab_size=hf['vocab_size'], hidden_size=hf['hidden_size'],
      num_layers=hf['num_hidden_layers'], num_heads=hf['num_attention_heads'],
      num_kv_heads=hf.get('num_key_value_heads') or hf['num_attention_heads'],
      head_dim=hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads'],
      intermediate_size=hf['intermediate_size'], **_rope_from_hf(hf),
      sliding_window=_sliding_window_from_hf(hf, model_type),
      max_position_embeddings=hf.get('max_position_embeddings', 32768),
      rms_norm_eps=hf.get('rms_norm_eps', 1e-6),
      tie_word_embeddings=bool(hf.get('tie_word_embeddings', False)),
      attention_bias=attention_bias,
      initializer_range=hf.get('initializer_range', 0.02),
      bos_token_id=bos if isinstance(bos, int) else 1,
      eos_token_id=eos if isinstance(eos, int) else 2,
      param_dtype=stored, dtype=stored)
  fields.update(overrides)
  return MistralConfig(**fields)


def config_to_hf(cfg: MistralConfig, dtype: str) -> dict[str, Any]:
  """The config.json of `cfg` for transformers' class `HF_CLASSES[cfg.architecture]`."""
  rope: dict[str, Any] = {'rope_type': cfg.rope_type, 'rope_theta': cfg.rope_theta}
  if cfg.rope_type == 'llama3':
    rope.update({theirs: getattr(cfg, ours) for ours, theirs in _LLAMA3_KEYS.items()})
  hf = {
      'architectures': [HF_CLASSES[cfg.architecture]], 'model_type': cfg.architecture,
      'vocab_size': cfg.vocab_size, 'hidden_size': cfg.hidden_size,
      'intermediate_size': cfg.intermediate_size, 'num_hidden_layers': cfg.num_layers,
      'num_attention_heads': cfg.num_heads, 'num_key_value_heads': cfg.num_kv_heads,
      'head_dim': cfg.head_dim, 'hidden_act': 'silu',
      'max_position_embeddings': cfg.max_position_embeddings, 'rms_norm_eps': cfg.rms_norm_eps,
      'rope_theta': cfg.rope_theta, 'rope_parameters': rope,
      'tie_word_embeddings': cfg.tie_word_embeddings,
      'initializer_range': cfg.initializer_range, 'attention_dropout': 0.0,
      'bos_token_id': cfg.bos_token_id, 'eos_token_id': cfg.eos_token_id,
      'use_cache': True, 'torch_dtype': dtype, 'dtype': dtype,
  }
  if cfg.architecture == 'mistral':
    hf['sliding_window'] = cfg.sliding_window
  elif cfg.architecture == 'llama':
    hf.update(attention_bias=cfg.attention_bias, mlp_bias=False)
  else:   # qwen2 (q/k/v biases always): one window for all layers or none
    window = cfg.sliding_window is not None
    hf.update(use_sliding_window=window, sliding_window=cfg.sliding_window,
              max_window_layers=0 if window else cfg.num_layers,
              layer_types=[('sliding_attention' if window else 'full_attention')] *
              cfg.num_layers)
  return hf


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


class TensorSource(Protocol):
  """Hugging Face-named tensors in Hugging Face layout, read one at a time.

  Optionally `where(name) -> str` names the file holding a tensor (for messages)."""

  def names(self) -> list[str]: ...

  def shape(self, name: str) -> tuple[int, ...]: ...

  def tensor(self, name: str) -> np.ndarray: ...


class _SafetensorsDir:
  """The tensors of a Hugging Face checkpoint directory (one file or an index)."""

  def __init__(self, path: str):
    self.files = _tensor_files(path)
    self._handles = {file: _open(file) for file in sorted(set(self.files.values()))}

  def names(self) -> list[str]:
    return list(self.files)

  def where(self, name: str) -> str:
    return self.files[name]

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.files[name]].get_slice(name).get_shape())

  def tensor(self, name: str) -> np.ndarray:
    try:
      return self._handles[self.files[name]].get_tensor(name)
    except SafetensorError as e:
      raise CheckpointError(f'tensor {name} in {self.files[name]} cannot be read '
                            f'(truncated or corrupt file?): {e}') from e

  def close(self) -> None:
    self._handles.clear()


def load_hf(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
            rules: dict[str, tuple[str, ...]] | None = None,
            **config_overrides: Any) -> tuple[MistralConfig, Mistral]:
  """Load a Hugging Face Mistral, Llama or Qwen2 checkpoint directory into a jaxlm model.

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
  config_from_hf(hf_config)   # an unsupported architecture is reported before any tensor
  source = _SafetensorsDir(path)
  try:
    return load_tensors(hf_config, source, origin=path, dtype=dtype, mesh=mesh, rules=rules,
                        **config_overrides)
  finally:
    source.close()


def load_tensors(hf_config: dict[str, Any], source: TensorSource, *, origin: str,
                 dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
                 rules: dict[str, tuple[str, ...]] | None = None,
                 **config_overrides: Any) -> tuple[MistralConfig, Mistral]:
  """A jaxlm model from a config.json dict and its tensors, streamed one at a time.

  `load_hf` with safetensors files as `source`; any object with names(), shape(name)
  and tensor(name) in Hugging Face naming and layout works (origin names it in errors).
  Arguments as in `load_hf`.
  """
  if dtype is not None:
    config_overrides = {'param_dtype': dtype, 'dtype': dtype, **config_overrides}
  cfg = config_from_hf(hf_config, **config_overrides)

  abstract = abstract_model(cfg)
  graphdef, state = nnx.split(abstract)
  flat = list(nnx.to_flat_state(state))
  layout = _layout(cfg)
  names = set(source.names())
  where = getattr(source, 'where', lambda name: origin)

  expected = {}   # Hugging Face name -> (path, variable, layer index or None)
  for p, v in flat:
    hf_names = layout[p][0]
    for i, n in (enumerate(hf_names) if isinstance(hf_names, tuple) else [(None, hf_names)]):
      expected[n] = (p, v, i)
  embed_name = layout[('embed',)][0]
  # Tied checkpoints often store the head anyway; it must then equal the embedding.
  tied_head = 'lm_head.weight' if cfg.tie_word_embeddings and 'lm_head.weight' in names else None
  missing = sorted(set(expected) - names)
  extra = sorted(n for n in names - set(expected) - {tied_head}
                 if not n.endswith(_HARMLESS_EXTRA))
  if missing or extra:
    raise CheckpointError(
        f'{origin}: checkpoint does not match the config: missing tensors {missing[:8]}'
        f'{" ..." if len(missing) > 8 else ""} ({len(missing)}), unexpected tensors '
        f'{extra[:8]}{" ..." if len(extra) > 8 else ""} ({len(extra)})')

  # Validate every shape from the headers before reading any data.
  for name, (p, var, i) in expected.items():
    got = tuple(source.shape(name))
    want = _hf_shape(layout[p][2], var.shape if i is None else var.shape[1:])
    if got != want:
      raise CheckpointError(f'tensor {name} has shape {got} in {where(name)}, but the config '
                            f'expects {want}')
  if tied_head and tuple(source.shape(tied_head)) != tuple(source.shape(embed_name)):
    raise CheckpointError(
        f'tensor {tied_head} has shape {tuple(source.shape(tied_head))} in {where(tied_head)}, '
        f'but tie_word_embeddings=True expects the embedding\'s {tuple(source.shape(embed_name))}')
  target_dtype = DTYPES[cfg.param_dtype]
  values = []
  for p, var in flat:
    name, to_ours, _ = layout[p]
    if isinstance(name, tuple):   # scan_layers: the layers' tensors stacked
      host = np.stack([to_ours(source.tensor(n)) for n in name])
      sharding = shd.param_sharding(var, mesh, rules) if mesh is not None else None
      values.append((p, var.replace(value=shd.make_array(host, sharding, target_dtype))))
      del host
      continue
    raw = source.tensor(name)
    if name == embed_name and tied_head:
      if not np.array_equal(source.tensor(tied_head), raw):
        raise CheckpointError(
            f'{origin}: tie_word_embeddings=True, but tensor {tied_head} differs from '
            f'{embed_name}; set tie_word_embeddings to false in the config to load the '
            f'separate head')
    host = to_ours(raw)
    del raw
    sharding = shd.param_sharding(var, mesh, rules) if mesh is not None else None
    values.append((p, var.replace(value=shd.make_array(host, sharding, target_dtype))))
    del host
  return cfg, nnx.merge(graphdef, nnx.from_flat_state(values))


def load_gguf(path: str, *, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
              rules: dict[str, tuple[str, ...]] | None = None,
              **config_overrides: Any) -> tuple[MistralConfig, Mistral]:
  """Load a llama-architecture GGUF file (jaxlm.gguf): each tensor is dequantized to
  float32, laid out as Hugging Face's, then placed like `load_hf`'s (arguments as there)."""
  ck = _gguf(path)
  return load_tensors(ck.hf_config(), ck, origin=path, dtype=dtype, mesh=mesh, rules=rules,
                      **config_overrides)


def _gguf(path: str) -> GGUFCheckpoint:
  """One reader per file and process (its header takes seconds to parse)."""
  key = os.path.abspath(path)
  if key not in _GGUF_CACHE:
    _GGUF_CACHE[key] = GGUFCheckpoint(path)
  return _GGUF_CACHE[key]


_GGUF_CACHE: dict[str, GGUFCheckpoint] = {}


def checkpoint_path(spec: str) -> str:
  """A checkpoint spec as a local path: `embedded:NAME`, a .gguf file or an HF directory."""
  path = embedded.resolve(spec)
  if not os.path.exists(path):
    raise FileNotFoundError(f'checkpoint {spec!r} does not exist')
  if not (path.endswith('.gguf') or os.path.isdir(path)):
    raise CheckpointError(f'checkpoint {spec!r} is neither a Hugging Face directory nor a '
                          f'.gguf file')
  return path


def checkpoint_config(spec: str, **overrides: Any) -> MistralConfig:
  """The model config of a checkpoint (see checkpoint_path), without reading weights."""
  path = checkpoint_path(spec)
  if path.endswith('.gguf'):
    return config_from_hf(_gguf(path).hf_config(), **overrides)
  config_file = os.path.join(path, 'config.json')
  if not os.path.exists(config_file):
    raise CheckpointError(f'{path}: no config.json')
  with open(config_file) as f:
    return config_from_hf(json.load(f), **overrides)


def load_checkpoint(spec: str, **kwargs: Any) -> tuple[MistralConfig, Mistral]:
  """`load_gguf` or `load_hf`, by what `spec` names (see checkpoint_path)."""
  path = checkpoint_path(spec)
  return (load_gguf if path.endswith('.gguf') else load_hf)(path, **kwargs)


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
  """Write `model` as a Hugging Face checkpoint directory (config.json, safetensors) for
  transformers' class of `cfg.architecture` (tied models store no lm_head.weight).

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
  if any(str(k).endswith('_lora') for p, _ in flat for k in p):
    raise ValueError('save_hf: the model has LoRA adapters; save jaxlm.lora.merge(model) (the '
                     'merged weights), or the adapter alone with jaxlm.lora.save_peft')
  if set(p for p, _ in flat) != set(layout):
    raise ValueError(f'model parameters {sorted(set(p for p, _ in flat) ^ set(layout))[:8]} '
                     f'do not match the config')
  itemsize = np.dtype(DTYPES[dtype]).itemsize
  tensors = []   # (Hugging Face name, variable, layer index or None, ours_to_hf)
  for p, var in flat:
    names, _, to_hf = layout[p]
    for i, n in (enumerate(names) if isinstance(names, tuple) else [(None, names)]):
      tensors.append((n, var, i, to_hf))
  shards, current, size = [], [], 0
  for name, var, i, to_hf in sorted(tensors, key=lambda t: _hf_sort_key(t[0])):
    shape = _hf_shape(to_hf, var.shape if i is None else var.shape[1:])
    nbytes = int(np.prod(shape)) * itemsize
    if current and size + nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    # scan_layers: one layer's slice is fetched at a time
    fetch = (lambda v=var, f=to_hf, i=i: f(_to_host(v[...] if i is None else v[...][i])))
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
