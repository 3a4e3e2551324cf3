"""Answer normalization and the metrics of each suite, each as its reference defines it.

- `best_subspan_em` (Lost in the Middle, MDQA and its key-value task): 1 when any gold
  answer, normalized, is a substring of the normalized prediction. LitM scores only the
  prediction's first line (`first_line`), so a model cannot win by copying the context.
- `exact_match`: the SQuAD-normalized prediction equals a normalized alias (kept for
  callers; the general suites score as lm-evaluation-harness does, below).
- `lm_eval_exact_match`, `lm_eval_regex`, `remove_leading_space` (TriviaQA, NQ-Open, GSM8K):
  lm-evaluation-harness's `exact_match` metric (lm_eval/api/metrics.py, ported there from
  Hugging Face evaluate: drop each regex, then lowercase, then drop ASCII punctuation,
  then compare whole strings; any gold alias counts) and its `regex` / `remove_whitespace`
  filters (lm_eval/filters/extraction.py), with the task YAMLs' settings below.
- `gsm8k_number` / `gsm8k_gold`: the last number in a generation vs the `#### N` answer
  (an extraction of our own, kept for callers; GSM8K is scored with lm-eval's filters).
- `flenqa_category`: FLenQA's True/False reading of a response: normalize, read
  "not true" as false, and let the last of "true"/"false" decide; else 'other/refused'.

Normalization is SQuAD's: lowercase, drop punctuation, drop the articles a/an/the,
collapse whitespace.
"""

from __future__ import annotations

import re
import string
import unicodedata
from typing import Iterable

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r'\b(a|an|the)\b')


def normalize_answer(s: str) -> str:
  s = str(s).lower()
  s = ''.join(ch for ch in s if ch not in _PUNCT)
  s = _ARTICLES.sub(' ', s)
  return ' '.join(s.split())


def first_line(prediction: str) -> str:
  return prediction.split('\n')[0].strip()


def best_subspan_em(prediction: str, answers: Iterable[str]) -> float:
  pred = normalize_answer(prediction)
  return float(any(normalize_answer(a) in pred for a in answers))


def exact_match(prediction: str, answers: Iterable[str]) -> float:
  pred = normalize_answer(prediction)
  return float(any(normalize_answer(a) == pred for a in answers))


_NUMBER = re.compile(r'-?[$]?\d[\d,]*(?:\.\d+)?')


def _clean_number(s: str) -> str | None:
  s = s.replace('$', '').replace(',', '').strip()
  if not s or s in ('-', '.'):
    return None
  try:
    x = float(s)
  except ValueError:
    return None
  return str(int(x)) if x == int(x) else repr(x)


# lm-evaluation-harness task settings (lm_eval/tasks/gsm8k/gsm8k.yaml, nq_open/nq_open.yaml,
# triviaqa/default.yaml)
GSM8K_STRICT = r'#### (\-?[0-9\.\,]+)'                 # filter "strict-match"
GSM8K_FLEXIBLE = r'(-?[$0-9.,]{2,})|(-?[0-9]+)'          # "flexible-extract", last match
GSM8K_IGNORE = (',', r'\$', '(?s).*#### ', r'\.$')      # exact_match regexes_to_ignore
NQ_OPEN_IGNORE = (r'\b(?:The |the |An |A |The |a |an )',)
INVALID = '[invalid]'                                    # the regex filter's fallback


def lm_eval_exact_match(prediction: str, references: Iterable[str], *,
                        regexes_to_ignore: Iterable[str] = (), ignore_case: bool = False,
                        ignore_punctuation: bool = False) -> float:
  """1.0 when the prediction equals any reference after lm-eval's exact_match processing."""
  def prep(s: str) -> str:
    for r in regexes_to_ignore:
      s = re.sub(r, '', s)
    if ignore_case:
      s = s.lower()
    if ignore_punctuation:
      s = s.translate(str.maketrans('', '', string.punctuation))
    return s
  pred = prep(str(prediction))
  return float(any(prep(str(r)) == pred for r in references))


def lm_eval_regex(text: str, pattern: str, group_select: int = 0,
                  fallback: str = INVALID) -> str:
  """lm-eval's `regex` filter: the group_select-th of all matches (for a pattern with
  several groups, its first non-empty group), stripped; the fallback when none."""
  found = re.findall(pattern, text)
  if not found:
    return fallback
  m = found[group_select]
  if isinstance(m, tuple):
    m = [g for g in m if g][0]
  return m.strip()


def remove_leading_space(text: str) -> str:
  """lm-eval's `remove_whitespace` filter: one leading space, if there is one."""
  return text[1:] if text.startswith(' ') else text


def gsm8k_gold(answer: str) -> str:
  """The number after '####' in a GSM8K answer field."""
  if '####' not in answer:
    raise ValueError(f"GSM8K answer has no '####' line: {answer[-80:]!r}")
  n = _clean_number(answer.split('####')[-1])
  if n is None:
    raise ValueError(f"GSM8K answer after '####' is not a number: {answer[-80:]!r}")
  return n


def gsm8k_number(prediction: str) -> str | None:
  """The answer a generation gives: after 'The answer is' when present, else its last number."""
  m = re.search(r'answer is\s*:?\s*(' + _NUMBER.pattern + ')', prediction, re.IGNORECASE)
  if m:
    return _clean_number(m.group(1))
  numbers = _NUMBER.findall(prediction)
  return _clean_number(numbers[-1]) if numbers else None


def flenqa_category(response: str) -> str:
  s = normalize_answer(unicodedata.normalize('NFKC', response)).replace('not true', 'false')
  t, f = s.rfind('true'), s.rfind('false')
  if t > f:
    return 'true'
  if f > t:
    return 'false'
  return 'other/refused'


def flenqa_correct(response: str, label) -> bool:
  gold = str(label).strip().lower()
  if gold not in ('true', 'false'):
    raise ValueError(f'FLenQA label must be True or False, got {label!r}')
  return flenqa_category(response) == gold
