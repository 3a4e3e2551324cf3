"""Task registry: `make_task(name, tokenizer, **fields)` -> an object whose
`example(seed, index)` returns a `jaxlm.data.common.Example`."""

from __future__ import annotations

from typing import Any

from jaxlm.data.common import TaskConfigError, replace_fields
from jaxlm.data.kv import MultiSubkeyKV, MultiSubkeyKVConfig, SimpleKV, SimpleKVConfig
from jaxlm.data.niah import NIAH, NIAHConfig

TASKS = {
    'simple_kv': (SimpleKVConfig, SimpleKV),
    'multisubkey_kv': (MultiSubkeyKVConfig, MultiSubkeyKV),
    'niah': (NIAHConfig, NIAH),
}


def make_task(name: str, tokenizer=None, **fields: Any):
  """Build and validate a task. Lists in `fields` become tuples (config files and the
  command line give lists); unknown field names and impossible values raise
  TaskConfigError naming them."""
  if name not in TASKS:
    raise TaskConfigError(f'unknown task {name!r}; choose one of {sorted(TASKS)}')
  config_cls, task_cls = TASKS[name]
  fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
  return task_cls(replace_fields(config_cls(), fields), tokenizer)
