"""Tests run on 8 simulated CPU devices (launch/test.sh also sets this)."""
import os

os.environ['XLA_FLAGS'] = ' '.join(
    [f for f in os.environ.get('XLA_FLAGS', '').split()
     if not f.startswith('--xla_force_host_platform_device_count')]
    + ['--xla_force_host_platform_device_count=8'])
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402  (after XLA_FLAGS)

jax.config.update('jax_default_matmul_precision', 'highest')


import numpy as np  # noqa: E402
import pytest  # noqa: E402


def make_hf_model(path=None, seed=0, **overrides):
  """A random transformers MistralForCausalLM (norm weights randomized too, so a
  mis-mapped norm shows), saved to `path` when given. Returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  kwargs = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
                rope_theta=5e4, max_position_embeddings=256, initializer_range=0.1,
                rms_norm_eps=1e-5)
  kwargs.update(overrides)
  config = transformers.MistralConfig(**kwargs)
  model = transformers.MistralForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name:
        p.copy_(1 + 0.2 * torch.randn_like(p))
  if path is not None:
    model.save_pretrained(str(path))
  return model


def hf_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope='session')
def hf_checkpoint(tmp_path_factory):
  """(path, torch model) of the default tiny random checkpoint: GQA, window 8, theta 5e4."""
  path = tmp_path_factory.mktemp('hf_tiny')
  return path, make_hf_model(path)


SMOLLM2 = 'embedded:smollm2-135m-instruct'


def embedded_file():
  """The embedded SmolLM2 GGUF file, or skip the test saying why it is absent."""
  from jaxlm import embedded
  try:
    return embedded.path(SMOLLM2)
  except embedded.EmbeddedModelError as e:
    pytest.skip(f'the embedded SmolLM2 GGUF is not installed: {e}')


@pytest.fixture(scope='session')
def smol():
  """SmolLM2-135M-Instruct's tokenizer, read from its GGUF file by jaxlm."""
  from jaxlm.tokenizer import load_tokenizer
  embedded_file()
  return load_tokenizer(SMOLLM2)


@pytest.fixture(scope='session')
def hf_smol():
  """The same tokenizer as transformers reads it (the independent reference)."""
  import os
  p = embedded_file()
  pytest.importorskip('gguf')
  transformers = pytest.importorskip('transformers')
  return transformers.AutoTokenizer.from_pretrained(os.path.dirname(p),
                                                    gguf_file=os.path.basename(p))
