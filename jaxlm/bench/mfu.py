"""MFU of the training step: a Mistral-7B-shaped step on this machine's devices.

    python -m jaxlm.bench.mfu                         # 7B shape, 4K/8K/32K, layers that fit
    python -m jaxlm.bench.mfu --seq_lens=8192 --layers=8 --batch=2
    python -m jaxlm.bench.mfu --tiny                  # what the CPU (and the test) runs

The step is the trainer's (jaxlm.train.make_train_step: answer-token cross-entropy, AdamW,
state donated, the batch over data x fsdp of every local device) with the 7B recipe's
numerics: bfloat16 compute, float32 master weights and AdamW state, full remat, attention
'auto' (cuDNN on GPU, splash on TPU, blockwise on CPU), every target carrying loss.
Mistral 7B's widths (d 4096, 32/8 heads of 128, MLP 14336, vocab 32000, window 4096) with
fewer layers where the whole model would not fit one device: `--layers` or, by default,
as many as fit in 60% of the first device's memory at 16 bytes per parameter (weights,
two Adam moments, gradient) beside the activations of one remat'd layer.

FLOP convention (jaxlm.flops): model FLOPs per token = 3 x forward, forward = 2 x matmul
parameters (attention projections, MLP, LM head; not the embedding gather) + 4 x layers x
heads x head_dim x (mean keys a query sees: causal counted once, (T+1)/2, fewer under the
sliding window). Remat's recompute is not counted. MFU = model FLOP/s per device / the
chip's dense bf16 peak (jaxlm.flops.PEAK_FLOPS; `--peak` overrides; none on CPU).
Prints one row per sequence length (tokens/s per chip, model TFLOP/s per chip, MFU, step
time median) and writes OUT.csv / OUT.md.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import flops
from jaxlm import sharding as shd
from jaxlm.model import get_config, init_model

COLUMNS = ['device', 'devices', 'layers', 'seq_len', 'batch', 'attention', 'step_s',
           'tokens_per_s_per_chip', 'model_tflops_per_chip', 'mfu']
BYTES_PER_PARAM = 16   # float32 weights + two AdamW moments + gradient


def model_config(layers: int, seq_len: int, tiny: bool, attention: str):
  if tiny:   # a CPU-sized stand-in with the same structure (GQA, window, untied head)
    return get_config('tiny', num_layers=layers, sliding_window=min(seq_len, 4096),
                      max_position_embeddings=max(seq_len, 4096), dtype='bfloat16',
                      remat='full', attention_impl=attention)
  return get_config('mistral-7b-instruct-v0.1', num_layers=layers, dtype='bfloat16',
                    param_dtype='float32', remat='full', attention_impl=attention,
                    max_position_embeddings=max(seq_len, 32768))


def layers_that_fit(seq_len: int, batch_per_device: int) -> int:
  """Layers of the 7B shape whose state fits in 60% of the first device's memory."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get('bytes_limit')
  if not limit:
    return 2
  full = get_config('mistral-7b-instruct-v0.1')
  per_layer = (full.num_params() - 2 * full.vocab_size * full.hidden_size) / full.num_layers
  fixed = 2 * full.vocab_size * full.hidden_size * BYTES_PER_PARAM
  # one layer's activations under full remat, bf16, plus the saved residual per layer
  acts = batch_per_device * seq_len * (full.intermediate_size * 3 + full.hidden_size * 8) * 2
  per = per_layer * BYTES_PER_PARAM + batch_per_device * seq_len * full.hidden_size * 2
  return max(1, int((0.6 * limit - fixed - acts) // per))


def run_one(cfg, seq_len: int, batch: int, warmup: int, steps: int) -> dict:
  from jaxlm import train as trainer
  from ml_collections import ConfigDict
  devices = jax.devices()
  mesh = shd.make_mesh({'data': 1, 'fsdp': len(devices), 'tensor': 1, 'context': 1}, devices)
  t = ConfigDict(dict(lr=1e-5, warmup_steps=0, schedule='constant', steps=10, end_lr_frac=0.0,
                      clip_norm=1.0, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0))
  schedule = trainer.make_schedule(t)
  with jax.set_mesh(mesh):
    model = init_model(cfg)
    optimizer = nnx.Optimizer(model, trainer.make_optimizer(t, schedule), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    shardings = shd.state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    rs = np.random.RandomState(0)
    tokens = rs.randint(0, cfg.vocab_size, (batch, seq_len + 1)).astype(np.int32)
    spec = jax.sharding.NamedSharding(mesh, shd.batch_spec(False))
    put = lambda x: jax.device_put(jnp.asarray(x), spec)
    data = {'inputs': put(tokens[:, :-1]), 'targets': put(tokens[:, 1:]),
            'loss_mask': put(np.ones((batch, seq_len), np.int32)),
            'positions': put(np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                             (batch, seq_len))),
            'segment_ids': put(np.ones((batch, seq_len), np.int32))}
    step = jax.jit(trainer.make_train_step(graphdef, 1, schedule),
                   in_shardings=(shardings, spec), out_shardings=(shardings, None),
                   donate_argnums=0)
    times = []
    for i in range(warmup + steps):
      t0 = time.perf_counter()
      state, metrics = step(state, data)
      jax.block_until_ready(metrics['loss'])
      if i >= warmup:
        times.append(time.perf_counter() - t0)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'non-finite loss at seq_len={seq_len}')
  dt = statistics.median(times)
  n = len(devices)
  tokens_per_chip = batch * seq_len / dt / n
  model_flops = tokens_per_chip * flops.train_flops_per_token(cfg, seq_len)
  return {'step_s': dt, 'tokens_per_s_per_chip': tokens_per_chip,
          'model_tflops_per_chip': model_flops / 1e12, 'devices': n}


def main(argv=None) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--seq_lens', default='4096,8192,32768')
  p.add_argument('--layers', type=int, default=0, help='0: as many as fit (see above)')
  p.add_argument('--batch', type=int, default=0, help='sequences per step (0: one per device)')
  p.add_argument('--attention', default='auto')
  p.add_argument('--warmup', type=int, default=2)
  p.add_argument('--steps', type=int, default=5)
  p.add_argument('--peak', type=float, default=0.0, help='peak FLOP/s per device (0: table)')
  p.add_argument('--tiny', action='store_true', help='a tiny model at 256/512 tokens (CPU)')
  p.add_argument('--out', default='runs/mfu')
  a = p.parse_args(argv)
  if a.tiny:
    a.seq_lens = '256,512' if a.seq_lens == p.get_default('seq_lens') else a.seq_lens
  device = jax.devices()[0]
  batch = a.batch or len(jax.devices())
  peak = flops.device_peak(a.peak)
  print(f'[mfu] {len(jax.devices())} x {device.device_kind}; peak '
        f'{peak / 1e12 if peak else "unknown"} TFLOP/s per device; FLOPs: 6 x matmul params + '
        f'attention (causal once), remat not counted', flush=True)
  rows = []
  for T in (int(s) for s in a.seq_lens.split(',')):
    layers = a.layers or (2 if a.tiny else layers_that_fit(T, max(1, batch // len(jax.devices()))))
    cfg = model_config(layers, T, a.tiny, a.attention)
    row = {'device': device.device_kind, 'layers': layers, 'seq_len': T, 'batch': batch,
           'attention': a.attention}
    try:
      row.update(run_one(cfg, T, batch, a.warmup, a.steps))
      row['mfu'] = (row['model_tflops_per_chip'] * 1e12 / peak) if peak else None
    except Exception as e:  # noqa: BLE001  (out of memory at a length: report, go on)
      row['mfu'] = None
      row['step_s'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}'
    rows.append(row)
    print(f'[mfu] seq {T}: ' + ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}'
                                         for k, v in row.items() if k in COLUMNS[6:] or
                                         k == 'step_s'), flush=True)
  import os
  from jaxlm.report import write_table
  os.makedirs(os.path.dirname(a.out) or '.', exist_ok=True)
  print(write_table(a.out, COLUMNS, rows))
  return rows


if __name__ == '__main__':
  main()
