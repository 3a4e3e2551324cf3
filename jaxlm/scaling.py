"""Long-sequence scaling study: sequence length x attention kernel x device count ->
step time, tokens/s, per-device memory, MFU, from the trainer itself.

  python -m jaxlm.scaling --config=configs/tiny_kv.py --seq_lens=512,1024,2048,4096 \\
      --attention=dense,blockwise,ring --devices=1,2,4,8 --cpu_devices=8 --out=runs/scaling
  python -m jaxlm.scaling --config=configs/mistral7b_simple_kv.py --mode=aot \\
      --seq_lens=4096,32768 --attention=blockwise,ring --devices=8   # memory only

Every row is a real trainer run (`jaxlm.train.train`, in this process, on the first D
devices) for `--steps` steps: step time is the median over the steps after the first
(which compiles), tokens/s = global batch x seq_len / step time, MFU from the trainer's
metrics where the chip's peak is known (None on CPU; the achieved model TFLOP/s is always
given). Memory is the compiler's per-device estimate for the same step (the trainer's
--aot_only analysis). `--mode=aot` skips the timed run: sizes too big to run here still get
their memory. Layout per row: dense and blockwise shard the batch over D devices
(fsdp=D), ring shards the sequence (context=D); the global batch is the same for every row
(`--batch`, default the largest D), so each device holds the same number of tokens.

Outputs in --out: scaling.csv, scaling.md and scaling.png (log-log: tokens/s and memory
against sequence length, one line per kernel x device count). A row that cannot run (a
config error, out of memory) is kept with its reason.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
import time
from typing import Any

from jaxlm import report

COLUMNS = ('seq_len', 'attention', 'devices', 'mesh', 'status', 'step_time_s', 'tokens_per_s',
           'model_tflops_per_s', 'mfu', 'memory_gib_per_device', 'temp_gib_per_device')


def row_config(base, seq_len: int, attention: str, devices: int, batch: int, steps: int):
  c = base.copy_and_resolve_references()
  c.data.seq_len = seq_len
  c.model.attention_impl = attention
  c.mesh.devices = devices
  c.mesh.data, c.mesh.tensor = 1, 1
  if attention == 'ring':
    c.mesh.fsdp, c.mesh.context = 1, devices
  else:
    c.mesh.fsdp, c.mesh.context = devices, 1
  if c.model.get('max_position_embeddings', 0) and c.model.max_position_embeddings < seq_len:
    c.model.max_position_embeddings = seq_len
  c.train.batch_size, c.train.steps, c.train.log_every = batch, steps, 1
  c.train.grad_accum = 1
  c.train.checkpoint_every = 10**9
  c.eval.every, c.eval.per_position = 0, 0
  c.export_hf = False
  return c


def measure(c, workdir: str, mode: str) -> dict[str, Any]:
  from jaxlm import flops
  from jaxlm import train as trainer
  if os.path.exists(workdir):   # a fresh run: the trainer would resume an old one
    shutil.rmtree(workdir)
  row: dict[str, Any] = {}
  report = trainer.train(c, os.path.join(workdir, 'aot'), aot_only=True, log=lambda _: None)
  row['mesh'] = 'x'.join(f'{k}{v}' for k, v in report['mesh'].items() if v > 1) or 'single'
  row['memory_gib_per_device'] = report['total_bytes_per_device'] / 2**30
  row['temp_gib_per_device'] = report['temp_bytes'] / 2**30
  if mode == 'aot':
    return row
  need, have = report['total_bytes_per_device'], _capacity_per_device(c.mesh.devices)
  if have and need > have:
    row['status'] = (f'skipped: needs {need / 2**30:.1f} GiB per device, '
                     f'{have / 2**30:.1f} GiB available')
    return row
  trainer.train(c, workdir, log=lambda _: None)
  import json
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    ms = [json.loads(l) for l in f if l.strip()]
  times = [m['step_time'] for m in ms if 'step_time' in m][1:]   # the first step compiles
  if not times:
    raise ValueError(f'--steps={c.train.steps} leaves no timed step; use at least 2')
  dt = statistics.median(times)
  cfg = trainer.model_config(c)
  tokens = c.train.batch_size * c.data.seq_len / dt
  row.update(step_time_s=dt, tokens_per_s=tokens,
             model_tflops_per_s=tokens * flops.train_flops_per_token(cfg, c.data.seq_len) / 1e12,
             mfu=flops.mfu(tokens, cfg, c.data.seq_len, c.mesh.devices,
                           flops.device_peak(c.train.peak_flops_per_device)))
  return row


def _capacity_per_device(num_devices: int) -> float | None:
  """Memory one device may use: its HBM limit on an accelerator; on CPU, where simulated
  devices share the host, 80% of physical memory split over them (an estimate beyond it
  would get the run killed by the OS, not reported)."""
  import jax
  dev = jax.devices()[0]
  if dev.platform == 'cpu':
    try:
      host = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
    except (ValueError, OSError):
      return None
    return 0.8 * host / num_devices
  stats = dev.memory_stats() or {}
  return stats.get('bytes_limit')


def write_outputs(out: str, rows: list[dict[str, Any]]) -> str:
  text = report.write_table(os.path.join(out, 'scaling'), COLUMNS, rows)
  _plot(os.path.join(out, 'scaling.png'), rows)
  return text


def _plot(path: str, rows) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  series = sorted({(r['attention'], r['devices']) for r in rows})
  for (impl, d) in series:
    pts = sorted((r['seq_len'], r) for r in rows if (r['attention'], r['devices']) == (impl, d))
    for ax, key in zip(axes, ('tokens_per_s', 'memory_gib_per_device')):
      xy = [(t, r[key]) for t, r in pts if r.get(key)]
      if xy:
        ax.plot(*zip(*xy), marker='o', label=f'{impl}, {d} dev')
  for ax, label in zip(axes, ('tokens/s (training)', 'GiB per device (compiler estimate)')):
    ax.set_xscale('log', base=2)
    ax.set_yscale('log')
    ax.set_xlabel('sequence length')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, which='both')
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_study(base, seq_lens, attentions, devices, out: str, *, steps: int = 4,
              batch: int | None = None, mode: str = 'run', log=print) -> list[dict[str, Any]]:
  import jax
  from jaxlm.config import ConfigError
  if mode not in ('run', 'aot'):
    raise ValueError(f"--mode={mode!r} must be 'run' or 'aot'")
  too_many = [d for d in devices if d > jax.device_count()]
  if too_many:
    raise ValueError(f'--devices {too_many} exceed the {jax.device_count()} devices here '
                     f'(on CPU, --cpu_devices=N simulates N)')
  batch = batch or max(devices)
  os.makedirs(out, exist_ok=True)
  rows = []
  grid = list(itertools.product(seq_lens, attentions, devices))
  t0 = time.time()
  for i, (T, impl, d) in enumerate(grid):
    name = f'T{T}-{impl}-d{d}'
    row = {'seq_len': T, 'attention': impl, 'devices': d, 'status': 'ok'}
    try:
      row.update(measure(row_config(base, T, impl, d, batch, steps), os.path.join(out, name),
                         mode))
    except (ConfigError, ValueError) as e:
      row['status'] = f'config error: {e}'
    except Exception as e:   # e.g. XLA out of memory: keep the row, say why
      row['status'] = f'failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}'
    row.setdefault('status', 'ok')
    rows.append(row)
    eta = (time.time() - t0) / (i + 1) * (len(grid) - i - 1)
    log(f'[scaling] {i + 1}/{len(grid)} {name}: ' + (
        f'{report.fmt(row.get("tokens_per_s"))} tok/s, ' if 'tokens_per_s' in row else '') + (
        f'{report.fmt(row.get("memory_gib_per_device"))} GiB/device' if row['status'] == 'ok'
        else row['status'][:200]) + f' (ETA {eta:.0f}s)')
  text = write_outputs(out, rows)
  log(text + f'[scaling] wrote {out}/scaling.csv, scaling.md, scaling.png')
  return rows


def _ints(text: str, flag: str) -> list[int]:
  try:
    vals = [int(x) for x in text.split(',') if x]
  except ValueError:
    raise SystemExit(f'{flag}={text!r} must be comma-separated integers') from None
  if not vals or min(vals) < 1:
    raise SystemExit(f'{flag}={text!r} must list positive integers')
  return vals


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True)
  p.add_argument('--seq_lens', required=True, help='e.g. 512,1024,2048')
  p.add_argument('--attention', default='dense,blockwise,ring')
  p.add_argument('--devices', default='1', help='device counts, e.g. 1,2,4,8')
  p.add_argument('--steps', type=int, default=4, help='timed steps + 1 compile step')
  p.add_argument('--batch', type=int, default=None, help='global batch (default: max devices)')
  p.add_argument('--mode', default='run', choices=('run', 'aot'))
  p.add_argument('--cpu_devices', type=int, default=None,
                 help='simulate N CPU devices (sets XLA_FLAGS; CPU only)')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='config override for every row, e.g. model.num_layers=2')
  p.add_argument('--out', default='runs/scaling')
  a = p.parse_args(argv)
  if a.cpu_devices:
    os.environ['JAX_PLATFORMS'] = 'cpu'
    os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={a.cpu_devices} '
                               + os.environ.get('XLA_FLAGS', ''))
  from jaxlm.config import load_config_file
  from jaxlm.attention import IMPLEMENTATIONS
  attentions = [x for x in a.attention.split(',') if x]
  bad = [x for x in attentions if x not in IMPLEMENTATIONS]
  if bad:
    raise SystemExit(f'--attention {bad}: unknown; known kernels are {list(IMPLEMENTATIONS)}')
  try:
    base = load_config_file(a.config)
  except ValueError as e:
    raise SystemExit(f'scaling error: {e}') from None
  for s in a.set:
    field, sep, value = s.partition('=')
    node, *path = field.split('.')
    try:
      section = base[node] if path else base
      key = path[-1] if path else node
      for part in path[:-1]:
        section = section[part]
      old = section[key]
    except (KeyError, AttributeError):
      raise SystemExit(f'--set {s!r}: the config has no field {field!r}') from None
    if not sep:
      raise SystemExit(f'--set {s!r} is not FIELD=VALUE')
    section[key] = type(old)(value) if old is not None and not isinstance(old, bool) else (
        value.lower() in ('1', 'true') if isinstance(old, bool) else value)
  try:
    run_study(base, _ints(a.seq_lens, '--seq_lens'), attentions, _ints(a.devices, '--devices'),
              a.out, steps=a.steps, batch=a.batch, mode=a.mode)
  except ValueError as e:
    sys.exit(f'scaling error: {e}')


if __name__ == '__main__':
  main()
