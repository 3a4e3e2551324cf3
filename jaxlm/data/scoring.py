"""Parse a model's answer to a retrieval task and score its parts separately.

Answers may follow the template (`The value of key 922 is 2494 and it is in
Dictionary [1].`) or be free-form (`2494, in Dictionary [1]`, `The value is 2494.`).
The value and the dictionary index are scored separately, as in the paper; for
`multisubkey_kv` the reported key is scored too.
"""

from __future__ import annotations

import re
from typing import Any

_DICT = re.compile(r'dictionary\s*\[?\s*(\d+)\s*\]?', re.IGNORECASE)
_TUPLE = re.compile(r'\(\s*(\d+(?:\s*,\s*\d+)+)\s*\)')
_TEMPLATE = re.compile(r'value of key\s*(?:\(\s*[\d,\s]+\)|-?\d+)\s*is\s*:?\s*(-?\d+)\b',
                       re.IGNORECASE)
_INT = re.compile(r'(?<![\d.])-?\d+(?![\d])')


def _ints(text: str) -> list[int]:
  return [int(m) for m in _INT.findall(text)]


def parse_answer(text: str, task: str, gold_key: Any = None) -> dict[str, Any]:
  """Pull {'value', 'dict', 'key'} out of a model's answer; None where absent.

  gold_key lets free-form answers that repeat the question's key (or subkeys) be read:
  those numbers are not taken for the value.
  """
  out: dict[str, Any] = {'value': None, 'dict': None, 'key': None}
  m = _DICT.search(text)
  if m:
    out['dict'] = int(m.group(1))
  rest = _DICT.sub(' ', text)
  # The template states the key, so its value is read as is (it may equal the key).
  template = _TEMPLATE.search(rest)
  if task == 'multisubkey_kv':
    t = _TUPLE.search(rest)
    if t:
      out['key'] = [int(x) for x in t.group(1).split(',')]
      rest = rest[:t.start()] + ' ' + rest[t.end():]
    excluded = set(gold_key or [])
  elif task == 'simple_kv':
    excluded = {int(gold_key)} if gold_key is not None else set()
  else:
    excluded = set()
  if template:
    out['value'] = int(template.group(1))
    return out
  # Prefer "... is N" / "value is N"; otherwise the first other integer.
  for m in re.finditer(r'\bis\s*:?\s*(-?\d+)\b', rest):
    if int(m.group(1)) not in excluded:
      out['value'] = int(m.group(1))
      break
  else:
    if task == 'multisubkey_kv':   # drop "the integers a, b, c" listings
      rest = re.sub(r'integers\s+[\d,\s]+', ' ', rest)
    candidates = [x for x in _ints(rest) if x not in excluded]
    if candidates:
      out['value'] = candidates[0]
  return out


def score_answer(text: str, example) -> dict[str, bool | None]:
  """Score `text` against an Example (or its dict): value, dict, key (None where the
  task has no such part) and `all` (every part present in the task is right)."""
  ex = example if isinstance(example, dict) else example.to_dict()
  parsed = parse_answer(text, ex['task'], ex['gold_key'])
  scores = {'value': parsed['value'] == ex['gold_value'], 'dict': None, 'key': None}
  if ex['task'] in ('simple_kv', 'multisubkey_kv'):
    scores['dict'] = parsed['dict'] == ex['gold_dict']
  if ex['task'] == 'multisubkey_kv':
    scores['key'] = parsed['key'] == list(ex['gold_key'])
  scores['all'] = all(v for v in scores.values() if v is not None)
  return scores
