"""Llama and Qwen2 checkpoints (tied embeddings, q/k/v biases, 'llama3' RoPE scaling)
against transformers: logits, export round trips and greedy generation."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_logits
from jaxlm import convert, generate
from test_generate import PROMPTS, hf_greedy

# head_dim 8: inverse frequencies 1, 0.1, 0.01, 0.001 (wavelengths 6, 63, 628, 6283). With
# an original context of 64, low/high frequency factors 1/8, the first is kept, the second
# interpolated, the last two divided by the factor: every branch of the formula is used.
LLAMA3 = {'rope_type': 'llama3', 'rope_theta': 1e4, 'factor': 4.0, 'low_freq_factor': 1.0,
          'high_freq_factor': 8.0, 'original_max_position_embeddings': 64}

CASES = {
    'llama': ('llama', {}),
    'llama-tied': ('llama', dict(tie_word_embeddings=True)),
    'llama-llama3': ('llama', dict(rope_parameters=LLAMA3)),
    'llama-bias-headdim': ('llama', dict(attention_bias=True, head_dim=12)),
    'qwen2': ('qwen2', {}),
    'qwen2-tied': ('qwen2', dict(tie_word_embeddings=True)),
    'mistral-tied': ('mistral', dict(tie_word_embeddings=True, sliding_window=None)),
}


def make_family_model(path, arch, seed=0, **overrides):
  """A random transformers Llama/Qwen2/Mistral ForCausalLM with norms and biases
  randomized too (so a mis-mapped one shows), saved to `path`."""
  import torch
  import transformers
  classes = {'llama': (transformers.LlamaConfig, transformers.LlamaForCausalLM),
             'qwen2': (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
             'mistral': (transformers.MistralConfig, transformers.MistralForCausalLM)}
  config_cls, model_cls = classes[arch]
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                initializer_range=0.1, rms_norm_eps=1e-5)
  if 'rope_parameters' not in overrides:
    kwargs['rope_parameters'] = {'rope_type': 'default', 'rope_theta': 5e4}
  kwargs.update(overrides)
  model = model_cls(config_cls(**kwargs)).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn_like(p))
  model.save_pretrained(str(path))
  return model


@pytest.fixture(scope='module', params=list(CASES))
def family_checkpoint(request, tmp_path_factory):
  """(case name, path, torch model) for each case of CASES."""
  arch, overrides = CASES[request.param]
  path = tmp_path_factory.mktemp(request.param)
  return request.param, path, make_family_model(path, arch, seed=1, **overrides)


def _tokens(case, length=24):
  return np.random.RandomState(0).randint(0, 128, (2, 96 if 'llama3' in case else length))


def test_logits_match_transformers(family_checkpoint):
  case, path, hf = family_checkpoint
  arch, overrides = CASES[case]
  cfg, model = convert.load_hf(str(path))
  assert cfg.architecture == arch
  assert cfg.tie_word_embeddings == overrides.get('tie_word_embeddings', False)
  assert cfg.attention_bias == (arch == 'qwen2' or overrides.get('attention_bias', False))
  assert cfg.sliding_window is None
  assert hasattr(model, 'lm_head') != cfg.tie_word_embeddings
  tokens = _tokens(case)
  ref = hf_logits(hf, tokens)
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), ref, atol=1e-4, rtol=0)
  if cfg.rope_type == 'llama3':   # the scaling matters at these positions
    _, unscaled = convert.load_hf(str(path), rope_type='default')
    assert np.abs(np.asarray(unscaled(jnp.asarray(tokens))) - ref).max() > 1e-2


def test_export_roundtrip(family_checkpoint, tmp_path):
  """save_hf -> transformers loads the same class and logits; -> load_hf the same params."""
  import transformers
  case, path, hf = family_checkpoint
  cfg, model = convert.load_hf(str(path))
  out = str(tmp_path / 'out')
  convert.save_hf(cfg, model, out)
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(back) is type(hf)
  assert back.config.tie_word_embeddings == cfg.tie_word_embeddings
  tokens = _tokens(case)
  np.testing.assert_array_equal(hf_logits(back, tokens), hf_logits(hf, tokens))
  cfg_again, again = convert.load_hf(out)
  assert cfg_again == cfg
  a = nnx.to_flat_state(nnx.state(model, nnx.Param))
  b = nnx.to_flat_state(nnx.state(again, nnx.Param))
  assert [p for p, _ in a] == [p for p, _ in b]
  for (p, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x[...], y[...], err_msg=str(p))


@pytest.mark.parametrize('case', ['llama-llama3', 'qwen2-tied'])
def test_greedy_generation_equals_transformers(case, tmp_path):
  arch, overrides = CASES[case]
  hf = make_family_model(tmp_path, arch, seed=2, **overrides)
  _, model = convert.load_hf(str(tmp_path))
  ours = generate.greedy_generate(model, PROMPTS, max_new_tokens=12)
  np.testing.assert_array_equal(ours, hf_greedy(hf, PROMPTS, 12))


def test_tied_checkpoint_with_equal_head_loads(tmp_path):
  """Some exporters store lm_head.weight of a tied model: accepted when it is the embedding."""
  from safetensors.numpy import load_file, save_file
  hf = make_family_model(tmp_path, 'llama', tie_word_embeddings=True)
  file = os.path.join(tmp_path, 'model.safetensors')
  tensors = load_file(file)
  assert 'lm_head.weight' not in tensors
  tensors['lm_head.weight'] = tensors['model.embed_tokens.weight'].copy()
  save_file(tensors, file, metadata={'format': 'pt'})
  cfg, model = convert.load_hf(str(tmp_path))
  assert cfg.tie_word_embeddings and not hasattr(model, 'lm_head')
  tokens = _tokens('llama')
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(hf, tokens),
                             atol=1e-4, rtol=0)
  tensors['lm_head.weight'] = tensors['lm_head.weight'] + 1
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(convert.CheckpointError,
                     match='tie_word_embeddings=True, but tensor lm_head.weight differs'):
    convert.load_hf(str(tmp_path))
