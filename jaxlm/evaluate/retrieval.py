"""Retrieval accuracy by gold position on held-out generated examples.

For each gold position (a depth in [0, 1] or a 1-based index), generate examples with a
seed the training data does not use, decode the answer greedily with the KV cache, and
score value and dictionary separately (`jaxlm.data.scoring`). Accuracy counts an example
correct when every part of its answer is right.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

from jaxlm.evaluate.runner import Runner
from jaxlm.data.scoring import score_answer
from jaxlm.data.tasks import make_task


def evaluate_retrieval(model, tokenizer, task: str, task_fields: dict[str, Any], *,
                       positions: Sequence, per_position: int, seed: int,
                       chat_format: str = 'mistral', max_new_tokens: int = 32,
                       batch_size: int = 16, keep_examples: int = 3, verbose: bool = False,
                       runner: Runner | None = None) -> dict[str, Any]:
  """Accuracy overall and by position; `predictions` holds one record per example."""
  runner = runner or Runner(model, tokenizer, chat_format=chat_format, batch_size=batch_size,
                           verbose=verbose)
  tasks = {p: make_task(task, tokenizer, **{**dict(task_fields), 'gold_position': p})
           for p in positions}
  examples = [(p, tasks[p].example(seed, i)) for p in positions for i in range(per_position)]
  # One generate call for every position: the runner batches prompts of similar length
  # together, so batches are full and padded little.
  ids = [ex.prompt_ids for _, ex in examples]   # counted under a token budget, or None
  outputs = runner.generate([ex.prompt for _, ex in examples], max_new_tokens=max_new_tokens,
                            label=f'{task} positions {list(positions)}',
                            **({'prompt_ids': ids} if any(i is not None for i in ids) else {}))
  rows, samples, all_scores, predictions = [], [], [], []
  for position in positions:
    scores = []
    for (p, ex), text in zip(examples, outputs):
      if p != position:
        continue
      score = score_answer(text, ex)
      scores.append(score)
      predictions.append({'id': f'{seed}-{ex.index}', 'gold_position': position,
                          'gold_dict': ex.gold_dict, 'num_dicts': ex.num_dicts,
                          'prediction': text, 'answers': [ex.answer], 'score': float(score['all']),
                          'value_correct': score['value'], 'dict_correct': score['dict'],
                          'prompt': runner.render(ex.prompt)})
      if len(samples) < keep_examples:
        samples.append({'position': position, 'answer': ex.answer, 'output': text})
    all_scores += scores
    rows.append({'position': position, 'n': len(scores), **_rates(scores)})
  return {'task': task, 'seed': seed, **_rates(all_scores),
          'by_position': rows, 'samples': samples, 'predictions': predictions}


def _rates(scores: list[dict[str, Any]]) -> dict[str, float]:
  """accuracy (every part right), value_accuracy and, where scored, dict_accuracy."""
  out = {'accuracy': float(np.mean([s['all'] for s in scores])),
         'value_accuracy': float(np.mean([s['value'] for s in scores]))}
  if scores and scores[0].get('dict') is not None:
    out['dict_accuracy'] = float(np.mean([s['dict'] for s in scores]))
  return out


_METRICS = (('accuracy', 'both'), ('value_accuracy', 'value'), ('dict_accuracy', 'dictionary'))


def format_table(result: dict[str, Any], before: dict[str, Any] | None = None) -> str:
  """Markdown table of accuracy by gold position; with `before` (the same evaluation of
  the model before fine-tuning), each metric as `before -> after`."""
  metrics = [(k, name) for k, name in _METRICS if k in result]
  cell = lambda b, a, k: (f'{b[k]:.3f} -> {a[k]:.3f}' if b is not None and k in b
                          else f'{a[k]:.3f}')
  head = ' | '.join(name for _, name in metrics)
  lines = [f'| gold position | n | {head} |', '|---|---|' + '---|' * len(metrics)]
  rows_before = {str(r['position']): r for r in (before or {}).get('by_position', [])}
  for r in result['by_position']:
    b = rows_before.get(str(r['position'])) if before is not None else None
    lines.append(f"| {r['position']} | {r['n']} | "
                 + ' | '.join(cell(b, r, k) for k, _ in metrics) + ' |')
  n = sum(r['n'] for r in result['by_position'])
  lines.append(f'| all | {n} | ' + ' | '.join(cell(before, result, k) for k, _ in metrics)
               + ' |')
  if before is not None:
    lines.insert(0, 'held-out accuracy, before -> after fine-tuning:')
  return '\n'.join(lines)


def write(result: dict[str, Any], path_json: str, path_png: str | None = None) -> None:
  """The result as JSON, and a plot of accuracy by gold position (with the curves of
  `result['before']`, the base model, when present)."""
  os.makedirs(os.path.dirname(os.path.abspath(path_json)), exist_ok=True)
  with open(path_json, 'w') as f:
    json.dump(result, f, indent=2)
  if path_png:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    curves = [('after', result, '-')] if result.get('before') else [('', result, '-')]
    if result.get('before'):
      curves.append(('before', result['before'], ':'))
    for label, res, style in curves:
      xs = [float(r['position']) for r in res['by_position']]
      for (key, name), marker, color in zip(_METRICS, 'osd', ('C0', 'C1', 'C2')):
        if key in res:
          ax.plot(xs, [r[key] for r in res['by_position']], marker + style, color=color,
                  label=f'{label} {name}'.strip())
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('gold position (depth or index)')
    ax.set_ylabel('accuracy')
    task = result['task']['name'] if isinstance(result['task'], dict) else result['task']
    ax.set_title(f'{task}: held-out accuracy by gold position', fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
