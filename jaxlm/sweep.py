"""Ablation sweeps: a grid of config overrides -> one run per point, then one table.

  python -m jaxlm.sweep --config=configs/tiny_kv.py --workdir=runs/sweep \\
      --grid='train.lr=1e-3,3e-3 model.num_layers=2,4' --set=train.steps=200
  python -m jaxlm.sweep ... --run=print --launcher='bash launch/tpu_pod.sh --name=my-v5p \\
      --zone=us-east5-a --type=v5p-32'        # print the pod commands instead of running
  python -m jaxlm.sweep ... --run=collect     # only gather finished runs into the table

Each grid point trains in WORKDIR/<name>, where the name lists the point's values
(`lr=0.001,num_layers=2`; a field's last component names it unless two fields share it).
Runs execute one after another (`--run=local`); a finished run (WORKDIR/<name>/sweep_done.json)
is skipped and an unfinished one resumes from its own checkpoints, so re-running a
half-finished sweep picks up where it stopped. `--launcher` runs each point through a
launcher taking `CONFIG [trainer flags]` (launch/multiprocess.sh N, launch/tpu_pod.sh ...),
otherwise `python -m jaxlm.train`.

The table (WORKDIR/sweep.csv, sweep.md, sweep.png) has one row per point: its values, the
final step, loss, tokens/s and MFU from the run's metrics.jsonl, and the held-out retrieval
accuracy from eval_kv.json when the run evaluated. The plot draws `--metric` against the
first grid field, one line per combination of the others.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
import time
from typing import Any

from jaxlm import report

DONE = 'sweep_done.json'
COLUMNS = ('step', 'loss', 'accuracy', 'value_accuracy', 'tokens_per_s', 'mfu')


class SweepError(ValueError):
  """A malformed grid or sweep request; the message names the offending text."""


def parse_grid(text: str) -> dict[str, list[str]]:
  """'a.b=1,2 c=x,y' -> {'a.b': ['1', '2'], 'c': ['x', 'y']} (order kept)."""
  grid: dict[str, list[str]] = {}
  for item in text.split():
    field, sep, values = item.partition('=')
    if not sep or not field or not values:
      raise SweepError(f'grid item {item!r} is not FIELD=v1,v2,...')
    if not re.fullmatch(r'[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*', field):
      raise SweepError(f'grid field {field!r} is not a dotted config field name')
    if field in grid:
      raise SweepError(f'grid field {field!r} is given twice')
    vals = values.split(',')
    if any(v == '' for v in vals):
      raise SweepError(f'grid item {item!r} has an empty value')
    grid[field] = vals
  if not grid:
    raise SweepError('the grid is empty; give --grid="field=v1,v2 ..."')
  return grid


def check_fields(config, grid: dict[str, list[str]]) -> None:
  """Every grid field must exist in the config (the trainer would reject it later)."""
  for field in grid:
    node = config
    for part in field.split('.'):
      if not hasattr(node, 'keys') or part not in node.keys():
        raise SweepError(f'grid field {field!r}: the config has no field {part!r} there')
      node = node[part]


def short_names(fields: list[str]) -> dict[str, str]:
  last = [f.split('.')[-1] for f in fields]
  return {f: (l if last.count(l) == 1 else f) for f, l in zip(fields, last)}


def _safe(value: str) -> str:
  return re.sub(r'[^A-Za-z0-9._+-]', '-', value)


def expand(grid: dict[str, list[str]]) -> list[tuple[str, dict[str, str]]]:
  """The points of the grid in row-major order, each with its run name."""
  fields = list(grid)
  names = short_names(fields)
  points = []
  for values in itertools.product(*grid.values()):
    point = dict(zip(fields, values))
    points.append((','.join(f'{names[f]}={_safe(v)}' for f, v in point.items()), point))
  seen = [n for n, _ in points]
  if len(set(seen)) != len(seen):
    raise SweepError(f'two grid points map to the same run name: {seen}')
  return points


def command(config: str, workdir: str, point: dict[str, str], fixed: list[str],
            launcher: str | None) -> list[str]:
  flags = [f'--workdir={workdir}'] + [f'--config.{s}' for s in fixed] + [
      f'--config.{f}={v}' for f, v in point.items()]
  if launcher:
    return shlex.split(launcher) + [config] + flags
  return [sys.executable, '-m', 'jaxlm.train', f'--config={config}'] + flags


def collect_run(run_dir: str) -> dict[str, Any] | None:
  """Final metrics of one run, or None if it has not logged a step yet."""
  metrics = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.exists(metrics):
    return None
  last, last_train = None, None
  with open(metrics) as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        m = json.loads(line)
      except json.JSONDecodeError:
        continue   # a line cut by a kill; the trainer appends whole lines
      last = m
      if 'loss' in m:
        last_train = m
  if last_train is None:
    return None
  row = {k: last_train.get(k) for k in ('step', 'loss', 'tokens_per_s', 'mfu')}
  row['step'] = max(row['step'] or 0, (last or {}).get('step', 0))
  ev = os.path.join(run_dir, 'eval_kv.json')
  if os.path.exists(ev):
    with open(ev) as f:
      e = json.load(f)
    row['accuracy'], row['value_accuracy'] = e.get('accuracy'), e.get('value_accuracy')
  return row


def write_table(workdir: str, grid: dict[str, list[str]], rows: list[dict[str, Any]],
                metric: str) -> str:
  head = ['run', *grid, 'status', *COLUMNS]
  text = report.write_table(os.path.join(workdir, 'sweep'), head, rows)
  _plot(os.path.join(workdir, 'sweep.png'), grid, rows, metric)
  return text


def _plot(path: str, grid, rows, metric: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fields = list(grid)
  x_field, others = fields[0], fields[1:]
  fig, ax = plt.subplots(figsize=(6, 4))
  xs = grid[x_field]
  try:
    xnum = [float(x) for x in xs]
  except ValueError:
    xnum = None
  for combo in itertools.product(*(grid[o] for o in others)):
    sel = {o: v for o, v in zip(others, combo)}
    ys = []
    for x in xs:
      r = next((r for r in rows if r[x_field] == x and all(r[o] == v for o, v in sel.items())),
               None)
      ys.append(r.get(metric) if r else None)
    pts = [(i, y) for i, y in enumerate(ys) if y is not None]
    if not pts:
      continue
    px = [xnum[i] if xnum else i for i, _ in pts]
    label = ', '.join(f'{o.split(".")[-1]}={v}' for o, v in sel.items()) or metric
    ax.plot(px, [y for _, y in pts], marker='o', label=label)
  if xnum and min(xnum) > 0 and max(xnum) / min(xnum) >= 10:
    ax.set_xscale('log')
  if not xnum:
    ax.set_xticks(range(len(xs)), xs)
  ax.set_xlabel(x_field)
  ax.set_ylabel(metric)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run_sweep(config_path: str, grid: dict[str, list[str]], workdir: str, *,
              fixed: list[str] = (), mode: str = 'local', launcher: str | None = None,
              metric: str = 'loss', log=print) -> list[dict[str, Any]]:
  if mode not in ('local', 'print', 'collect'):
    raise SweepError(f"--run={mode!r} must be 'local', 'print' or 'collect'")
  points = expand(grid)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump({'config': config_path, 'grid': grid, 'set': list(fixed),
               'launcher': launcher}, f, indent=2)
  rows = []
  t_start = time.time()
  for i, (name, point) in enumerate(points):
    run_dir = os.path.join(workdir, name)
    cmd = command(config_path, run_dir, point, list(fixed), launcher)
    status = 'done' if os.path.exists(os.path.join(run_dir, DONE)) else 'pending'
    if mode == 'print':
      log(shlex.join(cmd))
    elif mode == 'local' and status != 'done':
      done_before = sum(r['status'] == 'ran' for r in rows)
      eta = ''
      if done_before:
        per = (time.time() - t_start) / done_before
        eta = f', ETA {per * (len(points) - i) / 60:.1f} min'
      log(f'[sweep] run {i + 1}/{len(points)}: {name}{eta}\n[sweep] $ {shlex.join(cmd)}')
      os.makedirs(run_dir, exist_ok=True)
      with open(os.path.join(run_dir, 'sweep_train.log'), 'a') as logf:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
          logf.write(line)
          if line.startswith(('[train]', '[eval]', 'config error')):
            log(f'  {line.rstrip()}')
        rc = proc.wait()
      if rc != 0:
        status = f'failed (exit {rc}, see {run_dir}/sweep_train.log)'
        log(f'[sweep] {name}: {status}')
      else:
        status = 'ran'
        result = collect_run(run_dir) or {}
        with open(os.path.join(run_dir, DONE), 'w') as f:
          json.dump({'point': point, **result}, f)
    row = {'run': name, **point, 'status': status, **(collect_run(run_dir) or {})}
    rows.append(row)
  if mode != 'print':
    table = write_table(workdir, grid, rows, metric)
    log(table)
    log(f'[sweep] wrote {workdir}/sweep.csv, sweep.md, sweep.png')
  return rows


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', required=True, help='training config file (configs/NAME.py)')
  p.add_argument('--grid', required=True, help="'field=v1,v2 other=a,b' (space-separated)")
  p.add_argument('--workdir', default='runs/sweep', help='one sub-directory per grid point')
  p.add_argument('--set', action='append', default=[], metavar='FIELD=VALUE',
                 help='an override applied to every run (repeatable), e.g. train.steps=100')
  p.add_argument('--run', default='local', choices=('local', 'print', 'collect'))
  p.add_argument('--launcher', default=None,
                 help="command taking 'CONFIG [flags]', e.g. 'bash launch/multiprocess.sh 2'")
  p.add_argument('--metric', default='loss', choices=COLUMNS, help='plotted against the grid')
  a = p.parse_args(argv)
  try:
    grid = parse_grid(a.grid)
    for s in a.set:
      if '=' not in s:
        raise SweepError(f'--set {s!r} is not FIELD=VALUE')
    if not os.path.exists(a.config):
      raise SweepError(f'config file {a.config!r} not found')
    from jaxlm.config import load_config_file
    check_fields(load_config_file(a.config), grid)
    rows = run_sweep(a.config, grid, a.workdir, fixed=a.set, mode=a.run, launcher=a.launcher,
                     metric=a.metric)
  except SweepError as e:
    sys.exit(f'sweep error: {e}')
  if any(r['status'].startswith('failed') for r in rows):
    sys.exit(1)


if __name__ == '__main__':
  main()
