"""Write generated examples as JSONL for other trainers.

  python -m jaxlm.data.export --task=simple_kv --num=350 --format=openai --out=train.jsonl
  python -m jaxlm.data.export --task=simple_kv --num=150 --seed=1 --answer_template \\
      --num_tokens=4000 --gold_position=0.0,0.5,1.0 --format=plain --out=eval.jsonl
  python -m jaxlm.data.export --task=multisubkey_kv --num=150 --set=num_dicts=49 ...

Formats: `hf` (Hugging Face chat messages: user, assistant), `openai` (the OpenAI chat
fine-tuning format the paper used for GPT-3.5 Turbo: system, user, assistant) and
`plain` (one flat record: prompt, answer, gold_key, gold_value, gold_dict, num_dicts,
num_tokens, task, plus position, seed and index). `--set FIELD=VALUE` (repeatable)
reaches every other task field (see jaxlm/data/kv.py and niah.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any

from absl import app, flags

from jaxlm.data.common import Example, TaskConfigError, parse_scalar
from jaxlm.data.tasks import TASKS, make_task
from jaxlm.tokenizer import MISTRAL_V1, Tokenizer

OPENAI_SYSTEM = 'Write a response that appropriately completes the request.'
FORMATS = ('hf', 'openai', 'plain')
PLAIN_FIELDS = {'prompt': str, 'answer': str, 'gold_key': (int, str, list), 'gold_value': int,
                'gold_dict': int, 'num_dicts': int, 'num_tokens': (int, type(None)), 'task': str}

_TASK = flags.DEFINE_enum('task', 'simple_kv', sorted(TASKS), 'task to generate')
_NUM = flags.DEFINE_integer('num', 10, 'number of examples', lower_bound=1)
_FORMAT = flags.DEFINE_enum('format', 'plain', FORMATS, 'output format')
_OUT = flags.DEFINE_string('out', None, 'output .jsonl file', required=True)
_SEED = flags.DEFINE_integer('seed', 0, 'data seed', lower_bound=0)
_START = flags.DEFINE_integer('start', 0, 'first example index', lower_bound=0)
_TEMPLATE = flags.DEFINE_boolean('answer_template', False, 'add the answer template')
_NUM_TOKENS = flags.DEFINE_integer('num_tokens', None, 'prompt token budget')
_GOLD = flags.DEFINE_string('gold_position', None,
                            "'uniform', a 1-based index, a depth in [0,1], or a comma list")
_SET = flags.DEFINE_multi_string('set', [], 'FIELD=VALUE override of any task field')
_TOKENIZER = flags.DEFINE_string('tokenizer', MISTRAL_V1, 'sentencepiece model for num_tokens')


def to_record(example: Example, fmt: str) -> dict[str, Any]:
  if fmt == 'plain':
    return example.to_dict()
  messages = [{'role': 'user', 'content': example.prompt},
              {'role': 'assistant', 'content': example.answer}]
  if fmt == 'openai':
    messages.insert(0, {'role': 'system', 'content': OPENAI_SYSTEM})
  elif fmt != 'hf':
    raise ValueError(f'format={fmt!r} is not one of {FORMATS}')
  return {'messages': messages}


def validate_record(record: Any, fmt: str) -> None:
  """Raise ValueError if `record` is not a valid line of format `fmt`."""
  if not isinstance(record, dict):
    raise ValueError(f'a {fmt} record must be a JSON object, got {type(record).__name__}')
  if fmt == 'plain':
    for name, types in PLAIN_FIELDS.items():
      if name not in record:
        raise ValueError(f'plain record lacks field {name!r}')
      if not isinstance(record[name], types) or isinstance(record[name], bool):
        raise ValueError(f'plain record field {name!r} has type {type(record[name]).__name__}')
    if not 1 <= record['gold_dict'] <= record['num_dicts']:
      raise ValueError(f"gold_dict={record['gold_dict']} outside 1..{record['num_dicts']}")
    return
  roles = ['system', 'user', 'assistant'] if fmt == 'openai' else ['user', 'assistant']
  if set(record) != {'messages'}:
    raise ValueError(f'a {fmt} record has exactly one key, "messages"; got {sorted(record)}')
  messages = record['messages']
  if [m.get('role') for m in messages] != roles:
    raise ValueError(f'{fmt} roles must be {roles}, got {[m.get("role") for m in messages]}')
  for m in messages:
    if set(m) != {'role', 'content'} or not isinstance(m['content'], str) or not m['content']:
      raise ValueError(f'{fmt} message {m!r} needs exactly a role and non-empty string content')


def task_fields(num_tokens, gold_position, answer_template, sets) -> dict[str, Any]:
  fields: dict[str, Any] = {'answer_template': answer_template}
  if num_tokens is not None:
    fields['num_tokens'] = num_tokens
  if gold_position is not None:
    fields['gold_position'] = parse_scalar(gold_position)
  for item in sets:
    if '=' not in item:
      raise TaskConfigError(f'--set {item!r} must look like FIELD=VALUE')
    key, value = item.split('=', 1)
    fields[key.strip()] = parse_scalar(value)
  return fields


def export(task_name: str, fields: dict[str, Any], *, num: int, fmt: str, out: str, seed: int,
           start: int = 0, tokenizer: Tokenizer | None = None, log=print) -> None:
  """Generate examples start..start+num-1 and write them to `out` (atomically)."""
  if task_name in ('simple_kv', 'multisubkey_kv') and 'num_tokens' in fields \
      and 'num_dicts' not in fields:
    fields = {**fields, 'num_dicts': None}   # a budget alone: fill it with dictionaries
  if task_name == 'niah' and 'num_units' in fields and 'num_tokens' not in fields:
    fields = {**fields, 'num_tokens': None}
  task = make_task(task_name, tokenizer, **fields)
  tmp = out + '.tmp'
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  t0, every = time.perf_counter(), max(1, num // 20)
  with open(tmp, 'w') as f:
    for i in range(num):
      ex = task.example(seed, start + i)
      if ex.num_tokens is None and tokenizer is not None:   # counted by tasks under a budget only
        ex = dataclasses.replace(ex, num_tokens=len(tokenizer.encode(ex.prompt, bos=False)))
      f.write(json.dumps(to_record(ex, fmt)) + '\n')
      if (i + 1) % every == 0 or i + 1 == num:
        dt = time.perf_counter() - t0
        rate = (i + 1) / dt
        log(f'[export] {i + 1}/{num} examples, {rate:.0f}/s, ETA {(num - i - 1) / rate:.0f}s')
  os.replace(tmp, out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  fields = task_fields(_NUM_TOKENS.value, _GOLD.value, _TEMPLATE.value, _SET.value)
  try:
    export(_TASK.value, fields, num=_NUM.value, fmt=_FORMAT.value, out=_OUT.value,
           seed=_SEED.value, start=_START.value, tokenizer=Tokenizer(_TOKENIZER.value),
           log=lambda s: print(s, file=sys.stderr))
  except TaskConfigError as e:
    sys.exit(f'error: {e}')
  print(f'wrote {_NUM.value} {_TASK.value} examples ({_FORMAT.value}) to {_OUT.value}')


if __name__ == '__main__':
  app.run(main)
