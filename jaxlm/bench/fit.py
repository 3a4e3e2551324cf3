"""Will the paper's 7B recipe fit? Ahead-of-time compiles of configs/mistral7b_simple_kv.py
for TPU topologies over context length, attention kernel, remat policy and mesh shape.

  python -m jaxlm.bench.fit --out=runs/fit                       # the default study
  python -m jaxlm.bench.fit --topologies=v5p-8,v5p-32 --seq_lens=4096,32768 \\
      --attention=blockwise,ring --remat=full --out=runs/fit
  python -m jaxlm.bench.fit ... --unrolled      # layers unrolled rather than scanned
  python -m jaxlm.bench.fit --config=configs/mistral7b_simple_kv_lora.py \
      --topologies=v5e-1,v6e-1 --seq_lens=4096 --attention=splash   # LoRA on one chip

Each case is `python -m jaxlm.train --config=configs/mistral7b_simple_kv.py --aot_only
--topology=T` (or the --config given) in this process (jaxlm.aot.compile_report): per-device memory from the
compiler, fits or not, the step-time lower bound and MFU upper bound. Mesh per case: the
global batch (16 sequences, the paper's) goes over fsdp up to the chip count; chips beyond
it go to `context` for ring attention and to `tensor` otherwise; a config's gradient
accumulation is lowered where its micro-batch would not divide over fsdp (LoRA's 16 micro-
batches of one sequence on one chip become 4 of 4 on four). Outputs in --out:
fit.csv, fit.md, fit.png (memory per device against context length, one panel per
topology, the chip's HBM drawn) and, per context length, the smallest topology on which
some case fits. Needs libtpu (requirements-tpu.txt). Compiles are slow on a small host
(minutes each for 32 layers); `--layers` compiles a shallower model for a quick look.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Any

from jaxlm import report

COLUMNS = ('topology', 'seq_len', 'attention', 'remat', 'layers', 'lora', 'grad_accum', 'mesh',
           'fits', 'gib_per_device',
           'hbm_gib', 'arguments_gib', 'temporaries_gib', 'step_time_lower_bound_s',
           'mfu_upper_bound', 'compile_s', 'status')


def mesh_for(chips: int, batch: int, attention: str) -> dict[str, int]:
  """Ring shards the sequence: context takes the chips beyond the batch, and at least 2.
  Otherwise the batch goes over fsdp and chips beyond it go to tensor."""
  context = 1
  if attention == 'ring' and chips > 1:
    context = max(2, chips // batch)
  fsdp = min(chips // context, batch)
  while (chips // context) % fsdp or batch % fsdp:
    fsdp -= 1
  rest = chips // (context * fsdp)
  return dict(data=1, fsdp=fsdp, tensor=rest, context=context)


DEFAULT_CONFIG = 'configs/mistral7b_simple_kv.py'


def case_config(seq_len: int, attention: str, remat: str, mesh: dict[str, int],
                layers: int | None, unrolled: bool = False, config: str = DEFAULT_CONFIG):
  from jaxlm.config import load_config_file
  c = load_config_file(config)
  if unrolled:
    c.model.scan_layers = False
  c.data.seq_len = seq_len
  c.model.attention_impl = attention
  c.model.remat = remat
  if layers:
    c.model.num_layers = layers
  for k, v in mesh.items():
    c.mesh[k] = v
  c.mesh.devices = 0
  batch_par = mesh['data'] * mesh['fsdp']
  while c.train.grad_accum > 1 and (c.train.batch_size // c.train.grad_accum) % batch_par:
    c.train.grad_accum //= 2   # the micro-batch must divide over the batch axes
  return c


def run_case(topology: str, seq_len: int, attention: str, remat: str,
             layers: int | None, workdir: str, unrolled: bool = False,
             config: str = DEFAULT_CONFIG) -> dict[str, Any]:
  from jaxlm import aot
  from jaxlm import train as trainer
  topo = aot.parse_topology(topology)
  mesh = mesh_for(topo.num_devices, 16, attention)
  c = case_config(seq_len, attention, remat, mesh, layers, unrolled, config)
  row: dict[str, Any] = {'topology': topology, 'seq_len': seq_len, 'attention': attention,
                         'remat': remat, 'layers': 'unrolled' if unrolled else 'scanned',
                         'lora': c.train.lora.rank or '-', 'grad_accum': c.train.grad_accum,
                         'hbm_gib': topo.chip['hbm'] / 2**30,
                         'mesh': 'x'.join(f'{k}{v}' for k, v in mesh.items() if v > 1) or '1'}
  t0 = time.time()
  try:
    r = trainer.train(c, workdir, aot_only=True, topology=topology, log=lambda _: None)
  except (trainer.ConfigError, aot.TopologyError) as e:
    row.update(status=f'config error: {e}', fits=None)
    return row
  except Exception as e:   # a kernel that does not lower for this case, etc.
    row.update(status=f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}',
               fits=None)
    return row
  row['compile_s'] = time.time() - t0
  gib = lambda b: None if b is None else b / 2**30
  row.update(fits=r['fits'], gib_per_device=gib(r['total_bytes_per_device']),
             arguments_gib=gib(r['argument_bytes']), temporaries_gib=gib(r['temp_bytes']),
             step_time_lower_bound_s=r['step_time_lower_bound_s'],
             mfu_upper_bound=r['mfu_upper_bound'],
             status='ok' if not r.get('compile_error') else 'compiler: out of HBM')
  return row


def smallest_fitting(rows, order: list[str]) -> dict[int, str | None]:
  out = {}
  for T in sorted({r['seq_len'] for r in rows}):
    fit = [r for r in rows if r['seq_len'] == T and r.get('fits')]
    best = min(fit, key=lambda r: (order.index(r['topology']),
                                   r['step_time_lower_bound_s'] or 0), default=None)
    out[T] = best
  return out


def write_outputs(out: str, rows, order: list[str]) -> str:
  md = report.write_table(os.path.join(out, 'fit'), COLUMNS, rows).splitlines()
  md.append('')
  for T, r in smallest_fitting(rows, order).items():
    md.append(f'- {T} tokens: ' + (
        f"smallest fitting topology {r['topology']} ({r['attention']}, remat {r['remat']}, "
        f"mesh {r['mesh']}, {r['gib_per_device']:.1f} GiB per chip)" if r else
        'no topology in the study fits'))
  text = '\n'.join(md) + '\n'
  with open(os.path.join(out, 'fit.md'), 'w') as f:
    f.write(text)
  _plot(os.path.join(out, 'fit.png'), rows, order)
  return text


def _plot(path: str, rows, order: list[str]) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  tops = [t for t in order if any(r['topology'] == t for r in rows)]
  fig, axes = plt.subplots(1, len(tops), figsize=(4.5 * len(tops), 3.8), squeeze=False)
  for ax, t in zip(axes[0], tops):
    mine = [r for r in rows if r['topology'] == t]
    for attn, remat in sorted({(r['attention'], r['remat']) for r in mine}):
      pts = sorted((r['seq_len'], r['gib_per_device']) for r in mine
                   if (r['attention'], r['remat']) == (attn, remat) and r.get('gib_per_device'))
      if pts:
        ax.plot(*zip(*pts), marker='o', label=f'{attn}, remat {remat}')
    ax.axhline(mine[0]['hbm_gib'], color='k', ls='--', lw=1, label='HBM per chip')
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_title(t)
    ax.set_xlabel('context length')
    ax.set_ylabel('GiB per device')
    ax.grid(alpha=0.3, which='both')
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--topologies', default='v5p-8,v5p-16,v5p-32,v5p-64,v5p-128',
                 help='smallest first')
  p.add_argument('--seq_lens', default='4096,32768,131072')
  p.add_argument('--attention', default='blockwise')
  p.add_argument('--remat', default='full')
  p.add_argument('--layers', type=int, default=None, help='compile a shallower model')
  p.add_argument('--unrolled', action='store_true',
                 help="unrolled layers (model.scan_layers=False); default: the config's scan")
  p.add_argument('--all', action='store_true',
                 help='compile every topology; default: per context length, kernel and remat, '
                      'stop at the first topology (in the given order) that fits')
  p.add_argument('--config', default=DEFAULT_CONFIG,
                 help='the training config to compile (e.g. configs/mistral7b_simple_kv_lora.py)')
  p.add_argument('--out', default='runs/fit')
  a = p.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  from jaxlm import aot
  try:
    tops = a.topologies.split(',')
    for t in tops:
      aot.parse_topology(t)
  except aot.TopologyError as e:
    sys.exit(f'fit: {e}')
  os.makedirs(a.out, exist_ok=True)
  cases = list(itertools.product(tops, [int(x) for x in a.seq_lens.split(',')],
                                 a.attention.split(','), a.remat.split(',')))
  # Compiled cases are kept in fit.json: a rerun with the same --out skips them.
  done_path = os.path.join(a.out, 'fit.json')
  done = {}
  if os.path.exists(done_path):
    with open(done_path) as f:
      done = {tuple(r['key']): r for r in json.load(f)}
  rows, t0, fitted, too_big = [], time.time(), set(), set()
  for i, (t, T, attn, remat) in enumerate(cases):
    if not a.all and (T, attn, remat) in fitted:
      continue   # a smaller topology already fits this case
    if not a.all and any(t == bt and T > bT and (attn, remat) == k for bt, bT, k in too_big):
      continue   # a shorter context already does not fit this topology
    key = (t, T, attn, remat, a.layers) + (('unrolled',) if a.unrolled else ('scanned',))
    key += (a.config,) if a.config != DEFAULT_CONFIG else ()
    row = done.get(key)
    if not row or row.get('fits') is None:   # errors are tried again (a fixed setup may pass)
      row = run_case(t, T, attn, remat, a.layers, os.path.join(a.out, 'aot'), a.unrolled,
                     a.config)
    done[key] = {**row, 'key': list(key)}
    with open(done_path, 'w') as f:
      json.dump(list(done.values()), f, indent=1)
    rows.append(row)
    if row.get('fits'):
      fitted.add((T, attn, remat))
    elif row.get('fits') is False:
      too_big.add((t, T, (attn, remat)))
    r = rows[-1]
    eta = (time.time() - t0) / (i + 1) * (len(cases) - i - 1)
    print(f'[fit] {i + 1}/{len(cases)} {t} T={T} {attn} remat={remat} mesh {r["mesh"]}: '
          + (f'{r["gib_per_device"]:.1f} GiB/device, fits {report.fmt(r["fits"])}'
             if r.get('gib_per_device') else r['status'])
          + f' (ETA {eta / 60:.0f} min)', flush=True)
    write_outputs(a.out, rows, tops)   # partial results survive an interruption
  print(write_outputs(a.out, rows, tops))
  print(f'[fit] wrote {a.out}/fit.csv, fit.md, fit.png')


if __name__ == '__main__':
  main()
