"""The synthetic retrieval tasks (jaxlm.data) at fixed gold positions and lengths.

For each length (a number of dictionaries) and gold position (a 1-based dictionary
index), held-out examples are generated with the evaluation seed and scored by part:
value, dictionary index and both (`jaxlm.data.scoring`). The grid feeds the
position-by-length heatmap.
"""

from __future__ import annotations

from jaxlm.evaluate.common import Options, SuiteResult, score_row
from jaxlm.evaluate.retrieval import evaluate_retrieval

MAX_NEW_TOKENS = 48
SEED = 10_000      # the trainer's held-out evaluation seed (configs/base.py eval.seed)


def default_positions(n: int) -> list[int]:
  return sorted({1, (n + 1) // 2, n, *([max(1, n // 4), max(1, 3 * n // 4)] if n >= 8 else [])})


def check(runner, opts: Options) -> None:
  """Every (length, position) setting builds its task (the task's own checks run)."""
  from jaxlm.data.tasks import make_task
  for n in opts.kv_lengths:
    positions = opts.positions or default_positions(n)
    bad = [p for p in positions if not 1 <= p <= n]
    if bad:
      raise ValueError(f'--positions {bad} are outside 1..{n} for {n} dictionaries')
    for p in positions:
      make_task(opts.kv_task, runner.tokenizer, **{**opts.kv_fields, 'num_dicts': n,
                                                    'gold_position': p})


def run(runner, opts: Options) -> SuiteResult:
  scores, preds, grid = [], [], []
  for n in opts.kv_lengths:
    positions = opts.positions or default_positions(n)
    fields = {**opts.kv_fields, 'num_dicts': n}
    res = evaluate_retrieval(runner.model, runner.tokenizer, opts.kv_task, fields,
                             positions=positions, per_position=opts.num_examples or 50,
                             seed=SEED + opts.seed, max_new_tokens=opts.max_new_tokens or MAX_NEW_TOKENS,
                             runner=runner)
    for p in res['predictions']:
      preds.append({**p, 'num_dicts': n})
    for p in positions:
      rows = [x for x in res['predictions'] if x['gold_position'] == p]
      for metric, key in (('accuracy', 'score'), ('value_accuracy', 'value_correct'),
                          ('dict_accuracy', 'dict_correct')):
        scores.append(score_row('kv', metric, [float(x[key]) for x in rows], task=opts.kv_task,
                                num_dicts=n, gold_position=p))
      grid.append((n, p, scores[-3]['value']))
  return SuiteResult(scores, preds, plots={'heatmap': grid})
