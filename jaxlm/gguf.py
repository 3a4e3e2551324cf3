"""GGUF files (llama.cpp) read as Hugging Face-named float32 tensors.

`read_header(path)` parses the header (metadata and tensor table) with `struct` over a
memory map: the `gguf` package's `GGUFReader` builds a numpy view per item and takes 2.8 s
on SmolLM2's 49K-token vocabulary, this 0.06 s (`python -m jaxlm.bench.load`;
tests/test_gguf.py checks that both read the same fields, tensor table and tensor data).
`GGUFCheckpoint(path)` reads the header and exposes the checkpoint the way a Hugging Face
directory would: `hf_config()` is a config.json dict (LlamaForCausalLM), `names()` /
`shape(name)` / `tensor(name)` give each weight under its Hugging Face name and in its
layout, dequantized one tensor at a time with the `gguf` package. `jaxlm.convert.load_gguf`
streams them into a model exactly as it does safetensors. Tokenizer metadata is read by
`jaxlm.tokenizer`.

Two layout differences from Hugging Face are undone here:
- GGUF dimensions are listed innermost first; numpy arrays of the data are [out, in], as
  Hugging Face's linear weights.
- llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved
  pairs (x0, x1), (x2, x3), ...; Hugging Face rotates the halves (x_i, x_{i+Dh/2}).
  Row j*2+t of each head (pair j, member t) goes back to row t*Dh/2 + j.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
from typing import Any

import numpy as np

SUPPORTED_TYPES = ('F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K')
ARCHITECTURES = ('llama',)

_BLOCK = {   # GGUF per-layer tensor -> Hugging Face name (after model.layers.N.)
    'attn_norm': 'input_layernorm', 'ffn_norm': 'post_attention_layernorm',
    'attn_q': 'self_attn.q_proj', 'attn_k': 'self_attn.k_proj', 'attn_v': 'self_attn.v_proj',
    'attn_output': 'self_attn.o_proj', 'ffn_gate': 'mlp.gate_proj', 'ffn_up': 'mlp.up_proj',
    'ffn_down': 'mlp.down_proj',
}
_TOP = {'token_embd': 'model.embed_tokens', 'output_norm': 'model.norm', 'output': 'lm_head'}


class GGUFError(ValueError):
  """A GGUF file that jaxlm cannot read: its architecture, a tensor type, or its header."""


# GGUF metadata value types (gguf.GGUFValueType): struct formats of the scalars.
_SCALARS = {0: '<B', 1: '<b', 2: '<H', 3: '<h', 4: '<I', 5: '<i', 6: '<f', 7: '<?',
            10: '<Q', 11: '<q', 12: '<d'}
_STRING, _ARRAY = 8, 9
_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One entry of the tensor table: `dims` innermost first, as the file lists them;
  `offset` from the start of the file."""
  name: str
  dims: tuple[int, ...]
  type_id: int
  offset: int


@dataclasses.dataclass(frozen=True)
class GGUFHeader:
  version: int
  fields: dict[str, Any]        # key -> str | int | float | bool | list
  tensors: list[TensorInfo]


class _Cursor:

  def __init__(self, buf):
    self.buf, self.off = buf, 0

  def scalar(self, fmt: str):
    (x,) = struct.unpack_from(fmt, self.buf, self.off)
    self.off += struct.calcsize(fmt)
    return x

  def string(self) -> str:
    n = self.scalar('<Q')
    end = self.off + n
    if end > len(self.buf):
      raise ValueError(f'a string of {n} bytes at offset {self.off} runs past the end')
    out = bytes(self.buf[self.off:end]).decode('utf-8')
    self.off = end
    return out

  def value(self, vtype: int) -> Any:
    if vtype == _STRING:
      return self.string()
    if vtype == _ARRAY:
      itype, n = self.scalar('<I'), self.scalar('<Q')
      if itype in (_STRING, _ARRAY):
        return [self.value(itype) for _ in range(n)]
      if itype not in _SCALARS:
        raise ValueError(f'unknown array item type {itype} at offset {self.off}')
      dtype = np.dtype(_SCALARS[itype])
      items = np.frombuffer(self.buf, dtype, n, self.off).tolist()
      self.off += n * dtype.itemsize
      return items
    if vtype not in _SCALARS:
      raise ValueError(f'unknown value type {vtype} at offset {self.off}')
    return self.scalar(_SCALARS[vtype])


def read_header(path: str) -> GGUFHeader:
  """The metadata fields and tensor table of a little-endian GGUF file (versions 2, 3).
  Raises GGUFError naming the file and what is wrong with it."""
  with open(path, 'rb') as f:
    if os.fstat(f.fileno()).st_size < 24:
      raise GGUFError(f'{path}: not a readable GGUF file ({os.fstat(f.fileno()).st_size} '
                      f'bytes, shorter than a GGUF header)')
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
      try:
        return _parse(_Cursor(buf))
      except (ValueError, struct.error, UnicodeDecodeError) as e:
        raise GGUFError(f'{path}: not a readable GGUF file ({type(e).__name__}: {e})') from e


def _parse(cur: _Cursor) -> GGUFHeader:
  if bytes(cur.buf[:4]) != b'GGUF':
    raise ValueError(f'the file starts with {bytes(cur.buf[:4])!r}, not the magic b"GGUF"')
  cur.off = 4
  version = cur.scalar('<I')
  if version not in _VERSIONS:
    swapped = int.from_bytes(version.to_bytes(4, 'little'), 'big')
    raise ValueError(f'version {version}' + (' (a big-endian file: not supported)'
                                              if swapped in _VERSIONS else '') +
                     f'; jaxlm reads versions {list(_VERSIONS)}')
  n_tensors, n_fields = cur.scalar('<Q'), cur.scalar('<Q')
  fields = {}
  for _ in range(n_fields):
    key = cur.string()
    fields[key] = cur.value(cur.scalar('<I'))
  table = []
  for _ in range(n_tensors):
    name = cur.string()
    dims = tuple(cur.scalar('<Q') for _ in range(cur.scalar('<I')))
    table.append((name, dims, cur.scalar('<I'), cur.scalar('<Q')))
  align = fields.get('general.alignment', _DEFAULT_ALIGNMENT)
  if not isinstance(align, int) or align <= 0 or align & (align - 1):
    raise ValueError(f'general.alignment={align!r} is not a power of two')
  start = -(-cur.off // align) * align
  tensors, seen = [], set()
  for name, dims, type_id, offset in table:
    if name in seen:
      raise ValueError(f'tensor {name!r} appears twice')
    seen.add(name)
    tensors.append(TensorInfo(name, dims, type_id, start + offset))
  return GGUFHeader(version, fields, tensors)


def _tensor_data(data: np.ndarray, t: TensorInfo) -> np.ndarray:
  """The raw data of tensor `t` as the gguf package lays it out for `gguf.quants.dequantize`
  (float arrays for F32/F16, rows of bytes for block-quantized types), numpy order."""
  import gguf
  qtype = gguf.GGMLQuantizationType(t.type_id)
  block, type_size = gguf.GGML_QUANT_SIZES[qtype]
  n = int(np.prod(t.dims))
  dims = tuple(reversed(t.dims))
  nbytes = n * type_size // block
  if t.offset + nbytes > data.size:
    raise GGUFError(f'tensor {t.name}: {nbytes} bytes at offset {t.offset} run past the end '
                    f'of the file ({data.size} bytes)')
  raw = data[t.offset:t.offset + nbytes]
  if qtype == gguf.GGMLQuantizationType.F32:
    return raw.view(np.float32).reshape(dims)
  if qtype == gguf.GGMLQuantizationType.F16:
    return raw.view(np.float16).reshape(dims)
  return raw.reshape(gguf.quant_shape_to_byte_shape(dims, qtype))


def hf_name(gguf_name: str) -> str | None:
  """The Hugging Face name of a GGUF tensor name, None for tensors jaxlm does not use."""
  parts = gguf_name.split('.')
  if parts[-1] not in ('weight', 'bias'):
    return None
  if parts[0] == 'blk' and len(parts) == 4 and parts[2] in _BLOCK:
    return f'model.layers.{int(parts[1])}.{_BLOCK[parts[2]]}.{parts[3]}'
  if len(parts) == 2 and parts[0] in _TOP:
    return f'{_TOP[parts[0]]}.{parts[1]}'
  return None


def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """llama.cpp's interleaved q/k rows -> Hugging Face's rotate-half order."""
  out, d_in = w_OxI.shape
  head_dim = out // n_heads
  return (w_OxI.reshape(n_heads, head_dim // 2, 2, d_in).swapaxes(1, 2)
          .reshape(out, d_in))


class GGUFCheckpoint:
  """The weights and model metadata of a llama-architecture GGUF file."""

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise FileNotFoundError(f'GGUF file {path!r} does not exist')
    self.path = path
    header = read_header(path)
    self.fields = header.fields
    self._data = np.memmap(path, np.uint8, mode='r')
    arch = self.fields.get('general.architecture')
    if arch not in ARCHITECTURES:
      raise GGUFError(f'{path}: general.architecture={arch!r} is not supported; jaxlm reads '
                      f'{list(ARCHITECTURES)} GGUF files (Llama, Mistral, SmolLM2 checkpoints)')
    self.arch = arch
    self._tensors: dict[str, TensorInfo] = {}
    for t in header.tensors:
      name = hf_name(t.name)
      if name is None:
        if t.name == 'rope_freqs.weight':
          raise GGUFError(f'{path}: tensor rope_freqs.weight (per-frequency RoPE scaling, as '
                          f'in Llama 3.1 GGUFs) is not supported; load the Hugging Face '
                          f'checkpoint with convert.load_hf instead')
        raise GGUFError(f'{path}: unexpected tensor {t.name!r} for architecture {arch!r}')
      qtype = _type_name(t.type_id)
      if qtype not in SUPPORTED_TYPES:
        raise GGUFError(f'{path}: tensor {t.name} has type {qtype}; supported '
                        f'types are {list(SUPPORTED_TYPES)}')
      self._tensors[name] = t
    self._config = self._read_config()

  def _meta(self, key: str, default: Any = None) -> Any:
    return self.fields.get(f'{self.arch}.{key}', default)

  def _read_config(self) -> dict[str, Any]:
    required = ('block_count', 'embedding_length', 'feed_forward_length',
                'attention.head_count')
    missing = [f'{self.arch}.{k}' for k in required if self._meta(k) is None]
    if missing:
      raise GGUFError(f'{self.path}: missing metadata {missing}')
    scaling = self._meta('rope.scaling.type')
    if scaling not in (None, 'none'):
      raise GGUFError(f'{self.path}: {self.arch}.rope.scaling.type={scaling!r} is not '
                      f'supported (only unscaled RoPE is read from GGUF)')
    d, heads = int(self._meta('embedding_length')), int(self._meta('attention.head_count'))
    kv_heads = int(self._meta('attention.head_count_kv', heads))
    head_dim = int(self._meta('attention.key_length', self._meta('rope.dimension_count',
                                                                 d // heads)))
    vocab = self._meta('vocab_size')
    if vocab is None:
      vocab = len(self.fields['tokenizer.ggml.tokens'])
    window = self._meta('attention.sliding_window')
    bos = self.fields.get('tokenizer.ggml.bos_token_id', 1)
    eos = self.fields.get('tokenizer.ggml.eos_token_id', 2)
    return {
        'architectures': ['LlamaForCausalLM'], 'model_type': 'llama',
        'vocab_size': int(vocab), 'hidden_size': d,
        'intermediate_size': int(self._meta('feed_forward_length')),
        'num_hidden_layers': int(self._meta('block_count')),
        'num_attention_heads': heads, 'num_key_value_heads': kv_heads, 'head_dim': head_dim,
        'hidden_act': 'silu', 'rope_theta': float(self._meta('rope.freq_base', 10000.0)),
        'max_position_embeddings': int(self._meta('context_length', 4096)),
        'rms_norm_eps': float(self._meta('attention.layer_norm_rms_epsilon', 1e-5)),
        'sliding_window': int(window) if window else None,
        'tie_word_embeddings': 'lm_head.weight' not in self._tensors,
        'attention_bias': 'model.layers.0.self_attn.q_proj.bias' in self._tensors,
        'bos_token_id': int(bos), 'eos_token_id': int(eos), 'torch_dtype': 'float32',
        'name': self.fields.get('general.name'),
    }

  def hf_config(self) -> dict[str, Any]:
    """The model's Hugging Face config.json equivalent (a copy)."""
    return dict(self._config)

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """Hugging Face shape of tensor `name` ([out, in] for matrices)."""
    return tuple(reversed(self._tensors[name].dims))

  def tensor_type(self, name: str) -> str:
    return _type_name(self._tensors[name].type_id)

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 in Hugging Face layout."""
    import gguf
    t = self._tensors[name]
    w = np.asarray(gguf.quants.dequantize(_tensor_data(self._data, t),
                                          gguf.GGMLQuantizationType(t.type_id)), np.float32)
    w = w.reshape(self.shape(name))
    c = self._config
    if name.endswith('self_attn.q_proj.weight') or name.endswith('self_attn.q_proj.bias'):
      w = unpermute_rope_rows(w.reshape(w.shape[0], -1), c['num_attention_heads']).reshape(w.shape)
    elif name.endswith('self_attn.k_proj.weight') or name.endswith('self_attn.k_proj.bias'):
      w = unpermute_rope_rows(w.reshape(w.shape[0], -1), c['num_key_value_heads']).reshape(w.shape)
    return w


def _type_name(type_id: int) -> str:
  import gguf
  try:
    return gguf.GGMLQuantizationType(type_id).name
  except ValueError:
    return f'unknown ({type_id})'
