"""Batched greedy decoding with a KV cache.

Prompts of different lengths are left-padded to a common length P. Padding tokens
get segment id 0 and real tokens segment id 1, so real tokens never attend to
padding; positions count real tokens only (0 for the first real token), matching
Hugging Face's `generate` with an attention mask. Decoding runs inside one
`jax.lax.while_loop` and stops when every row has emitted eos or after
`max_new_tokens` tokens. The prefill attends among the prompt tokens only
(`Mistral.decode(prefill=True)`: the chunked kernel on CPU, see
jaxlm.attention.prefill_impl); `prefill_kernels=False` attends over the whole cache buffer
instead, as decoding steps do (the same result; the reference the benchmark compares
against). `greedy_generate_nocache` is the slow reference: it re-runs the full
forward pass on a fixed buffer each step.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.model import KVCache, Mistral


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0,
             multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (tokens_BxP, valid_BxP) left-padded to a length that is a multiple
  of `multiple` (bucketing keeps the number of compiled shapes small)."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError('every prompt needs at least one token')
  length = -(-max(len(p) for p in prompts) // multiple) * multiple
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  valid = np.zeros((len(prompts), length), bool)
  for i, p in enumerate(prompts):
    tokens[i, length - len(p):] = p
    valid[i, length - len(p):] = True
  return tokens, valid


def prompt_positions(valid_BxP):
  """Positions of left-padded prompts: 0..n-1 over each row's real tokens, and 0..p-1
  over its padding (which real tokens never see): positions run 0..n-1 within each
  segment, so `Mistral.decode(..., prefill=True)` applies."""
  valid = valid_BxP.astype(jnp.int32)
  return jnp.where(valid_BxP, jnp.cumsum(valid, axis=1), jnp.cumsum(1 - valid, axis=1)) - 1


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'eos_id', 'pad_id',
                                             'prefill'))
def _greedy_cached(graphdef, state, tokens_BxP, valid_BxP, *, max_new_tokens, eos_id, pad_id,
                   prefill=True):
  model = nnx.merge(graphdef, state)
  B, P = tokens_BxP.shape
  positions_BxP = prompt_positions(valid_BxP)
  cache = KVCache.init(model.cfg, B, P + max_new_tokens)
  logits, cache = model.decode(tokens_BxP, positions_BxP, valid_BxP.astype(jnp.int32), cache,
                               last_only=True, prefill=prefill)
  first = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
  out = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
  done = jnp.zeros((B,), bool)
  eos = -1 if eos_id is None else eos_id

  def cond(carry):
    i, _, _, done, _, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    i, token_B, position_B, done, out, cache = carry
    out = out.at[:, i].set(jnp.where(done, pad_id, token_B))
    done = done | (token_B == eos)
    logits, cache = model.decode(token_B[:, None], position_B[:, None],
                                 jnp.ones((B, 1), jnp.int32), cache)
    token_B = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)
    return i + 1, token_B, position_B + 1, done, out, cache

  carry = (jnp.int32(0), first, positions_BxP[:, -1] + 1, done, out, cache)
  return jax.lax.while_loop(cond, body, carry)[4]


def greedy_generate(model: Mistral, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    eos_id: int | None = None, pad_id: int = 0, multiple: int = 1,
                    prefill_kernels: bool = True) -> np.ndarray:
  """Greedy continuation of each prompt: int32 [B, max_new_tokens].

  A row that emits eos keeps the eos token and is padded with pad_id afterwards.
  prefill_kernels=False: the prefill attends over the whole cache buffer (module docstring).
  """
  if max_new_tokens <= 0:
    raise ValueError(f'max_new_tokens must be positive, got {max_new_tokens}')
  tokens, valid = left_pad(prompts, pad_id, multiple)
  graphdef, state = nnx.split(model)
  return np.asarray(_greedy_cached(graphdef, state, jnp.asarray(tokens), jnp.asarray(valid),
                                   max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                                   prefill=prefill_kernels))


def greedy_generate_nocache(model: Mistral, prompts: Sequence[Sequence[int]], *,
                            max_new_tokens: int, eos_id: int | None = None,
                            pad_id: int = 0) -> np.ndarray:
  """Reference decoder: the full forward pass over a fixed [B, P + N] buffer each step.

  Causal masking by position makes the not-yet-generated tail of the buffer invisible.
  """
  tokens, valid = left_pad(prompts, pad_id)
  B, P = tokens.shape
  buf = np.concatenate([tokens, np.full((B, max_new_tokens), pad_id, np.int32)], axis=1)
  segments = np.concatenate([valid, np.ones((B, max_new_tokens), bool)], 1).astype(np.int32)
  positions = np.maximum(np.cumsum(segments, axis=1) - 1, 0).astype(np.int32)
  forward = nnx.jit(lambda m, t, p, s: m(t, p, segment_ids_BxT=s))
  out = np.full((B, max_new_tokens), pad_id, np.int32)
  done = np.zeros(B, bool)
  for i in range(max_new_tokens):
    logits = np.asarray(forward(model, jnp.asarray(buf), jnp.asarray(positions),
                                jnp.asarray(segments)))
    token = logits[:, P + i - 1].argmax(-1).astype(np.int32)
    out[:, i] = np.where(done, pad_id, token)
    buf[:, P + i] = token
    done |= token == (-1 if eos_id is None else eos_id)
    if done.all():
      break
  return out
