"""A run's directory: it belongs to one run, and nothing in it is destroyed.

    check_path(workdir)                  # PathError unless it is (now) a writable directory
    check_space(workdir, ...)            # PathError if one checkpoint (and the export) cannot fit
    notes = check_resume(workdir, c)     # ConfigError if the saved run differs in kind
    moved = set_aside(workdir)           # --restart: the old run's files to WORKDIR/previous/
    mark_finished(workdir, step); finished_step(workdir)

WORKDIR/config.json is the config of the run that owns the directory. A later run in the
same directory must be the same run: a field that changes what the checkpoint holds
(architecture, parameter dtype, initialization) or the data stream (data.*, the global
batch) is refused, listing every such field, before anything is written. Other fields
(steps, learning rate and schedule, logging, checkpoint and evaluation cadence, kernels,
the mesh, which a restore reshards to) may change; each change is returned as a note for
the log. `--restart` starts a directory over by moving the old run's files aside (into
WORKDIR/previous/<UTC time>/); nothing here deletes a file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any

from jaxlm.config import RUN_FIELDS, ConfigError

CONFIG = 'config.json'
FINISHED = 'finished.json'
PREVIOUS = 'previous'
# What a run writes into its directory (set_aside moves these).
RUN_FILES = ('checkpoints', CONFIG, FINISHED, 'metrics.jsonl', 'tensorboard', 'hf',
             'eval_kv.json', 'eval_kv.png', 'eval_kv_before.json', 'unreadable_checkpoints')

# Performance-only data fields: the stream is the same whatever they are.
_DATA_SPEED = ('data.num_threads', 'data.num_workers')
# Model fields a run chooses that leave the state as it is: kernels and compute dtype
# (not the parameter dtype, nor scan_layers, which stacks the layers' parameters).
_KERNELS = tuple(f'model.{k}' for k in RUN_FIELDS if k not in ('param_dtype', 'scan_layers'))


class PathError(OSError):
  """A workdir (or another path a run needs) that cannot be used; names the path."""


def check_path(workdir: str) -> None:
  """`workdir` is a writable directory, created if missing (empty); else PathError.
  Remote paths (gs://, ...) are left to the storage layer."""
  if '://' in workdir:
    return
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise PathError(f'workdir={workdir!r}: is a file, not a directory')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise PathError(f'workdir={workdir!r}: cannot be created ({e.strerror}: '
                    f'{e.filename})') from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise PathError(f'workdir={workdir!r}: is not writable')


def _gb(n: float) -> str:
  return f'{n / 1e9:.2f} GB'


def check_space(workdir: str, *, checkpoint_bytes: int, checkpoints: int, export_bytes: int,
                strict: bool = True) -> str | None:
  """Before training: can the disk holding `workdir` take what the run will write?

  Fewer free bytes than one checkpoint plus the export (`export_bytes`, 0 without one): the
  run would train and then fail to save, so PathError, naming the sizes (with strict=False
  the message is returned instead). Fewer than `checkpoints` checkpoints plus the export
  (what the run holds at once: keep_checkpoints, and one more while a new one is written
  before the oldest goes): a warning line is returned. None when it fits. Sizes are the
  arrays' bytes (Orbax may store a little less). Remote paths (gs://, ...) are skipped."""
  if '://' in workdir:
    return None
  free = shutil.disk_usage(workdir).free
  export = f' and its Hugging Face export {_gb(export_bytes)}' if export_bytes else ''
  if free < checkpoint_bytes + export_bytes:
    msg = (f'workdir={workdir!r}: its disk has {_gb(free)} free, but one checkpoint of this '
           f'run takes {_gb(checkpoint_bytes)}{export}: the run would train and then fail '
           f'to save. Free some space or choose another --workdir')
    if strict:
      raise PathError(msg)
    return msg
  peak = checkpoints * checkpoint_bytes + export_bytes
  if free < peak:
    return (f'workdir={workdir!r}: {_gb(free)} free on its disk, less than the {_gb(peak)} '
            f'this run can hold at once ({checkpoints} checkpoints of {_gb(checkpoint_bytes)}'
            f'{export}); lower train.keep_checkpoints or free some space')
  return None


def _flat(d: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and k != 'task_fields':
      out.update(_flat(v, f'{prefix}{k}.'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def _kind(field: str) -> str | None:
  """'state' or 'data' for a field that a resumed run may not change; None if it may."""
  if field in ('seed', 'init_from', 'tokenizer', 'init_hook'):
    return 'state'
  if field.startswith('model.'):
    return None if field in _KERNELS else 'state'
  if field.startswith('data.'):
    return None if field in _DATA_SPEED else 'data'
  if field == 'train.batch_size':
    return 'data'
  if field.startswith('train.lora.') and field != 'train.lora.dropout':
    return 'state'   # adapters or their scale: another model
  if field == 'train.trainable_layers':
    return 'state'   # another optimizer state
  return None


def _default(field: str) -> Any:
  """The library default of a model.*, data.*, train.lora.* or train.trainable_layers
  field (what a config that predates the field meant), or a sentinel."""
  from jaxlm.data.pipeline import DataConfig
  from jaxlm.lora import LoRAConfig
  from jaxlm.model import MistralConfig
  if field == 'train.trainable_layers':   # runs from before it: every parameter
    return 0
  if field.startswith('train.lora.'):   # runs from before LoRA: LoRA off
    value = getattr(LoRAConfig(), field.rpartition('.')[2], _default)
    return list(value) if isinstance(value, tuple) else value
  section, _, name = field.partition('.')
  source = {'model': MistralConfig, 'data': DataConfig}.get(section)
  return getattr(source(), name, _default) if source else _default


def diff(saved: dict[str, Any], new: dict[str, Any]) -> tuple[list[str], list[str]]:
  """(refused, allowed): 'field: saved -> new' for each field that differs, split by
  whether a resumed run may change it."""
  a, b = _flat(saved), _flat(new)
  refused, allowed = [], []
  for field in sorted(set(a) | set(b)):
    old, now = a.get(field, '(absent)'), b.get(field, '(absent)')
    if old == now:
      continue
    line = f'{field}: {old!r} -> {now!r}'
    # a field added since the run started, at its default: the run had that value
    kind = None if field not in a and now == _default(field) else _kind(field)
    if kind:
      refused.append(f'{line} (changes the {"checkpoint" if kind == "state" else "data stream"})')
    else:
      allowed.append(line)
  return refused, allowed


def check_resume(workdir: str, c) -> list[str]:
  """Against WORKDIR/config.json, if any: ConfigError listing the fields a resumed run may
  not change; else the allowed changes, as notes for the log."""
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    return []
  try:
    with open(path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f'{path} (the config of the run in this workdir) cannot be read: '
                      f'{type(e).__name__}: {e}. Use a new workdir, or --restart to set '
                      f'the old run aside') from None
  refused, allowed = diff(saved, json.loads(c.to_json()))
  if refused:
    raise ConfigError(
        f'workdir={workdir!r} holds another run (its {CONFIG}); these fields differ and would '
        f'change what it resumes:\n  ' + '\n  '.join(refused) + '\nNothing was changed. '
        f'Use the same values, a new --workdir, or --restart to move the old run aside '
        f'(into {os.path.join(workdir, PREVIOUS)}/) and start over.')
  return [f'changed since this run started: {line}' for line in allowed]


def set_aside(workdir: str) -> str | None:
  """Move the run files in `workdir` into WORKDIR/previous/<UTC time>/; returns that
  directory, or None if there was nothing to move."""
  present = [n for n in RUN_FILES if os.path.exists(os.path.join(workdir, n))]
  if not present:
    return None
  dest = os.path.join(workdir, PREVIOUS, time.strftime('%Y%m%d-%H%M%S', time.gmtime()))
  n = 0
  while os.path.exists(dest + (f'-{n}' if n else '')):
    n += 1
  dest += f'-{n}' if n else ''
  os.makedirs(dest)
  for name in present:
    os.rename(os.path.join(workdir, name), os.path.join(dest, name))
  return dest


def write_atomic(path: str, text: str) -> None:
  """Write `text` to `path` through a temporary file and a rename: another process (the
  other hosts of a multi-process run check WORKDIR/config.json while process 0 writes it)
  sees the old file or the whole new one, never a partial one."""
  tmp = f'{path}.tmp-{os.getpid()}'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def mark_finished(workdir: str, step: int) -> None:
  write_atomic(os.path.join(workdir, FINISHED), json.dumps(
      {'step': step, 'time': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}))


def finished_step(workdir: str) -> int | None:
  """The step a run finished at (its final evaluation and export done), or None."""
  try:
    with open(os.path.join(workdir, FINISHED)) as f:
      return int(json.load(f)['step'])
  except (OSError, ValueError, KeyError, TypeError):
    return None
