"""Check and time every attention implementation this backend offers against the dense
oracle: values and gradients on random inputs, then fwd+bwd time (median).

On a CPU host that is dense and blockwise; on a GPU it adds cuDNN, on a TPU splash (the
kernels CI cannot run). Use it whenever an accelerator is at hand:

  python -m jaxlm.bench.attention_check
  python -m jaxlm.bench.attention_check --seq 8192 --dtype bfloat16 --window 4096
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.attention import attend


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seq', type=int, default=2048)
  parser.add_argument('--heads', type=int, default=8)
  parser.add_argument('--kv_heads', type=int, default=2)
  parser.add_argument('--head_dim', type=int, default=128)
  parser.add_argument('--window', type=int, default=None)
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--runs', type=int, default=5)
  args = parser.parse_args(argv)
  platform = jax.devices()[0].platform
  impls = ['dense', 'blockwise'] + {'gpu': ['cudnn'], 'tpu': ['splash']}.get(platform, [])
  dtype = jnp.dtype(args.dtype)
  rs = np.random.RandomState(0)
  B, T, H, K, D = args.batch, args.seq, args.heads, args.kv_heads, args.head_dim
  q, ct = (jnp.asarray(rs.randn(B, T, H, D), dtype) for _ in range(2))
  k, v = (jnp.asarray(rs.randn(B, T, K, D), dtype) for _ in range(2))

  def fwd_bwd(impl):
    def f(q, k, v, ct):
      out, pullback = jax.vjp(lambda q, k, v: attend(q, k, v, impl=impl,
                                                     sliding_window=args.window), q, k, v)
      return (out,) + pullback(ct)
    return jax.jit(f)

  ref = [np.asarray(x, np.float32) for x in fwd_bwd('dense')(q, k, v, ct)]
  print(f'{platform} ({jax.devices()[0].device_kind}); B{B} T{T} H{H}/{K} D{D} {args.dtype}, '
        f'window {args.window}; max |difference| to dense, fwd+bwd median of {args.runs}')
  print('| impl | out | dq | dk | dv | fwd+bwd (ms) |')
  print('|---|---|---|---|---|---|')
  for impl in impls:
    fn = fwd_bwd(impl)
    got = fn(q, k, v, ct)
    diffs = [float(np.abs(np.asarray(g, np.float32) - r).max()) for g, r in zip(got, ref)]
    times = []
    for _ in range(args.runs):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(q, k, v, ct))
      times.append(time.perf_counter() - t0)
    print(f'| {impl} | ' + ' | '.join(f'{d:.1e}' for d in diffs) +
          f' | {1e3 * statistics.median(times):.1f} |')


if __name__ == '__main__':
  main()
