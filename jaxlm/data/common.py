"""What every task generator shares: the example record, index-seeded randomness,
number sampling, gold-position rules and token-budget fitting.

Generators are pure functions of (config, seed, index): each example draws from its
own `numpy.random.Generator` seeded with (seed, index), so any example can be
regenerated alone, in any process, in any order.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Sequence

import numpy as np


class TaskConfigError(ValueError):
  """An impossible task setting; the message names the field and the value."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One generated retrieval example.

  gold_dict is the 1-based index of the unit holding the answer as printed in the
  prompt (a dictionary; for `niah`, the filler passage the needle follows), num_dicts
  the number of such units, position the gold unit's relative depth in [0, 1].
  num_tokens counts the prompt's tokens (no bos, no chat formatting) under the
  task's tokenizer when the task has a token budget (`num_tokens`), and is None
  otherwise. prompt_ids holds those counted tokens (None without a budget), so that the
  pipeline does not tokenize the prompt again (jaxlm.chat.prompt_ids); it is not part
  of the example's record (`to_dict`) and not compared.
  """
  task: str
  prompt: str
  answer: str
  gold_key: Any
  gold_value: int
  gold_dict: int
  num_dicts: int
  position: float
  num_tokens: int | None
  seed: int
  index: int
  prompt_ids: tuple[int, ...] | None = dataclasses.field(default=None, repr=False,
                                                         compare=False)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    del d['prompt_ids']
    return d


def example_rng(task: str, seed: int, index: int, attempt: int = 0) -> np.random.Generator:
  """The generator for one example: independent streams for every (task, seed, index)."""
  if seed < 0 or index < 0:
    raise ValueError(f'seed and index must be non-negative, got seed={seed}, index={index}')
  return np.random.default_rng([zlib.crc32(task.encode()), seed, index, attempt])


def digit_range_size(digits: tuple[int, int]) -> int:
  """How many distinct integers have a digit count in [digits[0], digits[1]]."""
  return sum(9 * 10 ** (d - 1) for d in range(digits[0], digits[1] + 1))


def sample_numbers(rng: np.random.Generator, digits: tuple[int, int], size) -> np.ndarray:
  """Draw a digit count uniformly from the range, then a number uniformly with that
  many digits (the paper's scheme: 3- and 4-digit numbers are equally likely)."""
  if digits[0] == digits[1]:   # the same draws (a one-value range uses no bits), 2x faster
    return rng.integers(10 ** (digits[0] - 1), 10 ** digits[0], size=size, dtype=np.int64)
  d = rng.integers(digits[0], digits[1] + 1, size=size)
  return rng.integers(10 ** (d - 1), 10 ** d).astype(np.int64)


def check_digits(name: str, digits) -> tuple[int, int]:
  try:
    lo, hi = (int(x) for x in digits)
  except (TypeError, ValueError):
    raise TaskConfigError(f'{name}={digits!r} must be a (min, max) pair of digit counts') from None
  if not 1 <= lo <= hi <= 18:
    raise TaskConfigError(f'{name}={digits!r} must satisfy 1 <= min <= max <= 18')
  return lo, hi


def check_range(name: str, value, minimum: int = 1) -> tuple[int, int]:
  try:
    lo, hi = (int(x) for x in value)
  except (TypeError, ValueError):
    raise TaskConfigError(f'{name}={value!r} must be a (min, max) pair') from None
  if not minimum <= lo <= hi:
    raise TaskConfigError(f'{name}={value!r} must satisfy {minimum} <= min <= max')
  return lo, hi


# ----------------------------------------------------------------------------- positions


def check_gold_position(spec, num_units: int | None, field: str = 'gold_position'):
  """Validate a gold-position spec: 'uniform', a 1-based index, a depth in [0, 1]
  (a float), or a list of those cycled over example indices."""
  specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
  if not specs:
    raise TaskConfigError(f'{field}={spec!r} is an empty list')
  for s in specs:
    if isinstance(s, str):
      if s != 'uniform':
        raise TaskConfigError(f"{field}={s!r}: use 'uniform', a 1-based index or a depth in [0, 1]")
    elif isinstance(s, (bool, np.bool_)):
      raise TaskConfigError(f'{field}={s!r} is not a position')
    elif isinstance(s, (int, np.integer)):
      if s < 1 or (num_units is not None and s > num_units):
        raise TaskConfigError(
            f'{field}={s} is outside the dictionaries: there are '
            f'{num_units if num_units is not None else "at least 1"} (1-based)')
    elif isinstance(s, float):
      if not 0.0 <= s <= 1.0:
        raise TaskConfigError(f'{field}={s} must be a depth in [0, 1]')
    else:
      raise TaskConfigError(f'{field}={s!r} is not a position')
  return tuple(specs) if len(specs) > 1 else specs[0]


def pick_gold_position(rng: np.random.Generator, spec, n: int, index: int,
                       first_prob: float = 0.0, early_prob: float = 0.0,
                       early_max: int = 1) -> int:
  """1-based gold index among n units. In 'uniform' mode the paper's quirk is
  reproducible: with first_prob the gold goes to unit 1, with early_prob to a
  uniform index in 1..early_max."""
  if isinstance(spec, tuple):
    spec = spec[index % len(spec)]
  if isinstance(spec, str):
    u = rng.random()
    if u < first_prob:
      return 1
    if u < first_prob + early_prob:
      return int(rng.integers(1, min(early_max, n) + 1))
    return int(rng.integers(1, n + 1))
  if isinstance(spec, float):
    return 1 + int(round(spec * (n - 1)))
  return min(int(spec), n)


def relative_position(gold: int, n: int) -> float:
  return 0.0 if n == 1 else (gold - 1) / (n - 1)


# ----------------------------------------------------------------------------- budgets


def fit_units(count_tokens: Callable[[int], int], budget: int, lower: int, upper: int) -> int:
  """Largest n in [lower, upper] with count_tokens(n) <= budget (count is increasing in n).
  Returns lower - 1 when even `lower` units exceed the budget."""
  if count_tokens(lower) > budget:
    return lower - 1
  lo, hi = lower, upper
  while lo < hi:
    mid = (lo + hi + 1) // 2
    if count_tokens(mid) <= budget:
      lo = mid
    else:
      hi = mid - 1
  return lo


def parse_scalar(text: str):
  """CLI value -> int, float, bool, None, tuple or str."""
  text = text.strip()
  if ',' in text:
    return tuple(parse_scalar(t) for t in text.split(',') if t.strip())
  if text.lower() in ('none', 'null'):
    return None
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text


def replace_fields(config, overrides: dict[str, Any]):
  """dataclasses.replace that names unknown fields."""
  fields = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise TaskConfigError(f'unknown field(s) {unknown} for {type(config).__name__}; '
                          f'valid fields: {sorted(fields)}')
  return dataclasses.replace(config, **overrides)


def join_numbers(values: Sequence[int]) -> str:
  return ', '.join(str(int(v)) for v in values)
