"""Greedy decoding with the KV cache against transformers and the no-cache reference."""
import numpy as np
import pytest
import torch

from jaxlm import convert, generate

PROMPTS = [list(np.random.RandomState(1).randint(3, 128, n)) for n in (5, 13, 3)]


def hf_greedy(hf, prompts, max_new_tokens, eos_id=None):
  tokens, valid = generate.left_pad(prompts)
  with torch.no_grad():
    out = hf.generate(torch.as_tensor(tokens, dtype=torch.long),
                      attention_mask=torch.as_tensor(valid, dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                      eos_token_id=eos_id)
  out = out.numpy()[:, tokens.shape[1]:]
  return np.pad(out, ((0, 0), (0, max_new_tokens - out.shape[1])))  # HF stops early too


def test_cached_greedy_equals_transformers_and_nocache(hf_checkpoint):
  path, hf = hf_checkpoint   # sliding window 8, shorter than prompt + generation
  _, model = convert.load_hf(str(path))
  ours = generate.greedy_generate(model, PROMPTS, max_new_tokens=14)
  np.testing.assert_array_equal(ours, hf_greedy(hf, PROMPTS, 14))
  np.testing.assert_array_equal(
      ours, generate.greedy_generate_nocache(model, PROMPTS, max_new_tokens=14))


def test_stops_at_eos_and_pads(hf_checkpoint):
  path, hf = hf_checkpoint
  _, model = convert.load_hf(str(path))
  free = generate.greedy_generate(model, PROMPTS, max_new_tokens=10)
  eos = int(free[1, 3])  # a token row 1 emits mid-way; other rows may or may not emit it
  ours = generate.greedy_generate(model, PROMPTS, max_new_tokens=10, eos_id=eos)
  first = list(ours[1]).index(eos)
  assert first <= 3 and (ours[1, first + 1:] == 0).all()
  np.testing.assert_array_equal(ours, hf_greedy(hf, PROMPTS, 10, eos_id=eos))
  np.testing.assert_array_equal(
      ours, generate.greedy_generate_nocache(model, PROMPTS, max_new_tokens=10, eos_id=eos))


def test_bucketed_padding_does_not_change_output(hf_checkpoint):
  _, model = convert.load_hf(str(hf_checkpoint[0]))
  a = generate.greedy_generate(model, PROMPTS, max_new_tokens=6)
  b = generate.greedy_generate(model, PROMPTS, max_new_tokens=6, multiple=32)
  np.testing.assert_array_equal(a, b)


def test_bad_arguments():
  with pytest.raises(ValueError, match='at least one token'):
    generate.left_pad([[1, 2], []])
  with pytest.raises(ValueError, match='max_new_tokens must be positive, got 0'):
    generate.greedy_generate(None, [[1]], max_new_tokens=0)


@pytest.mark.parametrize('impl', ['chunked', 'blockwise'])   # dense: the tests above
def test_prefill_as_self_attention_equals_attending_the_whole_cache(hf_checkpoint, impl,
                                                                    monkeypatch):
  """decode(prefill=True) attends among the prompt tokens with the training kernels; the
  logits and the cache it leaves must be those of attending densely over the whole (empty
  but for the prompt) buffer, on left-padded rows and with a sliding window (8); the
  longest prompt spans three of the chunked kernel's 64-query chunks."""
  import jax
  import jax.numpy as jnp
  from jaxlm.model import KVCache
  _, model = convert.load_hf(str(hf_checkpoint[0]), attention_impl=impl,
                             attention_block_q=16, attention_block_kv=16)
  assert model.cfg.sliding_window == 8
  prompts = [list(np.random.RandomState(2).randint(3, 128, n)) for n in (70, 150, 9)]
  tokens, valid = generate.left_pad(prompts)
  positions = generate.prompt_positions(jnp.asarray(valid))
  pads = ~valid
  np.testing.assert_array_equal(np.asarray(positions)[pads], np.concatenate(
      [np.arange(n) for n in pads.sum(1)]))   # padding: 0..p-1 of its own segment
  import jaxlm.attention
  calls = []   # the kernel sees the prompt alone (T = S = P) only on the prefill path
  kernel = getattr(jaxlm.attention, f'attend_{impl}')
  monkeypatch.setattr(jaxlm.attention, f'attend_{impl}', lambda q, k, v, **kw: (
      calls.append(k.shape[1]), kernel(q, k, v, **kw))[1])
  outs = []
  for prefill in (False, True):
    cache = KVCache.init(model.cfg, len(prompts), tokens.shape[1] + 4)
    logits, cache = model.decode(jnp.asarray(tokens), positions, jnp.asarray(valid, jnp.int32),
                                 cache, prefill=prefill)
    outs.append((np.asarray(logits)[valid], jax.tree.map(np.asarray, cache)))
  assert tokens.shape[1] in calls
  np.testing.assert_allclose(outs[1][0], outs[0][0], atol=2e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(outs[1][1]), jax.tree.leaves(outs[0][1])):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)


def test_prefill_kernel_by_platform():
  """Self-attention prefill only with kernels that take padded rows at any length: not
  splash (blocks must divide the length) or cudnn (no segment ids), nor ring."""
  from jaxlm.attention import prefill_impl
  assert prefill_impl('auto', 384, platform='cpu') == 'chunked'
  assert prefill_impl('auto', 4096, platform='cpu') == 'blockwise'
  assert prefill_impl('auto', 384, platform='gpu') == 'dense'
  assert prefill_impl('auto', 200, platform='tpu') is None
  for impl in ('cudnn', 'splash', 'ring'):
    assert prefill_impl(impl, 384, platform='cpu') is None
