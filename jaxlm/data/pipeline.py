"""Grain pipelines over generated examples: index -> example -> tokens -> packed or
padded sequences -> batches.

    MapDataset.range(N)            example indices (N=None: an endless stream)
      .shuffle(seed).repeat(E)     epochs, reshuffled each epoch
      .map(task.example)           pure function of (config, seed, index)
      .map(to_features)            prompt+answer tokens, loss mask on the answer only
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

from jaxlm import chat
from jaxlm.data.common import Example, TaskConfigError, replace_fields
from jaxlm.data.tasks import make_task

FEATURES = ('inputs', 'targets', 'loss_mask')


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


def format_prompt(prompt: str, chat_format) -> str:
  """The text of a chat-formatted first user turn (bos not included); `chat_format` is a
  name of jaxlm.chat.FORMATS or a ChatFormat ('auto' needs a tokenizer: see prompt_ids)."""
  try:
    return chat.render_prompt(chat.get_format(chat_format), prompt)
  except chat.ChatFormatError as e:
    raise TaskConfigError(str(e)) from None


def resolve_chat_format(chat_format, tokenizer) -> chat.ChatFormat:
  """The ChatFormat a config names ('auto': the tokenizer's), checked against the tokenizer."""
  try:
    return chat.resolve(chat_format, tokenizer)
  except chat.ChatFormatError as e:
    raise TaskConfigError(str(e)) from None


def prompt_ids(example: Example, tokenizer, chat_format) -> list[int]:
  """[bos] + the (chat-formatted) prompt: what a model sees before it answers."""
  fmt = resolve_chat_format(chat_format, tokenizer)
  return chat.prompt_ids(fmt, tokenizer, example.prompt)


def to_features(example: Example, tokenizer, chat_format) -> dict[str, np.ndarray]:
  """Next-token features of prompt + answer; the loss mask is 1 exactly where the
  target is an answer token or the end-of-turn token that closes it (the answer is
  tokenized on its own, as instruct tokenizers do for assistant turns). Later turns
  (`example.turns`) follow in the same format; the text between turns carries no loss."""
  fmt = resolve_chat_format(chat_format, tokenizer)
  prompt = chat.prompt_ids(fmt, tokenizer, example.prompt)
  answer = chat.answer_ids(fmt, tokenizer, example.answer)
  tokens, labelled = prompt + answer, [0] * len(prompt) + [1] * len(answer)
  for question, reply in example.turns:   # e.g. Mistral: [INST] q [/INST]a</s>
    q = chat.turn_ids(fmt, tokenizer, question)
    a = chat.answer_ids(fmt, tokenizer, reply)
    tokens += q + a
    labelled += [0] * len(q) + [1] * len(a)
  tokens = np.array(tokens, np.int32)
  mask = np.array(labelled[1:], np.int32)   # target t+1 is an answer token
  return {'inputs': tokens[:-1], 'targets': tokens[1:], 'loss_mask': mask}


class _Generate(grain.transforms.Map):
  def __init__(self, task, seed):
    self.task, self.seed = task, seed

  def map(self, index):
    return self.task.example(self.seed, int(index))


class _Featurize(grain.transforms.Map):
  def __init__(self, tokenizer, chat_format):
    self.tokenizer, self.chat_format = tokenizer, chat_format

  def map(self, example):
    return to_features(example, self.tokenizer, self.chat_format)


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
  ds = ds.map(_Generate(task, c.seed)).map(_Featurize(tokenizer, fmt))
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
