"""The long-sequence scaling study in miniature: memory and time of a training step as
the sequence length doubles, dense against blockwise attention, and ring attention's
per-device memory as devices are added.

Memory is XLA's compiled plan (`compiled.memory_analysis()`: arguments + outputs +
temporaries, per device), which is exact for what the program allocates and lets a
length be sized without running it. Time is measured (median of runs) only where the
plan fits `--run_budget_gb`.

  python -m jaxlm.bench.attention        # plans 1K .. 128K, times up to 16K, PNG + table
  python -m jaxlm.bench.attention --max_len 16384 --runs 2 --out runs/bench_attention
Ring rows need simulated devices: the script sets 8 host devices unless XLA_FLAGS does.
"""

from __future__ import annotations

import os

if 'xla_force_host_platform_device_count' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=8').strip()

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxlm.attention import attend  # noqa: E402
from jaxlm.model import get_config, init_model  # noqa: E402


def step_fn():
  def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def step(model, tokens):
    return nnx.grad(loss_fn)(model, tokens)
  return nnx.jit(step)


def planned_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def model_rows(cfg, impls, lengths, runs, budget, max_time_len):
  rows = []
  for impl in impls:
    model = init_model(cfg.replace(attention_impl=impl))
    step = step_fn()
    for T in lengths:
      tokens = jnp.zeros((1, T + 1), jnp.int32)
      compiled = step.lower(model, tokens).compile()
      mem = planned_bytes(compiled)
      times = []
      if mem <= budget and T <= max_time_len:
        jax.block_until_ready(step(model, tokens))
        for _ in range(runs):
          t0 = time.perf_counter()
          jax.block_until_ready(step(model, tokens))
          times.append(time.perf_counter() - t0)
      t = statistics.median(times) if times else None
      rows.append(dict(impl=impl, T=T, mem=mem, time=t))
      shown = f'{t:.3f}' if t is not None else (
          'not run (plan > budget)' if mem > budget else 'not timed (> --max_time_len)')
      print(f'| {impl} | {T} | {mem / 2**20:,.1f} | {shown} |', flush=True)
  return rows


def ring_rows(cfg, T, device_counts, layout):
  """layout='zigzag': inputs already in zigzag order (what a trainer feeds), so only
  the ring's own memory shows; 'natural' adds the permutation into and out of it."""
  rows = []
  H, K, D = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  q = jax.ShapeDtypeStruct((1, T, H, D), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, T, K, D), jnp.float32)
  for n in device_counts:
    mesh = jax.make_mesh((n,), ('context',), axis_types=(AxisType.Auto,),
                         devices=jax.devices()[:n])
    sharding = NamedSharding(mesh, P(None, 'context'))

    def fwd_bwd(q, k, v):
      out, pullback = jax.vjp(lambda q, k, v: attend(
          q, k, v, impl='ring', mesh=mesh, sliding_window=cfg.sliding_window, ring_layout=layout,
          block_q=cfg.attention_block_q, block_kv=cfg.attention_block_kv), q, k, v)
      return pullback(out)

    args = [jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding) for x in (q, kv, kv)]
    compiled = jax.jit(fwd_bwd).lower(*args).compile()
    mem = planned_bytes(compiled)
    rows.append(dict(devices=n, mem=mem))
    print(f'| ring ({layout} input) | {T} | {n} | {mem / 2**20:,.1f} | '
          f'{rows[0]["mem"] / mem:.2f}x |', flush=True)
  return rows


def fit_exponent(rows, impl, min_len):
  pts = [(r['T'], r['mem']) for r in rows if r['impl'] == impl and r['T'] >= min_len]
  x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
  return float(np.polyfit(x, y, 1)[0])


def plot(rows, ring, out_png, ring_len):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
  for impl, style in (('dense', 'o-'), ('blockwise', 's-')):
    pts = [(r['T'], r['mem'] / 2**20) for r in rows if r['impl'] == impl]
    ax1.loglog(*zip(*pts), style, label=impl, base=2)
  ax1.set_xlabel('sequence length (tokens)')
  ax1.set_ylabel('planned memory per step (MiB)')
  ax1.set_title('training step memory vs length')
  ax1.grid(True, which='both', alpha=0.3)
  ax1.legend()
  ax2.plot([r['devices'] for r in ring], [r['mem'] / 2**20 for r in ring], 'd-',
           label='ring attention fwd+bwd')
  ax2.plot([r['devices'] for r in ring], [ring[0]['mem'] / 2**20 / r['devices'] for r in ring],
           ':', color='gray', label='ideal 1/n')
  ax2.set_xlabel('devices on the context axis')
  ax2.set_ylabel('memory per device (MiB)')
  ax2.set_title(f'ring attention at {ring_len} tokens')
  ax2.grid(True, alpha=0.3)
  ax2.legend()
  fig.tight_layout()
  fig.savefig(out_png, dpi=120)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--min_len', type=int, default=1024)
  parser.add_argument('--max_len', type=int, default=131072, help='memory plans up to here')
  parser.add_argument('--max_time_len', type=int, default=16384, help='timings up to here')
  parser.add_argument('--ring_len', type=int, default=65536)
  parser.add_argument('--ring_block', type=int, default=256)
  parser.add_argument('--runs', type=int, default=3)
  parser.add_argument('--run_budget_gb', type=float, default=6.0)
  parser.add_argument('--out', default='runs/bench_attention')
  args = parser.parse_args(argv)
  # A small Mistral: 2 layers, 4 query / 2 kv heads of 32, full causal attention.
  cfg = get_config('tiny', hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32,
                   intermediate_size=256, sliding_window=None, max_position_embeddings=2**20,
                   attention_block_q=512, attention_block_kv=512)
  lengths = [2 ** i for i in range(int(np.log2(args.min_len)), int(np.log2(args.max_len)) + 1)]
  os.makedirs(args.out, exist_ok=True)
  print(f'model: tiny Mistral d128, 2 layers, 4/2 heads x 32, vocab 512, batch 1, float32; '
        f'jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores')
  print('| attention | seq len | planned memory (MiB) | fwd+bwd step (s, median) |')
  print('|---|---|---|---|')
  rows = model_rows(cfg, ['dense', 'blockwise'], lengths, args.runs, args.run_budget_gb * 2**30,
                    args.max_time_len)
  print()
  print('| attention | seq len | devices | memory per device (MiB) | reduction |')
  print('|---|---|---|---|---|')
  counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
  ring_cfg = cfg.replace(attention_block_q=args.ring_block, attention_block_kv=args.ring_block)
  ring = ring_rows(ring_cfg, args.ring_len, counts, 'zigzag')
  ring_rows(ring_cfg, args.ring_len, counts, 'natural')
  fit_from = min(4096, lengths[-2]) if len(lengths) > 1 else lengths[0]
  exp_b = fit_exponent(rows, 'blockwise', fit_from)
  exp_d = fit_exponent(rows, 'dense', fit_from)
  budget = max(r['mem'] for r in rows if r['impl'] == 'dense' and r['time'] is not None)
  longest = lambda impl: max(r['T'] for r in rows if r['impl'] == impl and r['mem'] <= budget)
  print()
  print(f'fitted memory exponent (lengths >= {fit_from}): dense {exp_d:.2f}, blockwise {exp_b:.2f}')
  print(f'in the memory of the largest dense step run ({budget / 2**20:,.0f} MiB): dense reaches '
        f'{longest("dense")} tokens, blockwise {longest("blockwise")} '
        f'({longest("blockwise") // longest("dense")}x)')
  png = os.path.join(args.out, 'attention_scaling.png')
  plot(rows, ring, png, args.ring_len)
  print(f'plot: {png}')


if __name__ == '__main__':
  main()
