"""Dictionary key-value retrieval, the paper's synthetic tasks.

`simple_kv` (Xiong et al. 2024, the Mistral 7B fine-tuning data): a list of
dictionaries of integers, `Dictionary [2] {2031: 681, 922: 2494, 2786: 5769}`, one
line each; the question asks for the value of one key and the dictionary it is in.
The gold dictionary holds exactly `gold_dict_size` pairs with the gold pair at a
random slot; the others hold a random number of pairs in `keys_per_dict`. The gold
key and the gold value each occur exactly once in the prompt; other keys may repeat
across dictionaries (never within one) unless `unique_keys='all'`.

`multisubkey_kv` (the GPT-3.5 Turbo data): keys are tuples of integers; distractor
keys share some, never all, of the gold key's subkeys; the question lists the gold
subkeys in shuffled order.

`num_dicts` may be a (min, max) range: each example draws its count (easy and hard
examples mixed).

Lengths: `num_dicts` fixes the number of dictionaries; `num_tokens` alone fills the
prompt with as many dictionaries as fit the token budget; both together keep
`num_dicts` and redraw the example until the prompt fits (the paper's set-up: 85
dictionaries, rebuilt until under 3996 tokens).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxlm.data import common
from jaxlm.data.common import Example, TaskConfigError

PREFIX = 'Do a task using the list of dictionaries below.\n\n'


@dataclasses.dataclass(frozen=True)
class SimpleKVConfig:
  num_dicts: Any = 85                 # an int, a (min, max) range drawn per example, or None
  num_tokens: int | None = None       # prompt token budget (no bos, no chat format)
  keys_per_dict: tuple[int, int] = (3, 4)
  gold_dict_size: int = 3
  key_digits: tuple[int, int] = (3, 4)
  value_digits: tuple[int, int] = (3, 4)
  unique_keys: str = 'gold'           # 'gold': only the gold key is unique; 'all': every key
  answer_template: bool = False
  gold_position: Any = 'uniform'      # 'uniform' | 1-based index | depth float | list
  first_position_prob: float = 0.05   # paper quirk ('uniform' only): 5% at Dictionary [1]
  early_position_prob: float = 0.03   # ... and 3% uniform over the first early_position_max
  early_position_max: int = 17
  max_attempts: int = 100             # redraws when num_dicts and num_tokens are both set


@dataclasses.dataclass(frozen=True)
class MultiSubkeyKVConfig:
  num_dicts: Any = 49
  num_tokens: int | None = None
  keys_per_dict: tuple[int, int] = (3, 4)
  gold_dict_size: int = 3
  subkeys_per_key: int = 3
  subkey_digits: tuple[int, int] = (3, 3)
  value_digits: tuple[int, int] = (4, 4)
  share_prob: float = 0.5             # chance a distractor key shares subkeys with the gold key
  shared_subkeys: tuple[int, int] = (1, 2)   # how many it shares (always fewer than all)
  answer_template: bool = False
  gold_position: Any = 'uniform'
  first_position_prob: float = 0.0
  early_position_prob: float = 0.0
  early_position_max: int = 1
  max_attempts: int = 100


class _DictTask:
  """Shared machinery: validation, drawing dictionaries, fitting a token budget."""
  name: str

  def __init__(self, config, tokenizer=None):
    c = config
    self.dict_range = None
    if isinstance(c.num_dicts, (tuple, list)):
      # A (min, max) range: each example draws its count (easy and hard examples mixed).
      self.dict_range = common.check_range('num_dicts', c.num_dicts)
      c = dataclasses.replace(c, num_dicts=self.dict_range[1])  # checks use the largest
      positions = c.gold_position if isinstance(c.gold_position, (tuple, list)) else [c.gold_position]
      if any(isinstance(p, int) and p > self.dict_range[0] for p in positions):
        raise TaskConfigError(f'gold_position={c.gold_position!r} may be outside the '
                              f'dictionaries when num_dicts={tuple(self.dict_range)}; use '
                              f'indices <= {self.dict_range[0]} or depths in [0, 1]')
    self.config, self.tokenizer = c, tokenizer
    if c.num_dicts is None and c.num_tokens is None:
      raise TaskConfigError(f'{self.name}: set num_dicts, num_tokens or both (both are None)')
    if c.num_dicts is not None and (not isinstance(c.num_dicts, int) or c.num_dicts < 1):
      raise TaskConfigError(f'{self.name}: num_dicts={c.num_dicts!r} must be a positive int')
    if c.num_tokens is not None:
      if tokenizer is None:
        raise TaskConfigError(f'{self.name}: num_tokens={c.num_tokens} needs a tokenizer')
      if not isinstance(c.num_tokens, int) or c.num_tokens < 1:
        raise TaskConfigError(f'{self.name}: num_tokens={c.num_tokens!r} must be a positive int')
    self.keys_per_dict = common.check_range('keys_per_dict', c.keys_per_dict)
    if not 1 <= c.gold_dict_size:
      raise TaskConfigError(f'gold_dict_size={c.gold_dict_size} must be at least 1')
    for name in ('first_position_prob', 'early_position_prob'):
      if not 0 <= getattr(c, name) <= 1:
        raise TaskConfigError(f'{name}={getattr(c, name)} must be a probability')
    self._validate()
    self.gold_position = common.check_gold_position(c.gold_position, c.num_dicts)
    if c.num_tokens is not None:
      self._check_budget()

  def max_dicts(self, index: int) -> int:
    """The largest num_dicts example `index` may draw from a num_dicts range (a subclass
    may vary it with the index)."""
    return self.dict_range[1]

  # --- per-task hooks -------------------------------------------------------------------
  def _validate(self): ...
  def _draw_gold(self, rng): ...
  def _draw_dicts(self, rng, sizes, gold, used): ...  # used: keys drawn before
  def _render_pairs(self, keys, values) -> str: ...
  def _question(self, gold) -> str: ...
  def _answer(self, gold, gold_dict: int) -> str: ...
  def _worst_pairs(self, size: int) -> str: ...   # longest rendering of `size` pairs
  def _best_pairs(self, size: int) -> str: ...    # shortest rendering
  def _worst_gold(self): ...
  def _key_json(self, gold): ...

  # --- shared ---------------------------------------------------------------------------
  def _ids(self, text: str) -> tuple[int, ...]:
    return tuple(self.tokenizer.encode(text, bos=False))

  def _count(self, text: str) -> int:
    return len(self._ids(text))

  def _check_budget(self):
    """Fail at config time when no prompt can fit, or a fixed gold index may not exist."""
    c = self.config
    worst_gold = f'Dictionary [1] {{{self._worst_pairs(c.gold_dict_size)}}}'
    one = self._count(self._prompt_text([worst_gold], self._worst_question()))
    if one > c.num_tokens:
      raise TaskConfigError(
          f'{self.name}: num_tokens={c.num_tokens} is too small: a prompt with one dictionary '
          f'already takes up to {one} tokens')
    worst_line = self._count('\n' + f'Dictionary [{10 ** 6}] {{'
                             f'{self._worst_pairs(self.keys_per_dict[1])}}}')
    guaranteed = 1 + (c.num_tokens - one) // worst_line
    if c.num_dicts is not None:
      # The shortest possible prompt must fit, or no redraw ever will.
      best = self._count(self._prompt_text(
          [f'Dictionary [1] {{{self._best_pairs(c.gold_dict_size)}}}'] +
          [f'Dictionary [1] {{{self._best_pairs(self.keys_per_dict[0])}}}'] * (c.num_dicts - 1),
          self._worst_question()))
      if best > c.num_tokens:
        raise TaskConfigError(
            f'{self.name}: num_tokens={c.num_tokens} cannot hold num_dicts={c.num_dicts}: '
            f'even the shortest such prompt takes {best} tokens')
    else:
      specs = self.gold_position if isinstance(self.gold_position, tuple) else (self.gold_position,)
      for s in specs:
        if isinstance(s, int) and s > guaranteed:
          raise TaskConfigError(
              f'{self.name}: gold_position={s} may be outside the dictionaries: '
              f'num_tokens={c.num_tokens} guarantees only {guaranteed} dictionaries; '
              f'use a depth in [0, 1] (a float) with token budgets')

  def _worst_question(self):
    return self._question(self._worst_gold())

  def _prompt_text(self, lines: list[str], question: str) -> str:
    return PREFIX + '\n'.join(lines) + '\n\n' + question

  def _sizes(self, rng, n_distractors):
    return rng.integers(self.keys_per_dict[0], self.keys_per_dict[1] + 1, n_distractors)

  def example(self, seed: int, index: int) -> Example:
    c = self.config
    if c.num_tokens is not None and c.num_dicts is not None:
      for attempt in range(c.max_attempts):
        ex = self._build(common.example_rng(self.name, seed, index, attempt), seed, index, c.num_dicts)
        if ex.num_tokens <= c.num_tokens:
          return ex
      raise TaskConfigError(
          f'{self.name}: no prompt with num_dicts={c.num_dicts} fit num_tokens={c.num_tokens} '
          f'in max_attempts={c.max_attempts} draws (seed={seed}, index={index})')
    return self._build(common.example_rng(self.name, seed, index), seed, index, c.num_dicts)

  def _build(self, rng, seed, index, num_dicts) -> Example:
    return self._compose(rng, seed, index, num_dicts)[0]

  def _compose(self, rng, seed, index, num_dicts):
    """(example, its dictionaries as (keys, values) in prompt order or None when a token
    budget chose their number, the gold (key, value, ...))."""
    c = self.config
    if self.dict_range is not None:
      num_dicts = int(rng.integers(self.dict_range[0], self.max_dicts(index) + 1))
    gold = self._draw_gold(rng)
    question = self._question(gold)
    gold_keys, gold_values = self._gold_dict(rng, gold)
    gold_line = self._render_pairs(gold_keys, gold_values)

    if num_dicts is not None:
      sizes = self._sizes(rng, num_dicts - 1)
      distractors = self._draw_dicts(rng, sizes, gold, used=gold_keys)
      bodies = [self._render_pairs(k, v) for k, v in distractors]
      n = num_dicts
    else:
      bodies, n = self._fill(rng, gold, gold_line, question, gold_keys)

    g = common.pick_gold_position(rng, self.gold_position, n, index, c.first_position_prob,
                                  c.early_position_prob, c.early_position_max)
    while True:
      ordered = bodies[:g - 1] + [gold_line] + bodies[g - 1:n - 1]
      lines = [f'Dictionary [{i + 1}] {{{b}}}' for i, b in enumerate(ordered)]
      prompt = self._prompt_text(lines, question)
      # counted only under a token budget: the pipeline tokenizes the (chat-formatted)
      # prompt itself, so a budget-free prompt is tokenized once
      ids = self._ids(prompt) if c.num_tokens is not None else None
      num_tokens = None if ids is None else len(ids)
      if num_dicts is not None or num_tokens <= c.num_tokens or n == 1:
        break
      n -= 1            # the per-line estimate was short: drop a distractor and recount
      g = min(g, n)
    dicts = None
    if num_dicts is not None:
      dicts = distractors[:g - 1] + [(gold_keys, gold_values)] + distractors[g - 1:]
    return Example(task=self.name, prompt=prompt, answer=self._answer(gold, g),
                   gold_key=self._key_json(gold), gold_value=int(gold[1]), gold_dict=g,
                   num_dicts=n, position=common.relative_position(g, n),
                   num_tokens=num_tokens, seed=seed, index=index, prompt_ids=ids), dicts, gold

  def _fill(self, rng, gold, gold_line, question, used):
    """Distractor bodies and the number of dictionaries that fit num_tokens."""
    c = self.config
    fixed = self._count(self._prompt_text([f'Dictionary [0] {{{gold_line}}}'], question))
    budget = c.num_tokens - fixed
    newline = self._count('x\n') - self._count('x')
    bodies, counts = [], []
    # Lines are counted with index "0" plus one token per extra index digit (digits
    # tokenize one per token); the full prompt is recounted at the end anyway.
    while True:
      mean = (sum(counts) / len(counts)) if counts else 40.0
      more = max(8, int((budget - sum(counts)) / mean * 1.1) + 2)
      sizes = self._sizes(rng, more)
      drawn = self._draw_dicts(rng, sizes, gold, used=used)
      used = list(used) + [k for keys, _ in drawn for k in keys]
      new = [self._render_pairs(k, v) for k, v in drawn]
      bodies += new
      counts += [len(ids) + newline for ids in self.tokenizer.encode_batch(
          ['Dictionary [0] {' + b + '}' for b in new], bos=False)]
      cum = np.cumsum(counts)
      extra_digits = np.cumsum([len(str(i + 2)) - 1 for i in range(len(counts))])
      total = cum + extra_digits
      fits = int(np.searchsorted(total, budget, side='right'))
      if fits < len(counts):
        return bodies[:fits], fits + 1
      if len(bodies) > 10 ** 6:
        raise TaskConfigError(f'{self.name}: num_tokens={c.num_tokens} needs over a million dictionaries')

  def _gold_dict(self, rng, gold):
    size = self.config.gold_dict_size
    keys, values = self._draw_dicts(rng, np.array([size - 1]), gold, used=())[0]
    slot = int(rng.integers(0, size))
    keys = list(keys[:slot]) + [gold[0]] + list(keys[slot:])
    values = list(values[:slot]) + [gold[1]] + list(values[slot:])
    return keys, values


# ----------------------------------------------------------------------------- simple


class SimpleKV(_DictTask):
  name = 'simple_kv'

  def _validate(self):
    c = self.config
    self.key_digits = common.check_digits('key_digits', c.key_digits)
    self.value_digits = common.check_digits('value_digits', c.value_digits)
    if c.unique_keys not in ('gold', 'all'):
      raise TaskConfigError(f"unique_keys={c.unique_keys!r} must be 'gold' or 'all'")
    space = common.digit_range_size(self.key_digits)
    most = max(self.keys_per_dict[1], c.gold_dict_size)
    if c.unique_keys == 'all' and c.num_dicts is not None:
      most = c.gold_dict_size + (c.num_dicts - 1) * self.keys_per_dict[1]
    if most > space:
      raise TaskConfigError(
          f'key_digits={c.key_digits} holds {space} distinct keys, but up to {most} distinct '
          f'keys are needed (keys_per_dict={c.keys_per_dict}, gold_dict_size={c.gold_dict_size}'
          f'{", unique_keys=all" if c.unique_keys == "all" else ""})')
    if common.digit_range_size(self.value_digits) < 2:
      raise TaskConfigError(f'value_digits={c.value_digits} leaves no distractor values')

  def _draw_gold(self, rng):
    return (int(common.sample_numbers(rng, self.key_digits, ())),
            int(common.sample_numbers(rng, self.value_digits, ())))

  def _worst_gold(self):
    return (10 ** self.key_digits[1] - 1, 10 ** self.value_digits[1] - 1)

  def _draw_dicts(self, rng, sizes, gold, used):
    total = int(sizes.sum())
    unique_all = self.config.unique_keys == 'all'
    taken = {gold[0], *used} if unique_all else {gold[0]}
    owner = np.repeat(np.arange(len(sizes)), sizes)
    keys = common.sample_numbers(rng, self.key_digits, total)
    values = common.sample_numbers(rng, self.value_digits, total)
    for _ in range(1000):
      bad = _taken_or_repeated(keys, taken, None if unique_all else owner)
      if not bad.any():
        break
      keys[bad] = common.sample_numbers(rng, self.key_digits, int(bad.sum()))
    else:
      raise TaskConfigError(f'could not draw distinct keys from key_digits={self.config.key_digits}')
    while (bad := values == gold[1]).any():
      values[bad] = common.sample_numbers(rng, self.value_digits, int(bad.sum()))
    bounds = np.cumsum(sizes)[:-1]
    return list(zip(np.split(keys, bounds), np.split(values, bounds)))

  def _render_pairs(self, keys, values):
    return ', '.join(f'{k}: {v}' for k, v in zip(keys, values))

  def _worst_pairs(self, size):
    k, v = 10 ** self.key_digits[1] - 1, 10 ** self.value_digits[1] - 1
    return ', '.join([f'{k}: {v}'] * size)

  def _best_pairs(self, size):
    k, v = 10 ** (self.key_digits[0] - 1), 10 ** (self.value_digits[0] - 1)
    return ', '.join([f'{k}: {v}'] * size)

  def _key_json(self, gold):
    return int(gold[0])

  def _question(self, gold):
    q = ('Above is a list of dictionaries such that each key and value is an integer. '
         f'Report the value of key {gold[0]} and the dictionary it is in.')
    if self.config.answer_template:
      q += (' Answer in the following template:\n'
            f'The value of key {gold[0]} is <fill-in-value> and it is in Dictionary '
            '[<fill-in-dictionary-name>].')
    return q

  def _answer(self, gold, g):
    return f'The value of key {gold[0]} is {gold[1]} and it is in Dictionary [{g}].'


def _taken_or_repeated(keys: np.ndarray, taken: set, owner: np.ndarray | None) -> np.ndarray:
  """`np.isin(keys, taken) | _duplicates(keys, owner)` with sets: the same mask (and so the
  same data stream), several times faster for the few dozen keys of a prompt."""
  seen, bad = set(), np.zeros(len(keys), bool)
  groups = [None] * len(keys) if owner is None else owner.tolist()
  for i, (k, o) in enumerate(zip(keys.tolist(), groups)):
    bad[i] = k in taken or (o, k) in seen
    seen.add((o, k))
  return bad


def _duplicates(keys: np.ndarray, owner: np.ndarray | None) -> np.ndarray:
  """True for every repeat (not the first occurrence) of a key within its owner group."""
  owner = np.zeros(len(keys), np.int64) if owner is None else owner
  order = np.lexsort((keys, owner))
  k, o = keys[order], owner[order]
  repeat = np.zeros(len(keys), bool)
  repeat[1:] = (k[1:] == k[:-1]) & (o[1:] == o[:-1])
  out = np.zeros(len(keys), bool)
  out[order] = repeat
  return out


# ----------------------------------------------------------------------------- multi-subkey


class MultiSubkeyKV(_DictTask):
  name = 'multisubkey_kv'

  def _validate(self):
    c = self.config
    self.subkey_digits = common.check_digits('subkey_digits', c.subkey_digits)
    self.value_digits = common.check_digits('value_digits', c.value_digits)
    if c.subkeys_per_key < 2:
      raise TaskConfigError(f'subkeys_per_key={c.subkeys_per_key} must be at least 2')
    lo, hi = common.check_range('shared_subkeys', c.shared_subkeys)
    if hi >= c.subkeys_per_key:
      raise TaskConfigError(
          f'shared_subkeys={c.shared_subkeys}: a distractor may share at most '
          f'subkeys_per_key-1={c.subkeys_per_key - 1} subkeys with the gold key')
    if not 0 <= c.share_prob <= 1:
      raise TaskConfigError(f'share_prob={c.share_prob} must be a probability')
    if common.digit_range_size(self.subkey_digits) < 2 * c.subkeys_per_key:
      raise TaskConfigError(f'subkey_digits={c.subkey_digits} holds too few distinct subkeys '
                            f'for subkeys_per_key={c.subkeys_per_key}')

  def _draw_gold(self, rng):
    n = self.config.subkeys_per_key
    while True:
      sub = common.sample_numbers(rng, self.subkey_digits, n)
      if len(set(sub.tolist())) == n:
        break
    return (tuple(int(x) for x in sub), int(common.sample_numbers(rng, self.value_digits, ())),
            tuple(int(x) for x in rng.permutation(sub)))

  def _worst_gold(self):
    k = 10 ** self.subkey_digits[1] - 1
    return ((k,) * self.config.subkeys_per_key, 10 ** self.value_digits[1] - 1,
            (k,) * self.config.subkeys_per_key)

  def _draw_dicts(self, rng, sizes, gold, used):
    del used  # tuple keys are unique within a dictionary only
    c = self.config
    total, n = int(sizes.sum()), c.subkeys_per_key
    owner = np.repeat(np.arange(len(sizes)), sizes)
    keys = common.sample_numbers(rng, self.subkey_digits, (total, n))
    gold_key = np.array(gold[0])
    share = rng.random(total) < c.share_prob
    for row in np.flatnonzero(share):
      m = int(rng.integers(c.shared_subkeys[0], c.shared_subkeys[1] + 1))
      slots = rng.choice(n, m, replace=False)
      keys[row, slots] = rng.choice(gold_key, m, replace=False)
    gold_sorted = np.sort(gold_key)
    for _ in range(1000):
      # A key whose subkeys include every gold subkey would answer the question too.
      contains_all = np.all([np.any(keys == g, axis=1) for g in gold_sorted], axis=0)
      flat = np.sort(keys, axis=1)
      as_int = flat @ (10 ** (self.subkey_digits[1] * np.arange(n)[::-1])).astype(np.int64) \
          if self.subkey_digits[1] * n <= 18 else None
      dup = _duplicates(as_int, owner) if as_int is not None else np.zeros(total, bool)
      bad = contains_all | dup
      if not bad.any():
        break
      keys[bad] = common.sample_numbers(rng, self.subkey_digits, (int(bad.sum()), n))
    values = common.sample_numbers(rng, self.value_digits, total)
    while (bad := values == gold[1]).any():
      values[bad] = common.sample_numbers(rng, self.value_digits, int(bad.sum()))
    bounds = np.cumsum(sizes)[:-1]
    return list(zip(np.split(keys, bounds), np.split(values, bounds)))

  def _render_pairs(self, keys, values):
    return ', '.join(f'({", ".join(str(int(s)) for s in k)}): {v}' for k, v in zip(keys, values))

  def _worst_pairs(self, size):
    k = 10 ** self.subkey_digits[1] - 1
    return self._render_pairs([(k,) * self.config.subkeys_per_key] * size,
                              [10 ** self.value_digits[1] - 1] * size)

  def _best_pairs(self, size):
    k = 10 ** (self.subkey_digits[0] - 1)
    return self._render_pairs([(k,) * self.config.subkeys_per_key] * size,
                              [10 ** (self.value_digits[0] - 1)] * size)

  def _key_json(self, gold):
    return list(gold[0])

  def _question(self, gold):
    listed = common.join_numbers(gold[2])
    q = ('Above is a list of dictionaries such that each key is a tuple of integers and each '
         f'value is an integer. Report the key that contains the integers {listed} (not '
         'necessarily in order), its value, and the dictionary it is in.')
    if self.config.answer_template:
      q += (' Answer in the following template:\n'
            f'The key that contains the integers {listed} is <fill-in-key>. Its value is '
            '<fill-in-value> and it is in Dictionary [<fill-in-dictionary-name>].')
    return q

  def _answer(self, gold, g):
    return (f'The key that contains the integers {common.join_numbers(gold[2])} is '
            f'({common.join_numbers(gold[0])}). Its value is {gold[1]} and it is in '
            f'Dictionary [{g}].')
