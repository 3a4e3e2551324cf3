"""SentencePiece tokenizer with Mistral's bos/eos conventions.

The Mistral v1 model (Mistral 7B v0.1 and Instruct v0.1/v0.2; vocabulary 32000,
bos=1, eos=2, unk=0, digits split one per token) is vendored in
data/tokenizers/mistral-v1.model; see data/tokenizers/README.md for its licence.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import sentencepiece as spm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISTRAL_V1 = os.path.join(REPO_ROOT, 'data', 'tokenizers', 'mistral-v1.model')


class TokenizerMismatchError(ValueError):
  """The tokenizer's vocabulary or special ids do not fit the model."""


class Tokenizer:
  """Wraps a sentencepiece model file: `Tokenizer(path).encode(text, bos=True)`."""

  def __init__(self, path: str = MISTRAL_V1):
    if not os.path.exists(path):
      raise FileNotFoundError(f'tokenizer model {path!r} does not exist')
    self.path = path
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.Load(path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f'{path!r} is not a sentencepiece model: {e}') from e
    self.vocab_size: int = self._sp.GetPieceSize()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    self.unk_id: int = self._sp.unk_id()
    # sentencepiece models usually define no pad piece; padding uses unk (0 for Mistral),
    # which padded positions never attend to or are trained on.
    self.pad_id: int = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.unk_id

  def __getstate__(self):  # picklable for Grain worker processes: reload from the file
    return {'path': self.path}

  def __setstate__(self, state):
    self.__init__(state['path'])

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    ids = self._sp.EncodeAsIds(text)
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_batch(self, texts: Sequence[str], *, bos: bool = True,
                   eos: bool = False) -> list[list[int]]:
    out = self._sp.EncodeAsIds(list(texts))
    return [([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else []) for ids in out]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`, with bos, eos and padding ids dropped."""
    specials = {self.bos_id, self.eos_id, self.pad_id}
    return self._sp.DecodeIds([int(i) for i in ids if int(i) not in specials])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def text_pieces(self) -> dict[str, int]:
    """{piece: id} of the pieces that stand for text (normal and user-defined ones; not
    control, unknown, unused or byte-fallback pieces)."""
    sp = self._sp
    return {sp.IdToPiece(i): i for i in range(self.vocab_size) if not (
        sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i) or sp.IsByte(i))}

  def check_model(self, cfg) -> None:
    """Raise TokenizerMismatchError when this tokenizer cannot drive a model with `cfg`.

    The model's vocabulary may be larger than the tokenizer's (padded embeddings),
    never smaller; bos/eos must agree with the model's config.
    """
    if self.vocab_size > cfg.vocab_size:
      raise TokenizerMismatchError(
          f'tokenizer {self.path!r} has {self.vocab_size} pieces but the model has '
          f'vocab_size={cfg.vocab_size}: token ids up to {self.vocab_size - 1} would index '
          f'past the embedding table')
    if (self.bos_id, self.eos_id) != (cfg.bos_token_id, cfg.eos_token_id):
      raise TokenizerMismatchError(
          f'tokenizer {self.path!r} has bos={self.bos_id}, eos={self.eos_id} but the model '
          f'config has bos_token_id={cfg.bos_token_id}, eos_token_id={cfg.eos_token_id}')
