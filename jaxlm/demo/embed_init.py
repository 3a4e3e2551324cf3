"""Compositional initialization of a from-scratch model's input embeddings.

A tokenizer with merged pieces (data/tokenizers/kv-tiny-pairs.model has one piece per pair
`3: 7, ` and per `7 and it is in Dictionary [`) gives every merged piece its own random
embedding, which shares nothing with the pieces it is made of: nothing tells the model that
`3: 7, ` and `3: 1}\n` are both pairs, or that `7 and it is in Dictionary [` names the value
of `3: 7, `. A small model trained from scratch has to discover that structure one rare
piece at a time (BENCHMARKS.md, "Merged pieces that start from their parts").

`compose_embeddings` starts each merged piece from what it is made of, as is done when new
pieces are added to a trained model's vocabulary: the embedding of a piece that splits into
shorter pieces of the vocabulary is the sum of their (random) embeddings divided by
sqrt(number of parts), which keeps the rows' scale. The split is the one with the fewest
parts (ties: the longest first part), computed on the initial embeddings, not recursively:
`3: 7, ` = `3: ` + `7` + `, `, so the key's part (`3: `, a piece of its own) stays apart
from the value's (`7`, the same row as the value in `7 and it is in Dictionary [`).

The trainer applies it through `init_hook='jaxlm.demo.embed_init:init_hook'` (configs/tiny_kv.py),
with the config field `embed_init` ('compose', or 'random' to keep the random rows).

  python -m jaxlm.demo.embed_init data/tokenizers/kv-tiny-pairs.model   # prints the splits
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

from jaxlm.tokenizer import Tokenizer


def piece_splits(tokenizer: Tokenizer) -> dict[int, tuple[int, ...]]:
  """{piece id: the ids of its split into >= 2 shorter pieces} for every normal or
  user-defined piece that has one. Control, unknown and byte pieces are never parts."""
  usable = tokenizer.text_pieces()
  longest = max(map(len, usable))
  splits = {}
  for piece, pid in usable.items():
    n = len(piece)
    if n < 2:
      continue
    # best[i]: the fewest-parts split of piece[i:] into pieces other than `piece` itself.
    best: list[tuple[int, ...] | None] = [None] * n + [()]
    for i in range(n - 1, -1, -1):
      for j in range(min(n, i + longest), i, -1):   # the longest first part first
        part = piece[i:j]
        if best[j] is None or part == piece or part not in usable:
          continue
        cand = (usable[part],) + best[j]
        if best[i] is None or len(cand) < len(best[i]):
          best[i] = cand
    if best[0] is not None and len(best[0]) >= 2:
      splits[pid] = best[0]
  return splits


def compose_embeddings(embed: np.ndarray, splits: dict[int, tuple[int, ...]]) -> np.ndarray:
  """A copy of `embed` [V, D] in which each row of `splits` is the scaled sum of its parts'
  rows of `embed` (the rows as given, so the result does not depend on the order)."""
  embed = np.asarray(embed)
  out = embed.copy()
  for pid, parts in splits.items():
    if pid >= embed.shape[0] or max(parts) >= embed.shape[0]:
      raise ValueError(f'piece {pid} or its parts {parts} index past the embedding table '
                       f'of {embed.shape[0]} rows: the tokenizer does not fit the model')
    out[pid] = embed[list(parts)].sum(0) / np.sqrt(len(parts))
  return out


def init_hook(model, tokenizer, c) -> None:
  """config.init_hook for a model initialized from scratch: with config.embed_init='compose'
  (the default) every merged piece's embedding starts from its parts (compose_embeddings)."""
  if _check(c) == 'compose':
    embed = model.embed[...]
    model.embed[...] = jnp.asarray(compose_embeddings(np.asarray(embed), piece_splits(tokenizer)),
                                   embed.dtype)


def _check(c) -> str:
  """The hook's config field embed_init, checked at start-up (config.validate)."""
  from jaxlm.config import ConfigError
  mode = c.get('embed_init', 'compose')
  if mode not in ('random', 'compose'):
    raise ConfigError(f"embed_init={mode!r} must be 'random' or 'compose'")
  return mode


init_hook.check = _check


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('tokenizer')
  args = p.parse_args(argv)
  tok = Tokenizer(args.tokenizer)
  splits = piece_splits(tok)
  for pid, parts in sorted(splits.items()):
    print(f'{pid:6d} {tok.id_to_piece(pid)!r} = ' + ' + '.join(repr(tok.id_to_piece(q))
                                                           for q in parts))
  print(f'{len(splits)} of {tok.vocab_size} pieces start from their parts')


if __name__ == '__main__':
  main()
