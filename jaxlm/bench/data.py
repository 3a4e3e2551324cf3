"""Generated tokens/s per CPU core for the retrieval tasks, against what training eats.

Pins itself to one core, generates examples at 4K and 32K-token budgets (generation +
the tokenization that measures the budget), and then the full per-example pipeline
step (generation + prompt and answer tokenization into training features). The
consumption side is an estimate from FLOPs: a Mistral 7B fine-tune on one TPU v5p
host (4 chips, 459 TFLOP/s bf16 each) at an assumed MFU.

With --config, it times instead the batches that a trainer config's Grain pipeline
(jaxlm.data.pipeline.make_dataset) hands the train step, for each --threads value (both
cores, as in training): does the data side keep up with the step?

  python -m jaxlm.bench.data
  python -m jaxlm.bench.data --budgets 4096,32768 --seconds 3 --mfu 0.4
  python -m jaxlm.bench.data --config=configs/tiny_kv.py --threads=0,1,2
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from jaxlm.data.pipeline import DataConfig, make_dataset, to_features
from jaxlm.flops import train_flops_per_token
from jaxlm.data.tasks import make_task
from jaxlm.model import get_config
from jaxlm.tokenizer import Tokenizer

V5P_PEAK_FLOPS = 459e12      # bf16 per chip
V5P_CHIPS_PER_HOST = 4


def measure(fn, seconds: float) -> tuple[int, float]:
  """Call fn(i) for i = 0, 1, ... for about `seconds`; return (tokens, elapsed)."""
  tokens, i, t0 = 0, 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    tokens += fn(i)
    i += 1
  return tokens, time.perf_counter() - t0


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--budgets', default='4096,32768')
  parser.add_argument('--tasks', default='simple_kv,multisubkey_kv,niah')
  parser.add_argument('--seconds', type=float, default=3.0)
  parser.add_argument('--mfu', type=float, default=0.4)
  parser.add_argument('--config', help='a trainer config file: time its batches instead')
  parser.add_argument('--threads', default='0,1,2', help="with --config: data.num_threads values")
  parser.add_argument('--batches', type=int, default=60, help='with --config: batches timed')
  args = parser.parse_args(argv)
  if args.config:
    return run_config(args)
  pinned = hasattr(os, 'sched_setaffinity')
  if pinned:
    cores = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {sorted(cores)[0]})
  try:
    run(args)
  finally:
    if pinned:
      os.sched_setaffinity(0, cores)


def run(args):
  tok = Tokenizer()
  cfg = get_config('mistral-7b-v0.1')
  print(f'one core of {os.cpu_count()}; Mistral v1 tokenizer; {args.seconds:.0f}s per row')
  print('| task | budget (tokens) | generate: tokens/s/core | + features: tokens/s/core '
        '| examples/s | 7B on a v5p host eats (tokens/s) | headroom (1 core) |')
  print('|---|---|---|---|---|---|---|')
  for budget in (int(b) for b in args.budgets.split(',')):
    eat = V5P_CHIPS_PER_HOST * V5P_PEAK_FLOPS * args.mfu / train_flops_per_token(cfg, budget)
    for name in args.tasks.split(','):
      fields = {'num_tokens': budget}
      if name != 'niah':
        fields['num_dicts'] = None
      task = make_task(name, tok, **fields)
      task.example(0, 0)
      gen_tokens, gen_s = measure(lambda i: task.example(0, i).num_tokens, args.seconds)
      feat_tokens, feat_s = measure(
          lambda i: len(to_features(task.example(1, i), tok, 'mistral')['inputs']), args.seconds)
      n = gen_tokens / budget
      print(f'| {name} | {budget} | {gen_tokens / gen_s:,.0f} | {feat_tokens / feat_s:,.0f} | '
            f'{n / gen_s:,.1f} | {eat:,.0f} | {feat_tokens / feat_s / eat:,.0f}x |')
  print(f'consumption: 4 x {V5P_PEAK_FLOPS / 1e12:.0f} TFLOP/s x MFU {args.mfu} / '
        f'jaxlm.flops.train_flops_per_token (6 x matmul params + causal attention)')


def run_config(args):
  from jaxlm.config import load_config_file
  c = load_config_file(args.config)
  tok = Tokenizer(c.tokenizer)
  print(f'{args.config}: batch {c.train.batch_size} x {c.data.seq_len} tokens, '
        f'{os.cpu_count()} cores, {args.batches} batches per row after one warm-up batch')
  print('| data.num_threads | s/batch (median) | s/batch (mean) | answer tokens/batch |')
  print('|---|---|---|---|')
  for threads in (int(t) for t in args.threads.split(',')):
    cfg = DataConfig.from_dict({**c.data.to_dict(), 'global_batch_size': c.train.batch_size,
                                'num_threads': threads})
    it = iter(make_dataset(cfg, tok))
    next(it)
    times, answer = [], []
    for _ in range(args.batches):
      t0 = time.perf_counter()
      batch = next(it)
      times.append(time.perf_counter() - t0)
      answer.append(int((batch['loss_mask'] > 0).sum()))
    print(f'| {threads} | {statistics.median(times):.3f} | {statistics.fmean(times):.3f} | '
          f'{statistics.median(answer):,.0f} |')


if __name__ == '__main__':
  main()
