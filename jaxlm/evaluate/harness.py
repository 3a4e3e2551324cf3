"""The evaluation run itself, independent of the command line: suites in order, their
outputs written as they finish, throughput totals (`python -m jaxlm.evaluate` parses flags
and calls run_suites)."""

from __future__ import annotations

import json
import os
import time

from jaxlm.evaluate.common import RESULT_FIELDS, Options


def run_suites(runner, suites: list[str], opts: Options, out: str, name: str,
               source: dict, settings: dict, *,
               mdqa_variants=('haystack', 'oracle', 'closedbook'),
               benchmarks=('mmlu', 'hellaswag', 'gsm8k', 'triviaqa', 'nq_open')) -> dict:
  """Run `suites` with `runner`; write results.json, predictions_SUITE.jsonl and plots
  into `out`; return the results."""
  from jaxlm.evaluate import plots
  from jaxlm.evaluate.suites import flenqa, general, kv, litm_kv, mdqa
  os.makedirs(out, exist_ok=True)
  results = {'name': name, 'model': source, 'settings': settings, 'scores': [], 'notes': [],
             'throughput': {}}
  # Every suite's settings against its data first: a bad setting fails before any model call.
  for suite in suites:
    if suite == 'mdqa':
      mdqa.check(opts, tuple(mdqa_variants))
    elif suite == 'general':
      general.check(opts, tuple(benchmarks))
    elif suite == 'kv':
      kv.check(runner, opts)
    else:
      {'flenqa': flenqa, 'litm_kv': litm_kv}[suite].check(opts)
  t0 = time.perf_counter()
  for suite in suites:
    if suite == 'mdqa':
      res = mdqa.run(runner, opts, variants=tuple(mdqa_variants))
    elif suite == 'general':
      res = general.run(runner, opts, benchmarks=tuple(benchmarks))
    else:
      res = {'kv': kv, 'flenqa': flenqa, 'litm_kv': litm_kv}[suite].run(runner, opts)
    results['scores'] += res.scores
    results['notes'] += res.notes
    with open(os.path.join(out, f'predictions_{suite}.jsonl'), 'w') as f:
      for p in res.predictions:
        f.write(json.dumps(p) + '\n')
    if suite in ('mdqa', 'litm_kv'):
      metric = 'best_subspan_em' if suite == 'mdqa' else 'accuracy'
      plots.position_curves({name: res.scores}, os.path.join(out, f'{suite}_by_position.png'),
                            suite=suite, metric=metric,
                            group_key='num_docs' if suite == 'mdqa' else None)
    if suite == 'kv':
      plots.position_curves({name: res.scores}, os.path.join(out, 'kv_by_position.png'),
                            suite='kv', metric='accuracy', group_key='num_dicts')
      plots.heatmap(res.plots['heatmap'], os.path.join(out, 'kv_heatmap.png'),
                    f'{name}: {opts.kv_task} accuracy by position and length')
  elapsed = time.perf_counter() - t0
  st = runner.stats
  results['throughput'] = {
      **st, 'elapsed_s': elapsed,
      'generate_tokens_per_s': (st['prefill_tokens'] + st['decode_tokens']) / st['generate_s']
      if st['generate_s'] else None,
      'loglik_tokens_per_s': st['loglik_tokens'] / st['loglik_s'] if st['loglik_s'] else None}
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def format_scores(scores: list[dict]) -> str:
  lines = []
  for s in scores:
    settings = ', '.join(f'{k}={v}' for k, v in s.items()
                         if k not in RESULT_FIELDS)
    se = s.get('stderr')
    se = f' ± {se:.3f}' if isinstance(se, float) and se == se else ''
    lines.append(f"{s['suite']:8s} {s['metric']:20s} {s['value']:.3f}{se}  n={s['n']:<5d} "
                 f"{settings}")
  return '\n'.join(lines)
