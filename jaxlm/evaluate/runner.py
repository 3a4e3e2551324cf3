"""The two model calls every suite is built from: greedy generation and log-likelihood.

`Runner.generate` wraps prompts in the chat format (jaxlm.chat; 'auto': the tokenizer's),
batches them by length, decodes greedily with the KV cache (jaxlm.generate), ends each
output at the format's end-of-turn token (or eos) and cuts it at the suite's stop strings.
`Runner.loglik` scores continuations given contexts, as multiple-choice benchmarks need:
the sum of the continuation tokens' log-probabilities, their count, and whether greedy
decoding would have produced them. Pairs that share a context (a question's choices) share
its forward pass: the context is prefilled once into a KV cache, which is copied for each
choice and the choices' tokens run against it (`share_context=False`: every pair as one
sequence, the reference the shared path is tested against). Both count tokens and time (prefill and decode) for
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
from jaxlm.model import KVCache


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


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _shared_logprobs(graphdef, state, ctx_BxP, ctx_valid_BxP, cont_BxCxL, cont_valid_BxCxL):
  """log p of each continuation token given its context and the continuation before it
  ([B, C, L]) and whether each is the argmax; each context (left-padded) runs once."""
  model = nnx.merge(graphdef, state)
  B, P = ctx_BxP.shape
  C, L = cont_BxCxL.shape[1:]
  positions = generate.prompt_positions(ctx_valid_BxP)
  cache = KVCache.init(model.cfg, B, P + L)
  last, cache = model.decode(ctx_BxP, positions, ctx_valid_BxP.astype(jnp.int32), cache,
                             last_only=True, prefill=True)                     # [B, 1, V]
  axis = 1 if model.cfg.scan_layers else 0                         # the cache's batch axis
  rep = lambda x, ax=0: jnp.repeat(x, C, axis=ax)
  cache = KVCache(k=jax.tree.map(lambda x: rep(x, axis), cache.k),
                  v=jax.tree.map(lambda x: rep(x, axis), cache.v),
                  positions_BxS=rep(cache.positions_BxS),
                  segment_ids_BxS=rep(cache.segment_ids_BxS), index=cache.index)
  cont = cont_BxCxL.reshape(B * C, L)
  start = rep(positions[:, -1] + 1)[:, None]
  logits, _ = model.decode(cont, start + jnp.arange(L)[None],
                           cont_valid_BxCxL.reshape(B * C, L).astype(jnp.int32), cache)
  # token j is predicted by the context's last position (j = 0) or continuation token j - 1
  logits = jnp.concatenate([rep(last), logits[:, :-1]], axis=1).reshape(B, C, L, -1)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  picked = jnp.take_along_axis(logp, cont_BxCxL[..., None], axis=-1)[..., 0]
  greedy = jnp.argmax(logits, axis=-1) == cont_BxCxL
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
    (HFLM._encode_pair): the context is encoded on its own and the continuation is what the
    joined text's tokens hold beyond the context's length; for a raw prompt (no chat
    template) trailing whitespace of the context moves to the continuation first, as there.
    A chat-formatted context keeps its own ending (ChatML's newline after the assistant
    header), so it is exactly the prompt generation reads."""
    text = chat.render_prompt(self.format, context)
    n = len(text) - len(text.rstrip())
    if n and self.format.turn == '{prompt}':
      text, continuation = text[:-n], text[-n:] + continuation
    ctx = self.tokenizer.encode(text, bos=self.format.bos)
    full = self.tokenizer.encode(text + continuation, bos=self.format.bos)
    if len(full) <= len(ctx):
      raise ValueError(f'continuation {continuation!r} adds no tokens to its context')
    return ctx, full[len(ctx):]

  def loglik(self, pairs: Sequence[tuple[str, str]], label: str = 'loglik', *,
             share_context: bool = True) -> list[tuple[float, int, bool]]:
    """(sum log p(continuation | context), continuation tokens, greedy) for each pair."""
    split = []
    for context, continuation in pairs:
      ctx, cont = self.split_pair(context, continuation)
      if len(ctx) + len(cont) > self.max_len:
        raise ValueError(f'context + continuation is {len(ctx) + len(cont)} tokens, over the '
                         f'model context of {self.max_len}')
      split.append((ctx, cont))
    if share_context:
      return self._loglik_shared(split, label)
    seqs = [(ctx + cont, len(cont)) for ctx, cont in split]
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


  def _loglik_shared(self, split, label):
    """loglik with one prefill per distinct context (pairs grouped by context tokens)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, _) in enumerate(split):
      groups.setdefault(tuple(ctx), []).append(i)
    keys = sorted(groups, key=len)   # similar context lengths batch together
    out: list[tuple[float, int, bool]] = [(0.0, 0, False)] * len(split)
    graphdef, state = nnx.split(self.model)
    progress = Progress(len(split), label) if self.verbose else None
    for start in range(0, len(keys), self.batch_size):
      chunk = keys[start:start + self.batch_size]
      C = max(len(groups[k]) for k in chunk)
      L = -(-max(len(split[i][1]) for k in chunk for i in groups[k]) // 8) * 8
      ctx_tokens, ctx_valid = generate.left_pad([list(k) for k in chunk], self.tokenizer.pad_id,
                                                self.bucket)
      cont = np.full((len(chunk), C, L), self.tokenizer.pad_id, np.int32)
      valid = np.zeros((len(chunk), C, L), bool)
      for b, k in enumerate(chunk):
        for c, i in enumerate(groups[k]):
          toks = split[i][1]
          cont[b, c, :len(toks)] = toks
          valid[b, c, :len(toks)] = True
      t0 = time.perf_counter()
      logp, greedy = _shared_logprobs(graphdef, state, jnp.asarray(ctx_tokens),
                                      jnp.asarray(ctx_valid), jnp.asarray(cont),
                                      jnp.asarray(valid))
      logp, greedy = np.asarray(logp), np.asarray(greedy)
      self.stats['loglik_s'] += time.perf_counter() - t0
      for b, k in enumerate(chunk):
        self.stats['loglik_tokens'] += len(k)
        for c, i in enumerate(groups[k]):
          n = len(split[i][1])
          out[i] = (float(logp[b, c, :n].sum()), n, bool(greedy[b, c, :n].all()))
          self.stats['loglik_tokens'] += n
      if progress:
        progress.update(sum(len(groups[k]) for k in chunk))
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  cut = len(text)
  for s in stop:
    i = text.find(s)
    if i >= 0:
      cut = min(cut, i)
  return text[:cut]
