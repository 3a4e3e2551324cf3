"""Needle in a haystack: one fact sentence inside filler text (a baseline of the paper).

The haystack is a sequence of filler units: real Wikipedia passages (the gold
passages of NaturalQuestions-Open shipped in data/lost-in-the-middle/, MIT licence;
`filler='nq'`) drawn in a per-example random order, or the classic passkey filler
sentence repeated (`filler='passkey'`). The needle, `The special magic number for
{key} is {value}.`, becomes one more unit at the gold position. Units are what
`gold_dict` and `num_dicts` count for this task.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from typing import Any

import numpy as np

from jaxlm.data import common
from jaxlm.data.common import Example, TaskConfigError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NQ_ORACLE = os.path.join(REPO_ROOT, 'data', 'lost-in-the-middle', 'nq-open-oracle.jsonl.gz')
PASSKEY_FILLER = ('The grass is green. The sky is blue. The sun is yellow. '
                  'Here we go. There and back again.')
_ADJECTIVES = ('amber', 'brave', 'calm', 'dusty', 'eager', 'fancy', 'gentle', 'hollow', 'icy',
               'jolly', 'keen', 'lucky', 'misty', 'noble', 'odd', 'proud', 'quiet', 'rapid',
               'silent', 'tidy', 'upbeat', 'vivid', 'witty', 'young', 'zesty', 'bold',
               'crisp', 'dark', 'early', 'fuzzy')
_NOUNS = ('falcon', 'harbor', 'lantern', 'meadow', 'otter', 'pebble', 'quartz', 'river',
          'saddle', 'thistle', 'umbrella', 'violin', 'walnut', 'yarrow', 'zephyr', 'anchor',
          'beacon', 'canyon', 'dune', 'ember', 'fjord', 'glacier', 'heron', 'island',
          'juniper', 'kettle', 'lagoon', 'maple', 'nectar', 'orchid')


@dataclasses.dataclass(frozen=True)
class NIAHConfig:
  num_tokens: int | None = 4000       # prompt token budget; or set num_units
  num_units: int | None = None        # filler units (plus the needle) when no budget is set
  filler: str = 'nq'                  # 'nq' (Wikipedia passages) | 'passkey'
  filler_path: str = NQ_ORACLE
  value_digits: tuple[int, int] = (7, 7)
  answer_template: bool = False
  gold_position: Any = 'uniform'      # 'uniform' | 1-based unit index | depth float | list


class NIAH:
  name = 'niah'

  def __init__(self, config: NIAHConfig, tokenizer=None):
    c = config
    self.config, self.tokenizer = c, tokenizer
    if (c.num_tokens is None) == (c.num_units is None):
      raise TaskConfigError(f'niah: set exactly one of num_tokens={c.num_tokens!r} and '
                            f'num_units={c.num_units!r}')
    if c.num_tokens is not None and tokenizer is None:
      raise TaskConfigError(f'niah: num_tokens={c.num_tokens} needs a tokenizer')
    if c.num_units is not None and (not isinstance(c.num_units, int) or c.num_units < 1):
      raise TaskConfigError(f'niah: num_units={c.num_units!r} must be a positive int')
    self.value_digits = common.check_digits('value_digits', c.value_digits)
    if c.filler == 'nq':
      if not os.path.exists(c.filler_path):
        raise TaskConfigError(f'niah: filler_path={c.filler_path!r} does not exist')
      with gzip.open(c.filler_path, 'rt') as f:
        self.units = [json.loads(line)['ctxs'][0]['text'].strip() for line in f]
      self.sep = '\n\n'
    elif c.filler == 'passkey':
      self.units = [PASSKEY_FILLER]
      self.sep = ' '
    else:
      raise TaskConfigError(f"niah: filler={c.filler!r} must be 'nq' or 'passkey'")
    self.gold_position = common.check_gold_position(c.gold_position, c.num_units)
    if tokenizer is not None:
      # Tokens a unit adds after another one, separator included, counted in context.
      x = self._count('x')
      self.unit_tokens = np.array([len(t) - x for t in tokenizer.encode_batch(
          ['x' + self.sep + u for u in self.units], bos=False)])
    if c.num_tokens is not None:
      worst = self._question(('zesty-umbrella', 10 ** self.value_digits[1] - 1))
      one = self._count(self._prompt([self._needle(('zesty-umbrella', 10 ** self.value_digits[1] - 1))], worst))
      if one > c.num_tokens:
        raise TaskConfigError(f'niah: num_tokens={c.num_tokens} is too small: the needle and '
                              f'question alone take {one} tokens')
      specs = self.gold_position if isinstance(self.gold_position, tuple) else (self.gold_position,)
      if any(isinstance(s, int) and s > 1 for s in specs):
        raise TaskConfigError('niah: with num_tokens use a depth in [0, 1] (a float) for '
                              f'gold_position, got {c.gold_position!r}')

  def _count(self, text):
    return len(self.tokenizer.encode(text, bos=False))

  def _needle(self, gold):
    return f'The special magic number for {gold[0]} is {gold[1]}.'

  def _prompt(self, units, question):
    return ('There is an important piece of information hidden inside the text below. '
            'Find it and memorize it.\n\n' + self.sep.join(units) + '\n\n' + question)

  def _question(self, gold):
    q = (f'What is the special magic number for {gold[0]} mentioned in the text above? '
         'Report the number.')
    if self.config.answer_template:
      q += (' Answer in the following template:\n'
            f'The special magic number for {gold[0]} is <fill-in-number>.')
    return q

  def example(self, seed: int, index: int) -> Example:
    c = self.config
    rng = common.example_rng(self.name, seed, index)
    key = f'{_ADJECTIVES[rng.integers(len(_ADJECTIVES))]}-{_NOUNS[rng.integers(len(_NOUNS))]}'
    gold = (key, int(common.sample_numbers(rng, self.value_digits, ())))
    needle, question = self._needle(gold), self._question(gold)
    order = rng.permutation(len(self.units))
    if c.num_units is not None:
      n = c.num_units
      filler = [self.units[order[i % len(order)]] for i in range(n - 1)]
    else:
      budget = c.num_tokens - self._count(self._prompt([needle], question))
      reps = 1 + int(budget // max(1, self.unit_tokens.min())) // len(order)
      idx = np.tile(order, reps)
      total = np.cumsum(self.unit_tokens[idx])
      n = 1 + int(np.searchsorted(total, budget, side='right'))
      filler = [self.units[i] for i in idx[:n - 1]]
    g = common.pick_gold_position(rng, self.gold_position, n, index)
    while True:
      units = filler[:g - 1] + [needle] + filler[g - 1:n - 1]
      prompt = self._prompt(units, question)
      ids = tuple(self.tokenizer.encode(prompt, bos=False)) if c.num_tokens is not None else None
      num_tokens = None if ids is None else len(ids)   # (kv.py)
      if c.num_tokens is None or num_tokens <= c.num_tokens or n == 1:
        break
      n -= 1
      g = min(g, n)
    return Example(task=self.name, prompt=prompt,
                   answer=f'The special magic number for {key} is {gold[1]}.',
                   gold_key=key, gold_value=gold[1], gold_dict=g, num_dicts=n,
                   position=common.relative_position(g, n), num_tokens=num_tokens,
                   seed=seed, index=index, prompt_ids=ids)
