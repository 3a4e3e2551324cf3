"""Grain pipelines over generated examples: index -> example -> tokens -> packed or
padded sequences -> batches.

    MapDataset.range(N)            example indices (N=None: an endless stream)
      .shuffle(seed).repeat(E)     epochs, reshuffled each epoch
      .map(task.example)           pure function of (config, seed, index)
      .map(to_features)            prompt+answer tokens, loss mask on the answer only
                                   (jaxlm.data.features)
      .to_iter_dataset(threads)    optional thread or process workers
      pack (first fit) | pad       segment ids and positions per example
      .batch(global_batch)         the same global batches on every process
      [rows of this process]       multi-process runs: a contiguous block of rows

Every batch is a dict of [B, T] int32 arrays: `inputs`, `targets`, `loss_mask` (1 on
answer tokens, including the chat format's end-of-turn token: eos for Mistral, <|im_end|>
for ChatML), `positions` (restart at 0 for each example) and `segment_ids` (1, 2, ... for
the examples in a row, 0 for padding). The iterator's
state (`get_state()` / `set_state()`) restores the exact next batch.
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import grain
import numpy as np

from jaxlm.data.common import TaskConfigError, replace_fields
from jaxlm.data.features import (FEATURES, format_prompt, prompt_ids,  # noqa: F401
                                 resolve_chat_format, to_features)
from jaxlm.data.tasks import make_task


@dataclasses.dataclass(frozen=True)
class DataConfig:
  task: str = 'simple_kv'
  task_fields: Any = dataclasses.field(default_factory=dict)  # task config overrides
  seed: int = 0
  num_examples: int | None = None    # distinct examples per epoch; None: endless stream
  num_epochs: int = 1
  shuffle: bool = True
  seq_len: int = 4096
  global_batch_size: int = 8
  packing: bool = False               # first-fit packing of several examples per row
  num_packing_bins: int = 8
  chat_format: str = 'mistral'        # jaxlm.chat.FORMATS: 'mistral' (<s>[INST] {prompt} [/INST]
                                      # {answer}</s>), 'chatml', 'llama3', 'none' (raw prompt),
                                      # or 'auto' (the tokenizer's checkpoint's format)
  on_long: str = 'error'              # an example longer than seq_len: 'error' | 'skip'
  num_threads: int = 0                # grain read threads (0: in the main thread)
  num_workers: int = 0                # grain worker processes (0: none)

  @classmethod
  def from_dict(cls, d) -> 'DataConfig':
    d = dict(d.to_dict() if hasattr(d, 'to_dict') else d)
    return replace_fields(cls(), d)


class _Generate(grain.transforms.Map):
  def __init__(self, task, seed):
    self.task, self.seed = task, seed

  def map(self, index):
    return self.task.example(self.seed, int(index))


class _Featurize(grain.transforms.Map):
  """Example -> features (jaxlm.data.features), or the task's own `to_features` when it
  has one."""

  def __init__(self, task, tokenizer, chat_format):
    self.featurize = getattr(task, 'to_features', to_features)
    self.tokenizer, self.chat_format = tokenizer, chat_format

  def map(self, example):
    return self.featurize(example, self.tokenizer, self.chat_format)


class _CheckLength(grain.transforms.Filter):
  def __init__(self, seq_len, on_long):
    self.seq_len, self.on_long = seq_len, on_long

  def filter(self, features):
    n = len(features['inputs'])
    if n <= self.seq_len:
      return True
    if self.on_long == 'skip':
      return False
    raise TaskConfigError(
        f'an example has {n} tokens but seq_len={self.seq_len}; raise seq_len, lower the '
        f"task's num_tokens or set on_long='skip'")


class _Pad(grain.transforms.Map):
  def __init__(self, seq_len, pad_id):
    self.seq_len, self.pad_id = seq_len, pad_id

  def map(self, f):
    n, T = len(f['inputs']), self.seq_len
    out = {}
    for k in FEATURES:
      fill = self.pad_id if k != 'loss_mask' else 0
      out[k] = np.concatenate([f[k], np.full(T - n, fill, np.int32)])
    out['positions'] = np.concatenate([np.arange(n, dtype=np.int32), np.zeros(T - n, np.int32)])
    out['segment_ids'] = (np.arange(T) < n).astype(np.int32)
    return out


class _RenamePacked(grain.transforms.Map):
  def map(self, f):
    out = {k: f[k].astype(np.int32) for k in FEATURES}
    out['positions'] = f['inputs_positions'].astype(np.int32)
    out['segment_ids'] = f['inputs_segment_ids'].astype(np.int32)
    return out


class _HostRows(grain.transforms.Map):
  """A global batch -> the rows of one process (a contiguous block)."""

  def __init__(self, process_index, process_count):
    self.index, self.count = process_index, process_count

  def map(self, batch):
    rows = len(next(iter(batch.values()))) // self.count
    return {k: v[self.index * rows:(self.index + 1) * rows] for k, v in batch.items()}


def make_dataset(config: DataConfig, tokenizer, *, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """The batched training dataset of one process: its rows of each global batch.

  Every process runs the same pipeline up to the global batch (examples are generated,
  filtered, packed and batched globally) and keeps its own contiguous block of rows, so
  the data stream is a function of the config and the step, not of the process count: one,
  two or four processes see the same global batches, and the iterator's state is the same
  on every process (a checkpoint resumes under another process count)."""
  c = config
  task = make_task(c.task, tokenizer, **dict(c.task_fields))
  if c.global_batch_size % process_count:
    raise TaskConfigError(f'global_batch_size={c.global_batch_size} is not divisible by '
                          f'process_count={process_count}')
  if c.on_long not in ('error', 'skip'):
    raise TaskConfigError(f"on_long={c.on_long!r} must be 'error' or 'skip'")
  fmt = resolve_chat_format(c.chat_format, tokenizer)  # 'auto' -> the checkpoint's format
  ds = grain.MapDataset.range(c.num_examples if c.num_examples is not None else sys.maxsize)
  if c.num_examples is not None:
    if c.shuffle:
      ds = ds.shuffle(seed=c.seed)
    ds = ds.repeat(c.num_epochs)
  ds = ds.map(_Generate(task, c.seed)).map(_Featurize(task, tokenizer, fmt))
  ds = ds.filter(_CheckLength(c.seq_len, c.on_long))
  # Always explicit: `None` would mean Grain's default of 16 threads and a 500-element buffer.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=c.num_threads,
                                            prefetch_buffer_size=2 * c.num_threads))
  if c.num_workers:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=c.num_workers))
  if c.packing:
    it = grain.experimental.FirstFitPackIterDataset(
        it, length_struct={k: c.seq_len for k in FEATURES}, num_packing_bins=c.num_packing_bins,
        seed=c.seed, shuffle_bins=False)
    it = it.map(_RenamePacked())
  else:
    it = it.map(_Pad(c.seq_len, tokenizer.pad_id))
  it = it.batch(c.global_batch_size, drop_remainder=True)
  return it.map(_HostRows(process_index, process_count)) if process_count > 1 else it
