"""GGUF import: tensors, layout and logits against transformers' own GGUF loader.

A tiny random Llama is written as a GGUF file the way llama.cpp's converter writes one (q/k
rows permuted to interleaved RoPE order, every tensor type jaxlm reads); transformers
(`from_pretrained(..., gguf_file=...)`) is the independent reference for what it holds.
"""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import embedded_file, hf_logits
from jaxlm import convert
from jaxlm.gguf import GGUFCheckpoint, GGUFError, _tensor_data, read_header, unpermute_rope_rows

gguf = pytest.importorskip('gguf')
Q = gguf.GGMLQuantizationType

_GGUF_NAMES = {
    'input_layernorm': 'attn_norm', 'post_attention_layernorm': 'ffn_norm',
    'self_attn.q_proj': 'attn_q', 'self_attn.k_proj': 'attn_k', 'self_attn.v_proj': 'attn_v',
    'self_attn.o_proj': 'attn_output', 'mlp.gate_proj': 'ffn_gate', 'mlp.up_proj': 'ffn_up',
    'mlp.down_proj': 'ffn_down'}
# One matrix of each type jaxlm supports (K-quants need rows of 256: ffn_down's input).
TYPES = {'attn_q': Q.Q8_0, 'attn_k': Q.Q4_0, 'attn_v': Q.Q4_1, 'attn_output': Q.F16,
         'ffn_gate': Q.BF16, 'ffn_up': Q.F32, 'token_embd': Q.Q8_0}
K_QUANTS = {0: (Q.Q4_K, 144, (0, 4)), 1: (Q.Q6_K, 210, (208, 210))}  # bytes per 256, f16 scales


def _permute(w, n_heads):
  """Hugging Face rotate-half rows -> llama.cpp's interleaved order (what convert_hf_to_gguf
  does); the inverse of jaxlm.gguf.unpermute_rope_rows."""
  out, d_in = w.shape
  return w.reshape(n_heads, 2, out // n_heads // 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _k_quant_bytes(rows, cols, qtype, block_bytes, scale_at, rng):
  """Random valid K-quant blocks (the gguf package dequantizes but cannot quantize them):
  random bits with small finite f16 super-block scales."""
  data = rng.randint(0, 256, (rows, cols // 256, block_bytes)).astype(np.uint8)
  for start in range(*scale_at, 2):
    data[:, :, start:start + 2] = np.frombuffer(np.float16(0.004).tobytes(), np.uint8)
  return data.reshape(rows, -1)


def write_gguf(path, model, *, arch='llama', extra_tensor=None):
  """Write a transformers LlamaForCausalLM as a GGUF file with mixed tensor types."""
  c, rng = model.config, np.random.RandomState(0)
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name('tiny-llama')
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(c.num_attention_heads)
  w.add_head_count_kv(c.num_key_value_heads)
  w.add_rope_freq_base(c.rope_parameters['rope_theta'])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
  w.add_tokenizer_model('gpt2')
  w.add_tokenizer_pre('smollm')
  w.add_token_list([f'<t{i}>' for i in range(c.vocab_size)])
  w.add_token_types([1] * c.vocab_size)
  w.add_token_merges([])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  for name, t in model.state_dict().items():
    x = t.float().numpy()
    parts = name.split('.')
    if name.startswith('model.layers.'):
      layer, key = int(parts[2]), _GGUF_NAMES['.'.join(parts[3:-1])]
      gname = f'blk.{layer}.{key}.{parts[-1]}'
    else:
      key = {'model.embed_tokens': 'token_embd', 'model.norm': 'output_norm',
             'lm_head': 'output'}['.'.join(parts[:-1])]
      gname = f'{key}.weight'
      if key == 'output' and c.tie_word_embeddings:
        continue
    if key == 'attn_q':
      x = _permute(x, c.num_attention_heads)
    elif key == 'attn_k':
      x = _permute(x, c.num_key_value_heads)
    if key == 'ffn_down':
      qtype, nbytes, scale_at = K_QUANTS[layer % 2]
      w.add_tensor(gname, _k_quant_bytes(*x.shape, qtype, nbytes, scale_at, rng),
                   raw_dtype=qtype)
    elif x.ndim == 1 or TYPES.get(key, Q.F32) == Q.F32:
      w.add_tensor(gname, x)
    else:
      qtype = TYPES[key]
      w.add_tensor(gname, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  if extra_tensor is not None:
    w.add_tensor(*extra_tensor)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


def tiny_llama(tied, seed=0):
  import torch
  import transformers
  torch.manual_seed(seed)
  cfg = transformers.LlamaConfig(
      vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      rope_theta=5e4, rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.1)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  return model


def _reference(path):
  """transformers' reading of a GGUF file: the model, float32."""
  import torch
  import transformers
  return transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()


@pytest.mark.parametrize('tied', [True, False])
def test_load_gguf_matches_transformers(tmp_path, tied):
  path = write_gguf(tmp_path / 'tiny.gguf', tiny_llama(tied))
  ck = GGUFCheckpoint(path)
  assert {ck.tensor_type(n) for n in ck.names()} >= {
      'F32', 'F16', 'BF16', 'Q8_0', 'Q4_0', 'Q4_1', 'Q4_K', 'Q6_K'}
  ref = _reference(path)
  state = ref.state_dict()
  for name in ck.names():     # every tensor, dequantized and un-permuted, bit for bit
    np.testing.assert_array_equal(ck.tensor(name), state[name].numpy(), err_msg=name)
  cfg, model = convert.load_gguf(path)
  assert cfg.architecture == 'llama' and cfg.tie_word_embeddings == tied
  assert cfg.num_kv_heads == 2 and cfg.sliding_window is None
  tokens = np.random.RandomState(1).randint(0, 96, (2, 24))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(ref, tokens),
                             atol=1e-4, rtol=1e-4)


def test_unpermute_inverts_llama_cpp_order():
  w = np.arange(8 * 3 * 5, dtype=np.float32).reshape(24, 5)   # 3 heads of 8
  np.testing.assert_array_equal(unpermute_rope_rows(_permute(w, 3), 3), w)
  assert not np.array_equal(_permute(w, 3), w)


def test_bad_gguf_files_are_named(tmp_path):
  model = tiny_llama(True)
  with pytest.raises(GGUFError, match=r"general.architecture='gpt2' is not supported"):
    GGUFCheckpoint(write_gguf(tmp_path / 'a.gguf', model, arch='gpt2'))
  odd = ('blk.0.attn_q.weight_iq', np.zeros((4, 32), np.float32))
  with pytest.raises(GGUFError, match=r"unexpected tensor 'blk.0.attn_q.weight_iq'"):
    GGUFCheckpoint(write_gguf(tmp_path / 'b.gguf', model, extra_tensor=odd))
  iq = ('blk.0.attn_q.bias', np.zeros((1, 44), np.uint8), None, Q.Q5_0)   # 64 values
  with pytest.raises(GGUFError, match=r'blk.0.attn_q.bias has type Q5_0'):
    GGUFCheckpoint(write_gguf(tmp_path / 'c.gguf', model, extra_tensor=iq))
  (tmp_path / 'd.gguf').write_bytes(b'GGUF' + b'\0' * 20)
  with pytest.raises(GGUFError, match='not a readable GGUF file'):
    GGUFCheckpoint(str(tmp_path / 'd.gguf'))


def _same_as_gguf_reader(path):
  """jaxlm's header parser against the gguf package's GGUFReader: every metadata field,
  the tensor table and each tensor's raw data."""
  ref = gguf.GGUFReader(path)
  header = read_header(path)
  assert header.version == ref.fields['GGUF.version'].contents()
  ref_fields = {k: f.contents() for k, f in ref.fields.items() if not k.startswith('GGUF.')}
  assert list(header.fields) == list(ref_fields)
  for key, value in ref_fields.items():
    assert header.fields[key] == value, key
  assert [t.name for t in header.tensors] == [t.name for t in ref.tensors]
  data = np.memmap(path, np.uint8, mode='r')
  for t, r in zip(header.tensors, ref.tensors):
    assert t.dims == tuple(r.shape.tolist()) and t.type_id == r.tensor_type, t.name
    assert t.offset == r.data_offset, t.name
    raw = _tensor_data(data, t)
    assert raw.dtype == r.data.dtype and raw.shape == r.data.shape, t.name
    np.testing.assert_array_equal(raw, r.data, err_msg=t.name)
  return header


def test_header_reader_agrees_with_gguf_package(tmp_path):
  header = _same_as_gguf_reader(write_gguf(tmp_path / 'tiny.gguf', tiny_llama(False)))
  assert header.fields['tokenizer.ggml.tokens'][:2] == ['<t0>', '<t1>']
  assert header.fields['llama.block_count'] == 2


def test_header_reader_on_the_embedded_model():
  header = _same_as_gguf_reader(embedded_file())   # 49152 tokens, 48900 merges
  assert len(header.fields['tokenizer.ggml.tokens']) == 49152


def test_bad_headers_are_named(tmp_path):
  path = write_gguf(tmp_path / 'tiny.gguf', tiny_llama(True))
  raw = open(path, 'rb').read()
  cases = {'magic': (b'GGUG' + raw[4:], "not the magic"),
           'big-endian': (raw[:4] + (3).to_bytes(4, 'big') + raw[8:], 'a big-endian file'),
           'version': (raw[:4] + (1).to_bytes(4, 'little') + raw[8:], 'version 1;'),
           'truncated': (raw[:600], 'not a readable GGUF file'),
           'empty': (b'', '0 bytes, shorter than a GGUF header')}
  for name, (data, match) in cases.items():
    (tmp_path / f'{name}.gguf').write_bytes(data)
    with pytest.raises(GGUFError, match=match):
      read_header(str(tmp_path / f'{name}.gguf'))
  (tmp_path / 'short.gguf').write_bytes(raw[:len(raw) - 64])   # the last tensor's end cut
  ck = GGUFCheckpoint(str(tmp_path / 'short.gguf'))
  with pytest.raises(GGUFError, match='run past the end of the file'):
    for name in ck.names():
      ck.tensor(name)
