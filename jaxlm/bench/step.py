"""One training step (forward, backward, AdamW): jaxlm against transformers' PyTorch model.

Both frameworks get the same architecture, batch, sequence length, float32 numerics,
loss (mean next-token cross-entropy) and optimizer (AdamW, lr 1e-4, weight decay 0.1),
in one process, one after the other. Prints per-step medians, tokens/s and the ratios.

PyTorch rows: transformers' `MistralForCausalLM` (or `LlamaForCausalLM` / `Qwen2ForCausalLM`
for those architectures) with SDPA attention, run eagerly and, with `--torch_compile` (the
default), also as `torch.compile(model)` (default mode, inductor). The last column is the
first warm-up step on its own: for jax.jit and torch.compile it holds the compilation, which
the timed steps never include (inductor keeps an on-disk cache, so a repeated run compiles
faster). A torch.compile that fails prints its error in its row instead of stopping the run.

Answer-only loss (`--answer_tokens K`, as the paper's fine-tuning): the loss is the mean
cross-entropy over the last K target positions of each row. jaxlm computes the final norm
and the output projection only there (`logit_positions_BxP`). PyTorch gets two rows per mode:
full logits with labels -100 outside the answer (what HF Trainer does by default), and the
head applied only to the answer positions (hidden states of `model.model(...)` sliced before
`model.lm_head`), the like-for-like comparison.

  python -m jaxlm.bench.step                      # d256, 4 layers, vocab 32000, B4 x T256
  python -m jaxlm.bench.step --vocab 512 --seq 512 --batch 8 --steps 10 --attention dense,chunked
  python -m jaxlm.bench.step --shape smollm2-135m --batch 4 --seq 448 --answer_tokens 32
  python -m jaxlm.bench.step --shape smollm2-135m --batch 3 --seq 384 --answer_tokens 32 \
      --lora 16 --skip_torch     # + a jaxlm row with LoRA rank 16 on every projection

`--lora R` adds, per attention kernel, a jaxlm row that trains LoRA adapters of rank R on
all seven projections (jaxlm.lora; the base frozen, AdamW on the adapters only).
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

from jaxlm.attention import IMPLEMENTATIONS, choose_impl
from jaxlm.model import get_config, init_model

# Model shapes that are not presets of jaxlm.model: (base preset, overrides).
SHAPES = {
    # SmolLM2-135M(-Instruct), the project's embedded pretrained model (issue 16).
    'smollm2-135m': ('small', dict(
        vocab_size=49152, hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3,
        head_dim=64, intermediate_size=1536, rope_theta=1e5, sliding_window=None,
        rms_norm_eps=1e-5, max_position_embeddings=8192, architecture='llama',
        tie_word_embeddings=True)),
}


def _time_steps(step, n_warmup: int, n_steps: int) -> tuple[float, list[float]]:
  """(seconds of the first warm-up step, seconds of each timed step). At least one warm-up
  step runs, so compilation never lands in the timed steps."""
  t0 = time.perf_counter()
  step()
  first = time.perf_counter() - t0
  for _ in range(n_warmup - 1):
    step()
  times = []
  for _ in range(n_steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return first, times


def answer_positions(batch: int, seq: int, answer_tokens: int) -> np.ndarray:
  """int32 [B, K]: the last K input positions of each row (their targets are the answer)."""
  return np.broadcast_to(np.arange(seq - answer_tokens, seq, dtype=np.int32),
                         (batch, answer_tokens)).copy()


def loss_fn(model, tokens_Bx1T: jax.Array, answer_tokens: int = 0) -> jax.Array:
  """The benchmarked jaxlm loss. tokens [B, T+1]: inputs [:, :-1], targets [:, 1:]. With
  answer_tokens = K > 0, the mean over the last K targets of each row, the head computed only
  at those positions; with 0, the mean over every target."""
  inputs, targets = tokens_Bx1T[:, :-1], tokens_Bx1T[:, 1:]
  if not answer_tokens:
    logits = model(inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  B, T = inputs.shape
  idx = jnp.asarray(answer_positions(B, T, answer_tokens))
  logits_BxKxV = model(inputs, logit_positions_BxP=idx)
  answer_targets = jnp.take_along_axis(targets, idx, axis=1)
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxKxV, answer_targets).mean()


def masked_full_loss(model, tokens_Bx1T: jax.Array, answer_tokens: int) -> jax.Array:
  """The same answer-only loss from full logits and a 0/1 mask (the reference for a test)."""
  inputs, targets = tokens_Bx1T[:, :-1], tokens_Bx1T[:, 1:]
  T = inputs.shape[1]
  ce = optax.softmax_cross_entropy_with_integer_labels(model(inputs), targets)
  mask = (jnp.arange(T) >= T - answer_tokens).astype(ce.dtype)[None, :]
  return (ce * mask).sum() / (mask.sum() * ce.shape[0])


def bench_jax(cfg, tokens: np.ndarray, n_warmup: int, n_steps: int,
              answer_tokens: int = 0, lora_rank: int = 0) -> tuple[float, list[float]]:
  from jaxlm import lora
  model = init_model(cfg)
  wrt = nnx.Param
  if lora_rank:
    wrt = lora.TRAINABLE
    lora.attach(model, lora.LoRAConfig(rank=lora_rank))
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4, weight_decay=0.1), wrt=wrt)
  tokens = jnp.asarray(tokens)
  # as jaxlm.train runs it: the graph split once, jax.jit on the state pytree (nnx.jit
  # flattens the module graph on every call: ~0.1 s per step of Python here)
  graphdef, state = nnx.split((model, optimizer))

  @functools.partial(jax.jit, donate_argnums=0)
  def train_step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(
        model, tokens, answer_tokens)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def step():
    nonlocal state
    state, loss = train_step(state, tokens)
    loss.block_until_ready()

  return _time_steps(step, n_warmup, n_steps)


def torch_model(cfg):
  """transformers' model of cfg's architecture, float32, SDPA attention, training mode."""
  import torch
  import transformers
  torch.manual_seed(0)
  arch = cfg.architecture
  if cfg.rope_type != 'default':
    raise ValueError(f'the PyTorch side builds default RoPE only, not {cfg.rope_type!r}')
  common = dict(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
      head_dim=cfg.head_dim, rope_theta=cfg.rope_theta,
      max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
      tie_word_embeddings=cfg.tie_word_embeddings,
      attn_implementation='sdpa')
  if arch == 'mistral':
    hf_config = transformers.MistralConfig(sliding_window=cfg.sliding_window, **common)
    model = transformers.MistralForCausalLM(hf_config)
  elif arch == 'llama':
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
  elif arch == 'qwen2':
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
  else:
    raise ValueError(f'no transformers model for architecture {arch!r}')
  return model.train()


def torch_step(model, tokens: np.ndarray, answer_tokens: int = 0, head_at_answer: bool = False,
               compiled: bool = False):
  """One PyTorch training step as a closure that returns the loss tensor.

  answer_tokens = 0: full logits, mean cross-entropy over every target. K > 0 and not
  head_at_answer: full logits, labels -100 outside the last K targets (HF's ignore index).
  head_at_answer: hidden states of model.model sliced to the last K positions, then lm_head.
  compiled: torch.compile (default mode) of the module whose forward is called.
  """
  import torch
  F = torch.nn.functional
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
  tokens = torch.as_tensor(tokens, dtype=torch.long)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  T, K = inputs.shape[1], answer_tokens
  if K and not head_at_answer:
    targets = targets.clone()
    targets[:, :T - K] = -100
  body = model.model if head_at_answer else model
  forward = torch.compile(body) if compiled else body

  def step():
    optimizer.zero_grad(set_to_none=True)
    if head_at_answer:
      hidden = forward(inputs).last_hidden_state[:, T - K:]
      logits, labels = model.lm_head(hidden), targets[:, T - K:]
    else:
      logits, labels = forward(inputs).logits, targets
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100)
    loss.backward()
    optimizer.step()
    return loss

  return step


def bench_torch(cfg, tokens: np.ndarray, n_warmup: int, n_steps: int, answer_tokens: int = 0,
                head_at_answer: bool = False, compiled: bool = False):
  step = torch_step(torch_model(cfg), tokens, answer_tokens, head_at_answer, compiled)
  try:
    return _time_steps(step, n_warmup, n_steps)
  finally:
    if compiled:
      import torch
      torch._dynamo.reset()   # drop the compiled graphs (and the model they hold)


def _error_line(e: BaseException) -> str:
  text = ' '.join(str(e).split()) or '(no message)'
  text = text.replace('|', '/')
  return f'{type(e).__name__}: {text[:300]}'


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--shape', default=None, choices=sorted(SHAPES),
                      help='a model shape that is not a jaxlm preset (replaces --preset)')
  parser.add_argument('--vocab', type=int, default=None, help='override vocab_size')
  parser.add_argument('--layers', type=int, default=None, help='override num_layers')
  parser.add_argument('--batch', type=int, default=4)
  parser.add_argument('--seq', type=int, default=256)
  parser.add_argument('--steps', type=int, default=8)
  parser.add_argument('--warmup', type=int, default=2, help='untimed steps (at least 1 runs)')
  parser.add_argument('--attention', default='auto',
                      help='jaxlm attention_impl; a comma-separated list times one jaxlm row each')
  parser.add_argument('--answer_tokens', type=int, default=0,
                      help='loss on the last K targets of each row only (0: every token)')
  parser.add_argument('--lora', type=int, default=0,
                      help='also time jaxlm with LoRA adapters of this rank (0: no such row)')
  parser.add_argument('--skip_torch', action='store_true')
  parser.add_argument('--torch_compile', action='store_true', default=True,
                      help='also time torch.compile(model) (the default)')
  parser.add_argument('--no_torch_compile', action='store_false', dest='torch_compile',
                      help='PyTorch eager only')
  args = parser.parse_args(argv)
  K = args.answer_tokens
  if not 0 <= K <= args.seq:
    parser.error(f'--answer_tokens={K} must be in [0, --seq={args.seq}]')

  preset, overrides = SHAPES[args.shape] if args.shape else (args.preset, {})
  overrides = dict(overrides)
  cli = {}
  if args.vocab:
    cli['vocab_size'] = args.vocab
  if args.layers:
    cli['num_layers'] = args.layers
  impls = [a.strip() for a in args.attention.split(',') if a.strip()]
  bad = [a for a in impls if a not in IMPLEMENTATIONS]
  if bad or not impls:
    parser.error(f'--attention={args.attention!r}: {bad or "nothing"} not in {IMPLEMENTATIONS}')
  cfg = get_config(preset, **{'attention_impl': impls[0], **overrides, **cli})
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
  n_tokens = args.batch * args.seq
  print(f'machine: {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} '
        f'on {jax.devices()[0].platform}')
  name = args.shape or args.preset
  print(f'model: {name} {cli or ""} ({cfg.num_params() / 1e6:.1f}M params, '
        f'{cfg.architecture}, {cfg.num_layers} layers), '
        f'batch {args.batch} x seq {args.seq}, float32, AdamW; '
        f'{max(args.warmup, 1)} warm-up + {args.steps} timed steps')
  print('loss: ' + (f'answer only, mean over the last {K} targets of each row' if K else
                    'every token'))
  head = f', head at the {K} answer positions' if K else ''
  # (label, short name for the ratio line, (first, times) or an error string)
  rows = []
  for impl in impls:
    shown = impl if impl != 'auto' else (
        f"auto = {choose_impl('auto', T=args.seq, S=args.seq)[0]}")
    rows.append((f'jaxlm (jax.jit, {shown} attention{head})',
                 'jaxlm' if len(impls) == 1 else f'jaxlm {impl}',
                 bench_jax(cfg.replace(attention_impl=impl), tokens, args.warmup, args.steps, K)))
    if args.lora:
      rows.append((f'jaxlm (jax.jit, {shown} attention{head}, LoRA rank {args.lora} on every '
                   f'projection)', f'jaxlm{"" if len(impls) == 1 else " " + impl} LoRA',
                   bench_jax(cfg.replace(attention_impl=impl), tokens, args.warmup, args.steps,
                             K, lora_rank=args.lora)))
  if not args.skip_torch:
    import torch
    prefix = (f'transformers {__import__("transformers").__version__} '
              f'(torch {torch.__version__}, {torch.get_num_threads()} threads)')
    variants = [(False, '')]
    if K:
      variants = [(False, ', full logits, labels -100 outside the answer'),
                  (True, ', head at the answer positions only')]
    modes = [(False, 'eager')] + ([(True, 'torch.compile')] if args.torch_compile else [])
    for compiled, mode in modes:
      for head_at_answer, what in variants:
        label = f'{prefix}{"" if not compiled and not K else ", " + mode}{what}'
        short = ('torch.compile' if compiled else 'torch') + (
            ' (head at answer)' if head_at_answer else '')
        try:
          result = bench_torch(cfg, tokens, args.warmup, args.steps, K, head_at_answer, compiled)
        except Exception as e:  # noqa: BLE001 -- a failed compile is a result to report
          if not compiled:
            raise
          result = f'failed: {_error_line(e)}'
        rows.append((label, short, result))
  print('| implementation | median step (s) | min step (s) | tokens/s '
        '| first step, incl. compile (s) |')
  print('|---|---|---|---|---|')
  medians = {}
  for label, short, result in rows:
    if isinstance(result, str):
      print(f'| {label} | {result} | | | |')
      continue
    first, times = result
    med = medians[short] = statistics.median(times)
    print(f'| {label} | {med:.3f} | {min(times):.3f} | {n_tokens / med:,.0f} | {first:.2f} |')
  for mine, own in medians.items():
    if not mine.startswith('jaxlm'):
      continue
    for short, med in medians.items():
      if not short.startswith('jaxlm'):
        print(f'{mine} / {short} throughput ratio (medians): {med / own:.2f}x')


if __name__ == '__main__':
  main()
