"""Side-by-side table of several evaluation runs (the paper's original vs fine-tuned vs
baselines), and their accuracy-vs-position curves on one figure.

  python -m jaxlm.evaluate.compare evals/original evals/simple_kv evals/niah \\
      [--out=evals/compare] [--markdown]

Each argument is an --out directory of `python -m jaxlm.evaluate` (or its results.json).
Rows are (suite, metric, settings); a run without a row shows '-'. Cells are scores in
points with their standard error (± s.e., over the row's n examples, in the `n` column);
the first run is the reference: later columns also show the difference from it in points,
with the standard error of that difference over the same examples (`paired s.e.`) where
both runs' predictions_SUITE.jsonl files sit beside their results and the suite scores
one metric per example (the per-example differences' standard deviation / sqrt(n), over
the same questions answered by both models).
The position plots draw the standard errors as error bars.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from jaxlm.evaluate.common import RESULT_FIELDS as _SKIP, stderr


def load(path: str) -> dict[str, Any]:
  file = path if path.endswith('.json') else os.path.join(path, 'results.json')
  if not os.path.exists(file):
    raise SystemExit(f'compare: {file} does not exist (run python -m jaxlm.evaluate first)')
  with open(file) as f:
    res = json.load(f)
  if 'scores' not in res:
    raise SystemExit(f'compare: {file} has no "scores" (not a jaxlm.evaluate results.json)')
  res['_dir'] = os.path.dirname(os.path.abspath(file))
  return res


def _predictions(run: dict[str, Any], suite: str) -> list[dict[str, Any]] | None:
  file = os.path.join(run.get('_dir', ''), f'predictions_{suite}.jsonl')
  if not os.path.exists(file):
    return None
  with open(file) as f:
    return [json.loads(line) for line in f if line.strip()]


def paired_stderr(ref: dict[str, Any], other: dict[str, Any], score: dict[str, Any]):
  """Standard error of the mean per-example difference (other - ref) on the row `score`
  describes, matching examples by id and the row's settings; None when the predictions
  are missing, the suite scores several metrics per example, or the ids do not match."""
  suite = score['suite']
  if len({s['metric'] for s in ref['scores'] if s['suite'] == suite}) != 1:
    return None
  settings = {k: v for k, v in score.items() if k not in _SKIP}
  per_run = []
  for run in (ref, other):
    preds = _predictions(run, suite)
    if preds is None:
      return None
    rows = {}
    for p in preds:
      if all(k in p for k in settings) and all(p[k] == v for k, v in settings.items()):
        rows[p.get('id')] = float(p['score'])
    per_run.append(rows)
  a, b = per_run
  if not a or a.keys() != b.keys() or len(a) != score.get('n', len(a)) or len(a) < 2:
    return None
  return stderr([b[i] - a[i] for i in a])


def row_key(score: dict[str, Any]) -> tuple:
  settings = tuple(sorted((k, str(v)) for k, v in score.items() if k not in _SKIP))
  return (score['suite'], score['metric'], settings)


def table(runs: list[dict[str, Any]], markdown: bool = False) -> str:
  names = [r.get('name') or f'run{i}' for i, r in enumerate(runs)]
  keys: list[tuple] = []
  values: list[dict[tuple, dict[str, Any]]] = []
  for r in runs:
    d = {}
    for s in r['scores']:
      k = row_key(s)
      d[k] = s
      if k not in keys:
        keys.append(k)
    values.append(d)
  header = ['suite', 'metric', 'settings', 'n'] + [
      n if i == 0 else f'{n} (Δ)' for i, n in enumerate(names)]
  rows = []
  for k in keys:
    ref = values[0].get(k)
    cells = []
    for i, d in enumerate(values):
      s = d.get(k)
      if s is None:
        cells.append('-')
        continue
      v, se = 100 * s['value'], s.get('stderr')
      cell = f'{v:.2f}' + (f' ± {100 * se:.2f}' if isinstance(se, float) and se == se else '')
      if i > 0 and ref is not None:
        pse = paired_stderr(runs[0], runs[i], ref)
        pse = f' ± {100 * pse:.2f} paired s.e.' if pse is not None else ''
        cell += f" ({v - 100 * ref['value']:+.2f}{pse})"
      cells.append(cell)
    ns = sorted({str(d[k]['n']) for d in values if k in d and 'n' in d[k]}, key=int)
    rows.append([k[0], k[1], ', '.join(f'{a}={b}' for a, b in k[2]), '/'.join(ns) or '-'] + cells)
  if markdown:
    out = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    out += ['| ' + ' | '.join(r) + ' |' for r in rows]
    return '\n'.join(out)
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  fmt = lambda r: '  '.join(str(x).ljust(w) for x, w in zip(r, widths))
  return '\n'.join([fmt(header), fmt(['-' * w for w in widths])] + [fmt(r) for r in rows])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='evaluation output directories or results.json')
  parser.add_argument('--out', default=None, help='write comparison.md and position plots here')
  parser.add_argument('--markdown', action='store_true', help='print a Markdown table')
  args = parser.parse_args(argv)
  runs = [load(p) for p in args.runs]
  for i, r in enumerate(runs):   # distinct names for the columns
    r['name'] = r.get('name') or os.path.basename(os.path.normpath(args.runs[i]))
  text = table(runs, markdown=args.markdown)
  print(text)
  if args.out:
    from jaxlm.evaluate import plots
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, 'comparison.md'), 'w') as f:
      f.write(table(runs, markdown=True) + '\n')
    scores = {r['name']: r['scores'] for r in runs}
    for suite, metric, group in (('mdqa', 'best_subspan_em', 'num_docs'),
                                 ('litm_kv', 'accuracy', None),
                                 ('kv', 'accuracy', 'num_dicts')):
      if plots.position_curves(scores, os.path.join(args.out, f'{suite}_by_position.png'),
                               suite=suite, metric=metric, group_key=group):
        print(f'[compare] wrote {args.out}/{suite}_by_position.png')
    print(f'[compare] wrote {args.out}/comparison.md')


if __name__ == '__main__':
  main()
