"""Evaluation throughput: prefill and decode tokens/s of batched greedy generation with the
KV cache, measured here, and the hours the paper's evaluations would take for Mistral 7B
on one H100 and on a TPU v5p-8, projected from model FLOPs and weight bytes.

  python -m jaxlm.bench.evaluate                       # 'small' preset (20M), CPU
  python -m jaxlm.bench.evaluate --prompt 1024 --batch 8 --new 32
  python -m jaxlm.bench.evaluate --shape smollm2-135m --prompt 384 --batch 20 --new 8
  python -m jaxlm.bench.evaluate --shape smollm2-135m --prompt 384 --batch 20 --scan_layers

Measurement: greedy_generate with 1 new token (prefill + 1 step) and with `--new` tokens,
`--repeats` times each, medians; decode tokens/s = batch x (new - 1) / (t_new - t_1). Two
rows: the prefill as generation runs it (self-attention over the prompt,
jaxlm.attention.prefill_impl of the model's `--attention`: `auto` is chunked on CPU up to
2048 x 2048 scores) and the reference prefill that attends over the whole cache buffer as
decoding steps do (`prefill_kernels=False`: dense for `auto` on CPU), with the ratio.
`--scan_layers` adds a third row: the first with the layers stacked and run as one scan
(model.scan_layers, as configs/mistral7b_*.py train), whose decoding carries the stacked
KV cache through the scan.

Projection (a model, not a measurement; the assumptions are printed with the table):
prefill is compute-bound: forward FLOPs (jaxlm.flops, causal attention over the prompt) /
(peak x an assumed prefill MFU); decode is memory-bound: each step streams the bf16 weights
and the batch's KV cache from HBM, so a step takes max(bytes / bandwidth, FLOPs / peak).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

# Chips the projection covers: peak dense bf16 FLOP/s and HBM bandwidth, whole slice.
CHIPS = {
    'H100 SXM (1 GPU)': {'peak': 989e12, 'hbm': 3.35e12},
    'TPU v5p-8 (4 chips)': {'peak': 4 * 459e12, 'hbm': 4 * 2.765e12},
}
PREFILL_MFU = 0.4        # assumed for long-prompt prefill; our measured train MFU goes here once known
DECODE_BATCH = 64        # sequences decoded together

# The paper's evaluations (counts from the benchmarks' standard splits; prompt lengths in
# Mistral tokens, measured on the shipped data where we have it, estimated otherwise).
WORKLOADS = {
    'MDQA 20 docs, 5 positions x 200 (paper)': dict(n=1000, prompt=3300, new=100),
    'MDQA 10/20/30 docs x all positions x 2655 (full LitM)': dict(
        n=2655 * (10 + 20 + 30), prompt=3300, new=100),
    'MMLU 5-shot (14042 x 4 choices, log-likelihood)': dict(n=14042 * 4, prompt=700, new=0),
    'HellaSwag (10042 x 4 endings, log-likelihood)': dict(n=10042 * 4, prompt=120, new=0),
    'GSM8K 0-shot (1319, 256 new)': dict(n=1319, prompt=120, new=256),
    'TriviaQA (17944, 32 new)': dict(n=17944, prompt=30, new=32),
    'NQ-Open (3610, 32 new)': dict(n=3610, prompt=25, new=32),
}


def measure(preset: str, prompt: int, batch: int, new: int, repeats: int, dtype: str,
            overrides: dict | None = None, attention: str = 'auto', prefill_kernels=True):
  import jax
  from jaxlm import generate
  from jaxlm.model import get_config, init_model
  overrides = overrides or {}
  length = max(prompt + new, overrides.get('max_position_embeddings', 1024))
  cfg = get_config(preset, **{**overrides, 'dtype': dtype, 'attention_impl': attention,
                              'max_position_embeddings': length})
  model = init_model(cfg)
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(3, cfg.vocab_size, prompt)) for _ in range(batch)]

  def run(n):
    t0 = time.perf_counter()
    generate.greedy_generate(model, prompts, max_new_tokens=n,    # returns host numpy
                             prefill_kernels=prefill_kernels)
    return time.perf_counter() - t0

  run(1), run(new)   # compile both
  t1 = statistics.median(run(1) for _ in range(repeats))
  tn = statistics.median(run(new) for _ in range(repeats))
  return cfg, {'prefill_tok_s': batch * prompt / t1,
               'decode_tok_s': batch * (new - 1) / max(tn - t1, 1e-9),
               't_prefill_s': t1, 't_generate_s': tn, 'device': jax.devices()[0].device_kind}


def project(cfg7b, chip: dict, w: dict) -> float:
  """Hours for workload w on chip, by the model in the module docstring."""
  from jaxlm import flops
  prefill_flops = w['n'] * w['prompt'] * flops.forward_flops_per_token(cfg7b, w['prompt'])
  t = prefill_flops / (chip['peak'] * PREFILL_MFU)
  if w['new']:
    weight_bytes = 2 * cfg7b.num_params()
    ctx = w['prompt'] + w['new'] / 2
    kv_bytes = DECODE_BATCH * ctx * 2 * cfg7b.num_layers * cfg7b.num_kv_heads * cfg7b.head_dim * 2
    step_flops = DECODE_BATCH * flops.forward_flops_per_token(cfg7b, int(ctx))
    step = max((weight_bytes + kv_bytes) / chip['hbm'], step_flops / chip['peak'])
    t += -(-w['n'] // DECODE_BATCH) * w['new'] * step
  return t / 3600


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--preset', default='small')
  parser.add_argument('--shape', default=None, help='a model shape from jaxlm.bench.step '
                      '(e.g. smollm2-135m; replaces --preset)')
  parser.add_argument('--attention', default='auto', help='the model attention_impl')
  parser.add_argument('--prompt', type=int, default=512)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--new', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--scan_layers', action='store_true',
                      help='also time the model with scanned layers (a third row)')
  args = parser.parse_args(argv)
  from jaxlm.bench.step import SHAPES
  from jaxlm.model import get_config
  preset, overrides = SHAPES[args.shape] if args.shape else (args.preset, {})
  rows = {}
  for kernels in (True, False):
    cfg, rows[kernels] = measure(preset, args.prompt, args.batch, args.new, args.repeats,
                                 args.dtype, overrides, args.attention, kernels)
  if args.scan_layers:
    _, rows['scan'] = measure(preset, args.prompt, args.batch, args.new, args.repeats,
                              args.dtype, {**overrides, 'scan_layers': True}, args.attention)
  m = rows[True]
  print(f'## Evaluation throughput: {args.shape or preset} ({cfg.num_params() / 1e6:.1f}M '
        f'params, {args.dtype}), batch {args.batch}, prompt {args.prompt}, {args.new} new tokens')
  print(f'machine: {platform.processor() or platform.machine()}, device {m["device"]}')
  print(f'| prefill | prefill tok/s | decode tok/s | prefill+1 (s) | prefill+{args.new} (s) |')
  print('|---|---|---|---|---|')
  names = {True: f'over the prompt ({args.attention})',
           False: 'over the whole cache (reference)',
           'scan': f'over the prompt ({args.attention}), scanned layers'}
  for kernels, r in rows.items():
    print(f'| {names[kernels]} | {r["prefill_tok_s"]:,.0f} | {r["decode_tok_s"]:,.1f} | '
          f'{r["t_prefill_s"]:.3f} | {r["t_generate_s"]:.3f} |')
  print(f'prefill speed-up over the reference: '
        f'{rows[False]["t_prefill_s"] / m["t_prefill_s"]:.2f}x')
  if 'scan' in rows:
    scan = rows['scan']
    print(f'scanned layers / unrolled: prefill {scan["t_prefill_s"] / m["t_prefill_s"]:.2f}x'
          f' the time, decode {m["decode_tok_s"] / scan["decode_tok_s"]:.2f}x the time')
  cfg7b = get_config('mistral-7b-v0.2')
  print(f'\n## Projected hours, Mistral 7B (bf16 weights, prefill MFU {PREFILL_MFU:.0%}, '
        f'decode batch {DECODE_BATCH})')
  print('| workload | ' + ' | '.join(CHIPS) + ' |')
  print('|---|' + '---|' * len(CHIPS))
  totals = dict.fromkeys(CHIPS, 0.0)
  for name, w in WORKLOADS.items():
    hours = {c: project(cfg7b, chip, w) for c, chip in CHIPS.items()}
    for c in CHIPS:
      totals[c] += hours[c] if 'full LitM' not in name else 0
    print(f'| {name} | ' + ' | '.join(f'{hours[c]:.2f}' for c in CHIPS) + ' |')
  print('| total (paper MDQA + general) | ' + ' | '.join(f'{totals[c]:.2f}' for c in CHIPS) + ' |')


if __name__ == '__main__':
  main()
