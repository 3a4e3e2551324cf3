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
                       batch_size: int = 16, keep_examples: int = 3,
                       runner: Runner | None = None) -> dict[str, Any]:
  """Accuracy overall and by position; `predictions` holds one record per example."""
  runner = runner or Runner(model, tokenizer, chat_format=chat_format, batch_size=batch_size,
                           verbose=False)
  rows, samples, all_scores, predictions = [], [], [], []
  for position in positions:
    t = make_task(task, tokenizer, **{**dict(task_fields), 'gold_position': position})
    examples = [t.example(seed, i) for i in range(per_position)]
    scores = []
    outputs = runner.generate([ex.prompt for ex in examples], max_new_tokens=max_new_tokens,
                              label=f'{task} position {position}')
    for ex, text in zip(examples, outputs):
      score = score_answer(text, ex)
      scores.append(score)
      predictions.append({'id': f'{seed}-{ex.index}', 'gold_position': position,
                          'gold_dict': ex.gold_dict, 'num_dicts': ex.num_dicts,
                          'prediction': text, 'answers': [ex.answer], 'score': float(score['all']),
                          'value_correct': score['value'], 'dict_correct': score['dict']})
      if len(samples) < keep_examples:
        samples.append({'position': position, 'answer': ex.answer, 'output': text})
    all_scores += scores
    rows.append({'position': position, 'n': len(scores),
                 'accuracy': float(np.mean([s['all'] for s in scores])),
                 'value_accuracy': float(np.mean([s['value'] for s in scores]))})
  return {'task': task, 'seed': seed, 'accuracy': float(np.mean([s['all'] for s in all_scores])),
          'value_accuracy': float(np.mean([s['value'] for s in all_scores])),
          'by_position': rows, 'samples': samples, 'predictions': predictions}


def format_table(result: dict[str, Any]) -> str:
  lines = ['| gold position | n | accuracy | value accuracy |', '|---|---|---|---|']
  for r in result['by_position']:
    lines.append(f"| {r['position']} | {r['n']} | {r['accuracy']:.3f} | {r['value_accuracy']:.3f} |")
  lines.append(f"| all | {sum(r['n'] for r in result['by_position'])} | "
               f"{result['accuracy']:.3f} | {result['value_accuracy']:.3f} |")
  return '\n'.join(lines)


def write(result: dict[str, Any], path_json: str, path_png: str | None = None) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path_json)), exist_ok=True)
  with open(path_json, 'w') as f:
    json.dump(result, f, indent=2)
  if path_png:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    xs = [float(r['position']) for r in result['by_position']]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(xs, [r['accuracy'] for r in result['by_position']], 'o-', label='value and dictionary')
    ax.plot(xs, [r['value_accuracy'] for r in result['by_position']], 's--', label='value')
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel('gold position (depth or index)')
    ax.set_ylabel('accuracy')
    ax.set_title(f"{result['task']}: held-out accuracy by gold position")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    plt.close(fig)
