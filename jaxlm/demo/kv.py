"""Task 'demo_kv': the paper's simple_kv with two additions for a model trained from scratch.

- Extra turns (`extra_queries=K`): after the answer, up to K more keys of the same prompt,
  each occurring once in it, are asked as further chat turns, so one prompt supervises
  several lookups. `extra_question='short'` asks them with the question's one 'Report ...'
  sentence; `extra_unique_values` asks only pairs whose value is unique in the prompt too.
- Curriculum (`curriculum_examples=N` with a num_dicts range): example i draws its count
  from (min, m_i), m_i rising linearly from min to max over the first N examples (a pure
  function of the index, so resuming replays it exactly).

The first turn of every example is simple_kv's (the same random draws, the same prompt and
answer, `Example.task` 'simple_kv'), so held-out evaluation and scoring treat it as
simple_kv; the extra turns are drawn after everything else.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxlm.data.common import Example, TaskConfigError
from jaxlm.data.features import conversation_features
from jaxlm.data.kv import SimpleKV, SimpleKVConfig


@dataclasses.dataclass(frozen=True)
class DemoKVConfig(SimpleKVConfig):
  curriculum_examples: int = 0        # with a num_dicts range: ramp its max over these examples
  extra_queries: int = 0              # after the answer, ask up to this many more keys
  extra_question: str = 'full'        # 'full' (the paper's question) or 'short' (one sentence)
  extra_unique_values: bool = False   # ask only pairs whose value is unique in the prompt


@dataclasses.dataclass(frozen=True)
class DemoExample(Example):
  turns: tuple = ()                   # more (question, answer) turns about the same prompt

  def to_dict(self):
    d = super().to_dict()
    if not d['turns']:
      del d['turns']
    return d


class DemoKV(SimpleKV):
  # name stays 'simple_kv': the same examples (random streams are keyed by the name) and
  # the same scoring; held-out evaluation asks the first turn only, without the curriculum
  eval_task = 'simple_kv'

  def __init__(self, config, tokenizer=None):
    c = config
    if not isinstance(c.curriculum_examples, int) or c.curriculum_examples < 0:
      raise TaskConfigError(f'curriculum_examples={c.curriculum_examples!r} must be an int >= 0')
    if c.curriculum_examples and not isinstance(c.num_dicts, (tuple, list)):
      raise TaskConfigError(f'curriculum_examples={c.curriculum_examples} needs a num_dicts '
                            f'range (min, max), got num_dicts={c.num_dicts!r}')
    if not isinstance(c.extra_queries, int) or c.extra_queries < 0:
      raise TaskConfigError(f'extra_queries={c.extra_queries!r} must be an int >= 0')
    if c.extra_queries and c.num_dicts is None:
      raise TaskConfigError(f'extra_queries={c.extra_queries} needs num_dicts (not only '
                            f'num_tokens)')
    if c.extra_question not in ('full', 'short'):
      raise TaskConfigError(f"extra_question={c.extra_question!r} must be 'full' or 'short'")
    super().__init__(config, tokenizer)

  def max_dicts(self, index: int) -> int:
    """The curriculum: the range's max reached linearly over curriculum_examples."""
    lo, hi = self.dict_range
    n = self.config.curriculum_examples
    if not n or index >= n:
      return hi
    return lo + int((hi - lo + 1) * index / n)

  def _build(self, rng, seed, index, num_dicts) -> DemoExample:
    ex, dicts, gold = self._compose(rng, seed, index, num_dicts)
    turns = self._extra_turns(rng, gold, dicts) if self.config.extra_queries else ()
    return DemoExample(**dataclasses.asdict(ex), turns=turns)

  def _extra_turns(self, rng, gold, dicts) -> tuple:
    """(question, answer) turns about up to extra_queries other keys that occur once in
    the prompt."""
    c = self.config
    pairs = [(int(key), int(value), d + 1) for d, (keys, values) in enumerate(dicts)
             for key, value in zip(keys, values)]
    key_count = collections.Counter(key for key, _, _ in pairs)
    candidates = [p for p in pairs if key_count[p[0]] == 1 and p[0] != int(gold[0])]
    if c.extra_unique_values:
      value_count = collections.Counter(value for _, value, _ in pairs)
      candidates = [p for p in candidates if value_count[p[1]] == 1]
    if not candidates:
      return ()
    chosen = rng.choice(len(candidates), size=min(c.extra_queries, len(candidates)),
                        replace=False)
    ask = self._short_question if c.extra_question == 'short' else self._question
    return tuple((ask(candidates[i][:2]), self._answer(candidates[i][:2], candidates[i][2]))
                 for i in chosen)

  def _short_question(self, gold) -> str:
    return f'Report the value of key {gold[0]} and the dictionary it is in.'

  def to_features(self, example, tokenizer, chat_format):
    """Features of the first turn and the extra turns (the pipeline calls this)."""
    turns = [(example.prompt, example.answer), *getattr(example, 'turns', ())]
    return conversation_features(turns, tokenizer, chat_format, prompt_ids=example.prompt_ids)
