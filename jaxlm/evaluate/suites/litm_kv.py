"""Lost in the Middle's key-value retrieval: UUID pairs as a JSON object, one key asked.

A transfer test: our models are fine-tuned on numeric dictionaries, never on this format.
Records follow nelson-liu/lost-in-the-middle's kv_retrieval_data: `ordered_kv_records`
(a list of [key, value]), `key`, `value`. The gold pair is moved to each requested
position (its make_kv_retrieval_data.py does the same with --gold-index); the records are
rendered as in its get_kv_retrieval_prompt; the score is its scripts/evaluate_kv_responses.py
`accuracy`: 1 when the value occurs anywhere in the whole generation, case ignored.
"""

from __future__ import annotations

import os

from jaxlm.evaluate.common import DATA, DataError, Options, SuiteResult, read_jsonl, score_row, take
from jaxlm.evaluate.suites.mdqa import template

DEFAULT_DATA = os.path.join(DATA, 'lost-in-the-middle', 'kv-retrieval-75_keys.jsonl.gz')
MAX_NEW_TOKENS = 100


def kv_accuracy(output: str, value: str) -> float:
  """Lost in the Middle's kv accuracy: value.lower() in output.lower()."""
  return float(value.lower() in output.lower())


def render_records(pairs: list[tuple[str, str]]) -> str:
  lines = [f'"{k}": "{v}"' for k, v in pairs]
  return '{' + ',\n '.join(lines) + '}'


def kv_prompt(pairs: list[tuple[str, str]], key: str) -> str:
  return template('kv_retrieval.prompt').format(formatted_kv_records=render_records(pairs), key=key)


def load(path: str) -> list[dict]:
  out = []
  for lineno, rec in read_jsonl(path, ('ordered_kv_records', 'key', 'value')):
    pairs = [tuple(p) for p in rec['ordered_kv_records']]
    if any(len(p) != 2 for p in pairs):
      raise DataError(f'{path}:{lineno}: ordered_kv_records must be [key, value] pairs')
    gold = [i for i, (k, _) in enumerate(pairs) if k == rec['key']]
    if len(gold) != 1 or pairs[gold[0]][1] != rec['value']:
      raise DataError(f'{path}:{lineno}: key {rec["key"]!r} must occur once, with value '
                      f'{rec["value"]!r}, in ordered_kv_records (found it {len(gold)} times)')
    others = pairs[:gold[0]] + pairs[gold[0] + 1:]
    out.append({'id': f'{os.path.basename(path)}:{lineno}', 'key': rec['key'],
                'value': rec['value'], 'others': others})
  if not out:
    raise DataError(f'{path}: no records')
  return out


def settings(opts: Options) -> tuple[str, list[dict], int, list[int]]:
  """(path, records, pairs per record, positions), checked against the data."""
  path = opts.path('litm_kv', DEFAULT_DATA)
  records = take(load(path), opts.num_examples)
  n = len(records[0]['others']) + 1
  if any(len(r['others']) + 1 != n for r in records):
    raise DataError(f'{path}: records have different numbers of pairs')
  positions = opts.positions or sorted({1, n // 4, n // 2, 3 * n // 4, n} - {0})
  bad = [p for p in positions if not 1 <= p <= n]
  if bad:
    raise ValueError(f'--positions {bad} are outside 1..{n} for {n} key-value pairs')
  return path, records, n, positions


def check(opts: Options) -> None:
  settings(opts)


def run(runner, opts: Options) -> SuiteResult:
  path, records, n, positions = settings(opts)
  scores, preds = [], []
  for p in positions:
    prompts = [kv_prompt(r['others'][:p - 1] + [(r['key'], r['value'])] + r['others'][p - 1:],
                         r['key']) for r in records]
    outs = runner.generate(prompts, max_new_tokens=opts.max_new_tokens or MAX_NEW_TOKENS,
                           label=f'litm_kv {n} pairs, gold at {p}')
    vals = []
    for r, out, prompt in zip(records, outs, prompts):
      v = kv_accuracy(out, r['value'])
      vals.append(v)
      preds.append({'id': r['id'], 'gold_position': p, 'num_pairs': n, 'prediction': out,
                    'answers': [r['value']], 'score': v, 'prompt': runner.render(prompt)})
    scores.append(score_row('litm_kv', 'accuracy', vals, data=path, num_pairs=n,
                            gold_position=p))
  return SuiteResult(scores, preds)
