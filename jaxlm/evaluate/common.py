"""What every suite shares: its options, reading data files with line-numbered errors,
and the shape of its output (score rows and prediction records)."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any, Iterator

from jaxlm.tokenizer import REPO_ROOT

DATA = os.path.join(REPO_ROOT, 'data')
SAMPLES = os.path.join(DATA, 'samples', 'eval')   # hand-made records, for tests only


class DataError(ValueError):
  """A data file that cannot be read: names the file, the line and the problem."""


@dataclasses.dataclass
class Options:
  data: dict[str, str] = dataclasses.field(default_factory=dict)   # suite or benchmark -> path
  positions: list[int] | None = None     # gold positions (1-based) for mdqa, litm_kv, kv
  num_examples: int | None = None        # per setting (position, length, ...); None: all
  num_docs: list[int] = dataclasses.field(default_factory=lambda: [10, 20, 30])
  kv_lengths: list[int] = dataclasses.field(default_factory=lambda: [4])   # num_dicts values
  kv_task: str = 'simple_kv'
  kv_fields: dict[str, Any] = dataclasses.field(default_factory=dict)
  cot: list[bool] = dataclasses.field(default_factory=lambda: [False, True])
  shots: int | None = None               # None: each benchmark's default
  max_new_tokens: int | None = None      # None: each suite's default
  seed: int = 0
  chat_template: bool = False            # general suites: wrap prompts in the chat format
                                         # (lm-eval's default, False: raw prompt, no bos)

  def path(self, name: str, default: str) -> str:
    p = self.data.get(name, default)
    if not os.path.exists(p):
      raise DataError(f'{name}: data file {p!r} does not exist')
    return p


@dataclasses.dataclass
class SuiteResult:
  scores: list[dict[str, Any]]           # {'suite', 'metric', 'value', 'n', ...settings}
  predictions: list[dict[str, Any]]      # {'id', 'gold_position', 'prediction', 'answers', 'score', ...}
  notes: list[str] = dataclasses.field(default_factory=list)
  plots: dict[str, Any] = dataclasses.field(default_factory=dict)


def _open(path: str):
  return gzip.open(path, 'rt', encoding='utf-8') if path.endswith('.gz') else open(
      path, encoding='utf-8')


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> Iterator[tuple[int, dict]]:
  """(line number, record) for each non-blank line; a malformed line or a record missing a
  required field raises DataError naming the file and line."""
  if not os.path.exists(path):
    raise DataError(f'data file {path!r} does not exist')
  with _open(path) as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})') from e
      if not isinstance(rec, dict):
        raise DataError(f'{path}:{lineno}: expected a JSON object, got {type(rec).__name__}')
      missing = [k for k in required if k not in rec]
      if missing:
        raise DataError(f'{path}:{lineno}: missing field(s) {missing}; has {sorted(rec)}')
      yield lineno, rec


def take(items: list, n: int | None) -> list:
  return items if n is None else items[:n]


def mean(xs) -> float:
  xs = list(xs)
  return float(sum(xs) / len(xs)) if xs else float('nan')


def stderr(xs) -> float:
  """Standard error of the mean: sample standard deviation / sqrt(n) (for 0/1 scores,
  close to the binomial sqrt(p(1-p)/n)); nan below two values."""
  xs = [float(x) for x in xs]
  n = len(xs)
  if n < 2:
    return float('nan')
  m = sum(xs) / n
  return float((sum((x - m) ** 2 for x in xs) / (n - 1) / n) ** 0.5)


# score fields that are not settings (the rest name the row: variant, num_docs, ...)
RESULT_FIELDS = ('suite', 'metric', 'value', 'n', 'stderr', 'data', 'source')


def score_row(suite: str, metric: str, values: list[float], **settings) -> dict[str, Any]:
  """One result: the mean of per-example `values`, their number and its standard error."""
  return {'suite': suite, 'metric': metric, 'value': mean(values), 'n': len(values),
          'stderr': stderr(values), **settings}
