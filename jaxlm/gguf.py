"""GGUF files (llama.cpp) read as Hugging Face-named float32 tensors.

`GGUFCheckpoint(path)` reads the header (metadata and tensor table) and exposes the
checkpoint the way a Hugging Face directory would: `hf_config()` is a config.json dict
(LlamaForCausalLM), `names()` / `shape(name)` / `tensor(name)` give each weight under its
Hugging Face name and in its layout, dequantized one tensor at a time with the `gguf`
package. `jaxlm.convert.load_gguf` streams them into a model exactly as it does
safetensors. Tokenizer metadata is read by `jaxlm.tokenizer`.

Two layout differences from Hugging Face are undone here:
- GGUF dimensions are listed innermost first; numpy arrays of the data are [out, in], as
  Hugging Face's linear weights.
- llama.cpp's converter permutes the rows of q and k so that RoPE rotates interleaved
  pairs (x0, x1), (x2, x3), ...; Hugging Face rotates the halves (x_i, x_{i+Dh/2}).
  Row j*2+t of each head (pair j, member t) goes back to row t*Dh/2 + j.
"""

from __future__ import annotations

import os
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


def _field(reader, key: str, default: Any = None) -> Any:
  f = reader.fields.get(key)
  return default if f is None else f.contents()


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
    import gguf
    if not os.path.isfile(path):
      raise FileNotFoundError(f'GGUF file {path!r} does not exist')
    self.path = path
    try:
      self.reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001  (the gguf package raises plain errors on bad files)
      raise GGUFError(f'{path}: not a readable GGUF file ({type(e).__name__}: {e})') from e
    arch = _field(self.reader, 'general.architecture')
    if arch not in ARCHITECTURES:
      raise GGUFError(f'{path}: general.architecture={arch!r} is not supported; jaxlm reads '
                      f'{list(ARCHITECTURES)} GGUF files (Llama, Mistral, SmolLM2 checkpoints)')
    self.arch = arch
    self._tensors: dict[str, Any] = {}
    for t in self.reader.tensors:
      name = hf_name(t.name)
      if name is None:
        if t.name == 'rope_freqs.weight':
          raise GGUFError(f'{path}: tensor rope_freqs.weight (per-frequency RoPE scaling, as '
                          f'in Llama 3.1 GGUFs) is not supported; load the Hugging Face '
                          f'checkpoint with convert.load_hf instead')
        raise GGUFError(f'{path}: unexpected tensor {t.name!r} for architecture {arch!r}')
      if t.tensor_type.name not in SUPPORTED_TYPES:
        raise GGUFError(f'{path}: tensor {t.name} has type {t.tensor_type.name}; supported '
                        f'types are {list(SUPPORTED_TYPES)}')
      self._tensors[name] = t
    self._config = self._read_config()

  def _meta(self, key: str, default: Any = None) -> Any:
    return _field(self.reader, f'{self.arch}.{key}', default)

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
      vocab = len(self.reader.fields['tokenizer.ggml.tokens'].data)
    window = self._meta('attention.sliding_window')
    bos = _field(self.reader, 'tokenizer.ggml.bos_token_id', 1)
    eos = _field(self.reader, 'tokenizer.ggml.eos_token_id', 2)
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
        'name': _field(self.reader, 'general.name'),
    }

  def hf_config(self) -> dict[str, Any]:
    """The model's Hugging Face config.json equivalent (a copy)."""
    return dict(self._config)

  def names(self) -> list[str]:
    return list(self._tensors)

  def shape(self, name: str) -> tuple[int, ...]:
    """Hugging Face shape of tensor `name` ([out, in] for matrices)."""
    return tuple(int(n) for n in reversed(self._tensors[name].shape.tolist()))

  def tensor_type(self, name: str) -> str:
    return self._tensors[name].tensor_type.name

  def tensor(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 in Hugging Face layout."""
    import gguf
    t = self._tensors[name]
    w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32)
    w = w.reshape(self.shape(name))
    c = self._config
    if name.endswith('self_attn.q_proj.weight') or name.endswith('self_attn.q_proj.bias'):
      w = unpermute_rope_rows(w.reshape(w.shape[0], -1), c['num_attention_heads']).reshape(w.shape)
    elif name.endswith('self_attn.k_proj.weight') or name.endswith('self_attn.k_proj.bias'):
      w = unpermute_rope_rows(w.reshape(w.shape[0], -1), c['num_key_value_heads']).reshape(w.shape)
    return w
