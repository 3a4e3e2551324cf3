"""Model FLOPs and MFU.

Training FLOPs per token = 3 x forward (backward is twice the forward):
  forward = 2 x (matmul parameters: attention projections, MLP, LM head; the embedding
            lookup is a gather, not a matmul; a tied table counts once, as the head)
          + 4 x layers x heads x head_dim x (mean keys each query attends to)
The mean number of visible keys is (T+1)/2 for causal attention over T tokens and
shrinks further with a sliding window W: mean over t of min(t+1, W). Packed sequences
are counted as if unpacked (an upper bound). With `head_positions=K` (the trainer's
`train.loss_positions`: the output projection runs at K positions of each row only) the
head is charged K/T of its per-token cost. Under LoRA (`lora`, a jaxlm.lora.LoRAConfig) the
frozen weights need no weight gradient: 2 x forward for the base matmuls (forward and the
input gradient) plus 3 x the attention term and 6 x the adapters' parameters. Training the
top n layers only (`trainable_layers`, jaxlm.freeze): the forward pass, plus twice the
forward of the n trained layers (input and weight gradients), plus the head's input
gradient (its weight is frozen); nothing below the lowest trained layer. MFU =
achieved model FLOPs per second per device / the chip's peak dense bf16 FLOPs.
"""

from __future__ import annotations

import jax

# Peak dense bf16 FLOP/s per chip, by `device.device_kind`.
PEAK_FLOPS = {
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,        # v5e
    'TPU v5e': 197e12,
    'TPU v5': 459e12,             # v5p reports 'TPU v5'
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,        # v6e (Trillium)
    'TPU v6e': 918e12,
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100 PCIe': 756e12,
    'NVIDIA H100 NVL': 835e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'NVIDIA A100 80GB PCIe': 312e12,
}


def mean_visible_keys(seq_len: int, sliding_window: int | None, causal: bool = True) -> float:
  if not causal:
    return float(seq_len if sliding_window is None else min(seq_len, sliding_window))
  if sliding_window is None or sliding_window >= seq_len:
    return (seq_len + 1) / 2
  w = sliding_window   # tokens 0..w-1 see t+1 keys, the rest see w
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def matmul_params(cfg) -> int:
  """Parameters used in matmuls: attention projections, MLP and the LM head (also when it
  is tied to the embedding table, which is then counted once, as the head)."""
  params = cfg.num_params() - cfg.hidden_size * (2 * cfg.num_layers + 1)   # minus norm scales
  if cfg.attention_bias:   # biases are additions, not matmuls
    params -= cfg.num_layers * cfg.head_dim * (cfg.num_heads + 2 * cfg.num_kv_heads)
    params -= cfg.num_layers * cfg.hidden_size if cfg.architecture == 'llama' else 0   # o_proj
  if not cfg.tie_word_embeddings:
    params -= cfg.vocab_size * cfg.hidden_size   # the embedding lookup is a gather
  return params


def forward_flops_per_token(cfg, seq_len: int, head_positions: int | None = None) -> float:
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_visible_keys(
      seq_len, cfg.sliding_window)
  params = float(matmul_params(cfg))
  if head_positions and head_positions < seq_len:   # the head at K of T positions only
    params -= cfg.vocab_size * cfg.hidden_size * (1 - head_positions / seq_len)
  return 2 * params + attention


def adapter_params(cfg, lora) -> int:
  """Parameters of LoRA adapters of rank r on lora.targets: r x (in + out) each."""
  d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
  q, kv = cfg.num_heads * dh, cfg.num_kv_heads * dh
  sizes = {'q_proj': d + q, 'k_proj': d + kv, 'v_proj': d + kv, 'o_proj': q + d,
           'gate_proj': d + f, 'up_proj': d + f, 'down_proj': f + d}
  return cfg.num_layers * lora.rank * sum(sizes[t] for t in lora.targets)


def head_flops_per_token(cfg, seq_len: int, head_positions: int | None = None) -> float:
  """The output projection's share of forward_flops_per_token."""
  share = head_positions / seq_len if head_positions and head_positions < seq_len else 1.0
  return 2 * cfg.vocab_size * cfg.hidden_size * share


def train_flops_per_token(cfg, seq_len: int, head_positions: int | None = None,
                          lora=None, trainable_layers: int = 0) -> float:
  forward = forward_flops_per_token(cfg, seq_len, head_positions)
  if trainable_layers:
    head = head_flops_per_token(cfg, seq_len, head_positions)
    per_layer = (forward - head) / cfg.num_layers
    return forward + 2 * trainable_layers * per_layer + head
  if lora is None or not lora.rank:
    return 3 * forward
  attention = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * mean_visible_keys(
      seq_len, cfg.sliding_window)
  return 2 * (forward - attention) + 3 * attention + 6 * adapter_params(cfg, lora)


def peak_flops(device_kind: str) -> float:
  """Peak bf16 FLOP/s of one chip; fails loudly on a chip not in the table."""
  if device_kind not in PEAK_FLOPS:
    raise KeyError(f'no peak FLOP/s known for device kind {device_kind!r}; add it to '
                   f'jaxlm.flops.PEAK_FLOPS or set train.peak_flops_per_device '
                   f'(known: {sorted(PEAK_FLOPS)})')
  return PEAK_FLOPS[device_kind]


def device_peak(override: float | None = None) -> float | None:
  """This process's per-device peak: the override, the table entry, or None on CPU."""
  if override:
    return float(override)
  device = jax.devices()[0]
  if device.platform == 'cpu':
    return None
  return peak_flops(device.device_kind)


def mfu(tokens_per_second: float, cfg, seq_len: int, num_devices: int, peak: float | None,
        head_positions: int | None = None, lora=None, trainable_layers: int = 0):
  if not peak:
    return None
  return (tokens_per_second * train_flops_per_token(cfg, seq_len, head_positions, lora,
                                                    trainable_layers)
          / (num_devices * peak))
