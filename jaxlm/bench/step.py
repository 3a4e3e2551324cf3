"""One training step (forward, backward, AdamW): jaxlm against transformers' PyTorch Mistral.

Both frameworks get the same architecture, batch, sequence length, float32 numerics,
loss (mean next-token cross-entropy) and optimizer (AdamW, lr 1e-4, weight decay 0.1),
in one process, one after the other. Prints per-step medians, tokens/s and the ratio.

  python -m jaxlm.bench.step                      # d256, 4 layers, vocab 32000, B4 x T256
  python -m jaxlm.bench.step --vocab 512 --seq 512 --batch 8 --steps 10 --attention blockwise
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxlm.model import get_config, init_model


def _time_steps(step, n_warmup: int, n_steps: int) -> list[float]:
  for _ in range(n_warmup):
    step()
  times = []
  for _ in range(n_steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times


def bench_jax(cfg, tokens: np.ndarray, n_warmup: int, n_steps: int) -> list[float]:
  model = init_model(cfg)
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.1), wrt=nnx.Param)
  tokens = jnp.asarray(tokens)

  @functools.partial(nnx.jit, donate_argnums=(0, 1))
  def train_step(model, optimizer, tokens):
    def loss_fn(model):
      logits = model(tokens[:, :-1])
      return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return _time_steps(lambda: train_step(model, optimizer, tokens).block_until_ready(),
                     n_warmup, n_steps)


def bench_torch(cfg, tokens: np.ndarray, n_warmup: int, n_steps: int) -> list[float]:
  import torch
  import transformers
  torch.manual_seed(0)
  hf_config = transformers.MistralConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, sliding_window=cfg.sliding_window, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      attn_implementation='sdpa')
  model = transformers.MistralForCausalLM(hf_config).train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.as_tensor(tokens, dtype=torch.long)

  def step():
    optimizer.zero_grad(set_to_none=True)
    logits = model(tokens[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                             tokens[:, 1:].reshape(-1))
    loss.backward()
    optimizer.step()

  return _time_steps(step, n_warmup, n_steps)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--vocab', type=int, default=None, help='override vocab_size')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--attention', default='dense', help='jaxlm attention_impl')
  parser.add_argument('--skip_torch', action='store_true')
  args = parser.parse_args(argv)

  overrides = {'vocab_size': args.vocab} if args.vocab else {}
  cfg = get_config(args.preset, attention_impl=args.attention, **overrides)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
  n_tokens = args.batch * args.seq
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'on {jax.devices()[0].platform}')
  print(f'model: {args.preset} {overrides or ""} ({cfg.num_params() / 1e6:.1f}M params), '
        f'batch {args.batch} x seq {args.seq}, float32, AdamW; '
        f'{args.warmup} warm-up + {args.steps} timed steps')
  rows = [(f'jaxlm (jax.jit, {args.attention} attention)',
           bench_jax(cfg, tokens, args.warmup, args.steps))]
  if not args.skip_torch:
    import torch
    rows.append((f'transformers {__import__("transformers").__version__} '
                 f'(torch {torch.__version__}, {torch.get_num_threads()} threads)',
                 bench_torch(cfg, tokens, args.warmup, args.steps)))
  print('| implementation | median step (s) | min step (s) | tokens/s |')
  print('|---|---|---|---|')
  medians = []
  for name, times in rows:
    med = statistics.median(times)
    medians.append(med)
    print(f'| {name} | {med:.3f} | {min(times):.3f} | {n_tokens / med:,.0f} |')
  if len(medians) == 2:
    print(f'jaxlm / torch throughput ratio (medians): {medians[1] / medians[0]:.2f}x')


if __name__ == '__main__':
  main()
