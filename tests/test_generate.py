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
