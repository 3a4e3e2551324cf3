"""The two model calls every suite is built from: greedy generation and log-likelihood.

`Runner.generate` wraps prompts in the chat format (jaxlm.chat; 'auto': the tokenizer's),
batches them by length, decodes greedily with the KV cache (jaxlm.generate), ends each
output at the format's end-of-turn token (or eos) and cuts it at the suite's stop strings.
`Runner.loglik` scores continuations given contexts, as multiple-choice benchmarks need:
the sum of the continuation tokens' log-probabilities, their count, and whether greedy
decoding would have produced them. Both count tokens and time (prefill and decode) for
the throughput report, and show progress on long runs.
"""

from __future__ import annotations

import copy
import functools
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm import generate
from jaxlm import chat


class Progress:
  """Periodic progress lines (done/total, rate, ETA) for a long loop."""

  def __init__(self, total: int, label: str, every_s: float = 30.0, out=sys.stdout):
    self.total, self.label, self.every_s, self.out = total, label, every_s, out
    self.done, self.t0, self.t_last = 0, time.perf_counter(), time.perf_counter()

  def update(self, n: int) -> None:
    self.done += n
    now = time.perf_counter()
    if now - self.t_last >= self.every_s or self.done == self.total:
      rate = self.done / max(now - self.t0, 1e-9)
      eta = (self.total - self.done) / max(rate, 1e-9)
      print(f'[eval] {self.label}: {self.done}/{self.total} ({rate:.1f}/s, ETA {eta:.0f}s)',
            file=self.out, flush=True)
      self.t_last = now


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _token_logprobs(graphdef, state, tokens_BxT, valid_BxT):
  """log p(tokens[t] | tokens[:t]) for t >= 1 ([B, T-1]) and whether each is the argmax."""
  model = nnx.merge(graphdef, state)
  logits = model(tokens_BxT[:, :-1], segment_ids_BxT=valid_BxT[:, :-1].astype(jnp.int32))
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = tokens_BxT[:, 1:]
  picked = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == targets
  return picked, greedy


class Runner:
  """A model and its tokenizer, with the chat format prompts are wrapped in (a name of
  jaxlm.chat.FORMATS, or 'auto': the tokenizer's checkpoint's; `chat_format` then holds the
  resolved name)."""

  def __init__(self, model, tokenizer, *, chat_format: str = 'none', batch_size: int = 8,
               bucket: int = 64, max_len: int | None = None, verbose: bool = True):
    self.model, self.tokenizer = model, tokenizer
    self.format = chat.resolve(chat_format, tokenizer)
    self.chat_format, self.batch_size, self.bucket = self.format.name, batch_size, bucket
    # generation ends at the answer's end-of-turn token; eos ends it too
    self.end_of_turn_id = chat.end_of_turn_id(self.format, tokenizer)
    self.stop_ids = {self.end_of_turn_id} | ({tokenizer.eos_id} if tokenizer.eos_id is not None
                                             else set())
    self.max_len = max_len or model.cfg.max_position_embeddings
    self.verbose = verbose
    self.stats = {'prefill_tokens': 0, 'decode_tokens': 0, 'generate_s': 0.0,
                  'loglik_tokens': 0, 'loglik_s': 0.0}

  def with_format(self, chat_format: str) -> 'Runner':
    """The same model and counters with prompts wrapped in another chat format."""
    other = copy.copy(self)   # shares the model, tokenizer and stats
    other.format = chat.resolve(chat_format, self.tokenizer)
    other.chat_format = other.format.name
    other.end_of_turn_id = chat.end_of_turn_id(other.format, self.tokenizer)
    other.stop_ids = {other.end_of_turn_id} | (
        {self.tokenizer.eos_id} if self.tokenizer.eos_id is not None else set())
    return other

  def render(self, prompt: str) -> str:
    """The text the model reads for `prompt` (the chat format applied; bos not shown)."""
    return chat.render_prompt(self.format, prompt)

  def encode_prompt(self, prompt: str, ids=None) -> list[int]:
    return chat.prompt_ids(self.format, self.tokenizer, prompt, ids=ids)

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int,
               stop: Sequence[str] = (), label: str = 'generate',
               prompt_ids: Sequence | None = None) -> list[str]:
    """Greedy completions of `prompts` (chat-formatted here), cut at the first stop string.
    `prompt_ids`: each prompt's own tokens where the caller has them (Example.prompt_ids;
    None entries are tokenized here)."""
    ids = [self.encode_prompt(p, i) for p, i in
           zip(prompts, prompt_ids if prompt_ids is not None else [None] * len(prompts))]
    for i, p in enumerate(ids):
      if len(p) + max_new_tokens > self.max_len:
        raise ValueError(f'prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} '
                         f'it exceeds the model context of {self.max_len}')
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))   # similar lengths batch together
    out: list[str] = [''] * len(ids)
    progress = Progress(len(ids), label) if self.verbose else None
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      t0 = time.perf_counter()
      gen = generate.greedy_generate(self.model, [ids[i] for i in chunk],
                                     max_new_tokens=max_new_tokens, eos_id=self.end_of_turn_id,
                                     pad_id=self.tokenizer.pad_id, multiple=self.bucket)
      self.stats['generate_s'] += time.perf_counter() - t0
      for i, row in zip(chunk, gen):
        row = [int(t) for t in row]
        row = row[:next((k for k, t in enumerate(row) if t in self.stop_ids), len(row))]
        self.stats['prefill_tokens'] += len(ids[i])
        self.stats['decode_tokens'] += len(row)
        out[i] = cut_at_stop(self.tokenizer.decode(row), stop)
      if progress:
        progress.update(len(chunk))
    return out

  def split_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of (context, continuation) as lm-evaluation-harness splits them
    (HFLM._encode_pair): trailing whitespace of the context moves to the continuation, the
    context is encoded on its own, and the continuation is what the joined text's tokens
    hold beyond the context's length."""
    text = chat.render_prompt(self.format, context)
    n = len(text) - len(text.rstrip())
    if n:
      text, continuation = text[:-n], text[-n:] + continuation
    ctx = self.tokenizer.encode(text, bos=self.format.bos)
    full = self.tokenizer.encode(text + continuation, bos=self.format.bos)
    if len(full) <= len(ctx):
      raise ValueError(f'continuation {continuation!r} adds no tokens to its context')
    return ctx, full[len(ctx):]

  def loglik(self, pairs: Sequence[tuple[str, str]], label: str = 'loglik'
             ) -> list[tuple[float, int, bool]]:
    """(sum log p(continuation | context), continuation tokens, greedy) for each pair."""
    seqs = []
    for context, continuation in pairs:
      ctx, cont = self.split_pair(context, continuation)
      if len(ctx) + len(cont) > self.max_len:
        raise ValueError(f'context + continuation is {len(ctx) + len(cont)} tokens, over the '
                         f'model context of {self.max_len}')
      seqs.append((ctx + cont, len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(seqs)
    graphdef, state = nnx.split(self.model)
    progress = Progress(len(seqs), label) if self.verbose else None
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      length = -(-max(len(seqs[i][0]) for i in chunk) // self.bucket) * self.bucket
      tokens = np.full((len(chunk), length), self.tokenizer.pad_id, np.int32)
      valid = np.zeros((len(chunk), length), bool)
      for r, i in enumerate(chunk):
        tokens[r, :len(seqs[i][0])] = seqs[i][0]
        valid[r, :len(seqs[i][0])] = True
      t0 = time.perf_counter()
      logp, greedy = _token_logprobs(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      self.stats['loglik_s'] += time.perf_counter() - t0
      for r, i in enumerate(chunk):
        n, cont = len(seqs[i][0]), seqs[i][1]
        # target index t-1 holds log p(token t); the continuation is tokens n-cont .. n-1
        sl = slice(n - cont - 1, n - 1)
        out[i] = (float(logp[r, sl].sum()), cont, bool(greedy[r, sl].all()))
        self.stats['loglik_tokens'] += n
      if progress:
        progress.update(len(chunk))
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  cut = len(text)
  for s in stop:
    i = text.find(s)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut]
