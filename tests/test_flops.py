"""FLOP accounting and the peak table."""
import pytest

from jaxlm import flops
from jaxlm.model import get_config


def test_visible_keys():
  assert flops.mean_visible_keys(4, None) == 2.5                 # (1+2+3+4)/4
  assert flops.mean_visible_keys(6, 2) == (1 + 2 * 5) / 6         # window of 2
  assert flops.mean_visible_keys(6, 10) == flops.mean_visible_keys(6, None)
  assert flops.mean_visible_keys(6, None, causal=False) == 6


def test_7b_train_flops_per_token():
  cfg = get_config('mistral-7b-v0.1')
  # matmul parameters: 7.24B minus the 131M-parameter embedding and the norm scales
  assert flops.matmul_params(cfg) == 7_241_732_096 - 32000 * 4096 - 4096 * 65
  per_token = flops.train_flops_per_token(cfg, 4096)
  attention = 3 * 4 * 32 * 32 * 128 * (4096 + 1) / 2
  assert per_token == pytest.approx(6 * flops.matmul_params(cfg) + attention)
  # the 4096 sliding window only matters past 4096 tokens
  assert flops.train_flops_per_token(cfg, 32768) < flops.train_flops_per_token(
      cfg.replace(sliding_window=None), 32768)


def test_head_at_answer_positions_is_charged_for_those_only():
  cfg = get_config('tiny', tie_word_embeddings=True)
  T, K = 384, 32
  full, part = flops.train_flops_per_token(cfg, T), flops.train_flops_per_token(cfg, T, K)
  head = 6 * cfg.vocab_size * cfg.hidden_size
  assert full - part == pytest.approx(head * (1 - K / T))
  assert flops.train_flops_per_token(cfg, T, T) == full      # every position: nothing saved
  assert flops.mfu(100, cfg, T, 1, 1e12, head_positions=K) == pytest.approx(100 * part / 1e12)


def test_unknown_chip_fails_loudly():
  assert flops.peak_flops('TPU v5 lite') == 197e12
  with pytest.raises(KeyError, match="no peak FLOP/s known for device kind 'TPU v99'"):
    flops.peak_flops('TPU v99')
  assert flops.device_peak() is None              # CPU: no MFU
  assert flops.device_peak(1e12) == 1e12
  assert flops.mfu(1000, get_config('tiny'), 128, 1, None) is None


def test_lora_skips_the_frozen_weight_gradients_and_counts_adapters():
  from jaxlm import lora
  from jaxlm.model import init_model
  cfg = get_config('tiny')
  T = 64
  attention = 3 * 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * flops.mean_visible_keys(
      T, cfg.sliding_window)
  lcfg = lora.LoRAConfig(rank=4, targets=('q_proj', 'o_proj', 'down_proj'))
  model = lora.attach(init_model(cfg), lcfg)
  n_adapters = lora.count(model)[0]
  assert flops.adapter_params(cfg, lcfg) == n_adapters   # the formula counts what attach adds
  assert flops.train_flops_per_token(cfg, T, lora=lcfg) == pytest.approx(
      4 * flops.matmul_params(cfg) + attention + 6 * n_adapters)
  assert flops.train_flops_per_token(cfg, T, lora=lora.LoRAConfig()) == \
      flops.train_flops_per_token(cfg, T)                # rank 0: full fine-tuning
