"""Task registry: `make_task(name, tokenizer, **fields)` -> an object whose
`example(seed, index)` returns a `jaxlm.data.common.Example`."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxlm.data.common import TaskConfigError, replace_fields
from jaxlm.data.kv import MultiSubkeyKV, MultiSubkeyKVConfig, SimpleKV, SimpleKVConfig
from jaxlm.data.niah import NIAH, NIAHConfig

TASKS = {
    'simple_kv': (SimpleKVConfig, SimpleKV),
    'multisubkey_kv': (MultiSubkeyKVConfig, MultiSubkeyKV),
    'niah': (NIAHConfig, NIAH),
}


DEMO_TASKS = ('demo_kv',)   # the from-scratch demo's task (jaxlm/demo/kv.py), loaded on use


def task_classes(name: str):
  """(config dataclass, task class) of a task name."""
  if name == 'demo_kv':
    from jaxlm.demo.kv import DemoKV, DemoKVConfig
    return DemoKVConfig, DemoKV
  if name not in TASKS:
    raise TaskConfigError(f'unknown task {name!r}; choose one of {sorted([*TASKS, *DEMO_TASKS])}')
  return TASKS[name]


def task_field_names(name: str) -> set[str]:
  return {f.name for f in dataclasses.fields(task_classes(name)[0])}


def eval_task(c) -> tuple[str, dict[str, Any]]:
  """(task name, fields) of a run config's held-out evaluation: eval.task ('' or absent:
  the training task's `eval_task` if its class names one, else the training task) with the
  training task's fields that it has, then eval.task_fields."""
  name = c.eval.get('task') or getattr(task_classes(c.data.task)[1], 'eval_task', c.data.task)
  known = task_field_names(name)
  fields = {k: v for k, v in c.data.task_fields.to_dict().items() if k in known}
  return name, {**fields, **c.eval.task_fields.to_dict()}


def make_task(name: str, tokenizer=None, **fields: Any):
  """Build and validate a task. Lists in `fields` become tuples (config files and the
  command line give lists); unknown field names and impossible values raise
  TaskConfigError naming them."""
  config_cls, task_cls = task_classes(name)
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return task_cls(replace_fields(config_cls(), fields), tokenizer)
