"""Tokenizers behind one interface: sentencepiece (Mistral) and byte-level BPE (SmolLM2,
Llama 3, Qwen2) on the Hugging Face `tokenizers` library.

    tok = load_tokenizer('embedded:smollm2-135m-instruct')   # or a .model, .gguf, HF dir
    tok.encode(text, bos=True)        # bos only where the tokenizer's convention adds one
    tok.decode(ids)                   # special tokens (bos, eos, pad, ...) dropped

Both classes share: `encode(text, *, bos=True, eos=False)`, `encode_batch`, `decode(ids, *,
skip_special=True)`, `vocab_size`, `bos_id`, `eos_id`, `pad_id`, `unk_id`, `add_bos`,
`chat_template` (None when the checkpoint has none), `id_to_piece`, `token_to_id`,
`text_pieces()`, `check_model(cfg)`, and they pickle (for Grain worker processes).

`bos=True` asks for the tokenizer's own convention: `add_bos` is True for sentencepiece
models (Mistral's) and what the checkpoint states for BPE ones (SmolLM2: `add_bos_token`
false, so no bos; Llama 3: a bos). `bos=False` never adds one.

The Mistral v1 model (Mistral 7B v0.1 and Instruct v0.1/v0.2; vocabulary 32000,
bos=1, eos=2, unk=0, digits split one per token) is vendored in
data/tokenizers/mistral-v1.model; see data/tokenizers/README.md for its licence.

GGUF files (llama.cpp) carry their tokenizer as metadata; `BPETokenizer.from_gguf` builds
the byte-level BPE one (`tokenizer.ggml.model = 'gpt2'`) from the vocabulary, the merges,
the token types (control tokens become special tokens, never split) and the
pre-tokenizer name `tokenizer.ggml.pre` (GGUF_PRE_TOKENIZERS). 'smollm' is llama.cpp's:
every digit on its own, then the GPT-2 byte-level split, as the `Digits` + `ByteLevel`
pre-tokenizer of SmolLM2's own tokenizer.json. (transformers' GGUF reader, 5.24, has no
entry for 'smollm' and applies the byte-level split alone; the two differ only where a run
of two or more whitespace characters precedes a digit, e.g. 'a  1', which transformers'
reader splits 'a', ' ', ' 1' and this one 'a', '  ', '1'.)
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

import sentencepiece as spm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MISTRAL_V1 = os.path.join(REPO_ROOT, 'data', 'tokenizers', 'mistral-v1.model')


class TokenizerMismatchError(ValueError):
  """The tokenizer's vocabulary or special ids do not fit the model."""


def _check_model(tok, cfg) -> None:
  if tok.vocab_size > cfg.vocab_size:
    raise TokenizerMismatchError(
        f'tokenizer {tok.path!r} has {tok.vocab_size} pieces but the model has '
        f'vocab_size={cfg.vocab_size}: token ids up to {tok.vocab_size - 1} would index '
        f'past the embedding table')
  if (tok.bos_id, tok.eos_id) != (cfg.bos_token_id, cfg.eos_token_id):
    raise TokenizerMismatchError(
        f'tokenizer {tok.path!r} has bos={tok.bos_id}, eos={tok.eos_id} but the model '
        f'config has bos_token_id={cfg.bos_token_id}, eos_token_id={cfg.eos_token_id}')


class Tokenizer:
  """Wraps a sentencepiece model file: `Tokenizer(path).encode(text, bos=True)`."""

  kind = 'sentencepiece'
  add_bos = True          # Mistral's convention: every sequence starts with bos
  chat_template = None    # a sentencepiece file holds no chat template

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

  def __repr__(self):
    return f'Tokenizer({self.path!r})'

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    return self._wrap(self._sp.EncodeAsIds(text), bos, eos)

  def encode_batch(self, texts: Sequence[str], *, bos: bool = True,
                   eos: bool = False) -> list[list[int]]:
    return [self._wrap(ids, bos, eos) for ids in self._sp.EncodeAsIds(list(texts))]

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    """Text of `ids`: bos, eos and padding ids dropped, or (skip_special=False) written as
    their pieces ('<s>', '</s>')."""
    ids = [int(i) for i in ids]
    if skip_special:
      specials = {self.bos_id, self.eos_id, self.pad_id}
      return self._sp.DecodeIds([i for i in ids if i not in specials])
    out, run = [], []
    for i in ids:   # control pieces decode to '': write them out between runs of text
      if self._sp.IsControl(i):
        out += [self._sp.DecodeIds(run), self._sp.IdToPiece(i)]
        run = []
      else:
        run.append(i)
    return ''.join(out + [self._sp.DecodeIds(run)])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def save_hf(self, path: str) -> None:
    """Copy the sentencepiece model into a Hugging Face directory as tokenizer.model."""
    import shutil
    os.makedirs(path, exist_ok=True)
    shutil.copyfile(self.path, os.path.join(path, 'tokenizer.model'))

  def token_to_id(self, piece: str) -> int | None:
    """The id of a piece ('</s>', '▁key'), None when the vocabulary lacks it."""
    i = self._sp.PieceToId(piece)
    return None if i == self.unk_id and piece != self._sp.IdToPiece(self.unk_id) else i

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
    _check_model(self, cfg)


# ---------------------------------------------------------------------------------------
# Byte-level BPE

def byte_alphabet() -> dict[int, str]:
  """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the
  others (controls, space, ...) for chr(256 + k) in byte order."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
          *range(ord('®'), ord('ÿ') + 1)]
  table, extra = {}, 0
  for b in range(256):
    if b in keep:
      table[b] = chr(b)
    else:
      table[b] = chr(256 + extra)
      extra += 1
  return table


# Split patterns of byte-level vocabularies (applied before the byte-level mapping).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r'\p{N}{1,3}', r'\p{N}')

# tokenizer.ggml.pre -> (digits one by one first?, split pattern or None for GPT-2's own).
GGUF_PRE_TOKENIZERS: dict[str, tuple[bool, str | None]] = {
    'gpt-2': (False, None),
    'smollm': (True, None),
    'llama-bpe': (False, LLAMA3_SPLIT),
    'qwen2': (False, QWEN2_SPLIT),
}

_CONTROL, _USER_DEFINED = 3, 4   # GGUF token types (llama.cpp's llama_token_type)
_GGUF_CACHE: dict[tuple, dict] = {}   # (file, mtime, size) -> BPETokenizer state


def _pre_tokenizer(digits: bool, split: str | None):
  from tokenizers import Regex, pre_tokenizers as pt
  if split is None:
    steps = [pt.ByteLevel(add_prefix_space=False, use_regex=True)]
  else:
    steps = [pt.Split(Regex(split), behavior='isolated'),
             pt.ByteLevel(add_prefix_space=False, use_regex=False)]
  if digits:
    steps.insert(0, pt.Digits(individual_digits=True))
  return steps[0] if len(steps) == 1 else pt.Sequence(steps)


def _special_content(v) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  if isinstance(v, dict):
    return v.get('content')
  return v if isinstance(v, str) else None


class BPETokenizer:
  """Byte-level BPE on the Hugging Face `tokenizers` library, with the sentencepiece
  `Tokenizer`'s interface. Build it with `from_hf_dir(path)` or `from_gguf(path)` (or
  `load_tokenizer`)."""

  kind = 'bpe'

  def __init__(self, tokenizer, *, path: str, bos_id: int | None, eos_id: int | None,
               pad_id: int | None = None, unk_id: int | None = None, add_bos: bool = False,
               chat_template: str | None = None):
    self._tok = tokenizer
    self.path = path
    self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
    self.pad_id = pad_id if pad_id is not None else eos_id
    self.add_bos = bool(add_bos) and bos_id is not None
    self.chat_template = chat_template
    self._special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
    self._special_ids |= {i for i in (bos_id, eos_id, self.pad_id) if i is not None}

  # -- construction ----------------------------------------------------------------------

  @classmethod
  def from_hf_dir(cls, path: str) -> 'BPETokenizer':
    """A Hugging Face tokenizer directory: tokenizer.json, with bos/eos/pad from
    tokenizer_config.json (or special_tokens_map.json) and the chat template from
    tokenizer_config.json, chat_template.jinja or chat_template.json."""
    from tokenizers import Tokenizer as HFTokenizer
    file = os.path.join(path, 'tokenizer.json')
    if not os.path.isfile(file):
      raise FileNotFoundError(f'{path!r} has no tokenizer.json')
    try:
      tok = HFTokenizer.from_file(file)
    except Exception as e:  # noqa: BLE001  (tokenizers raises plain Exceptions)
      raise ValueError(f'{file!r} is not a Hugging Face tokenizer.json: {e}') from e

    def read(name):
      f = os.path.join(path, name)
      if not os.path.isfile(f):
        return {}
      with open(f) as fh:
        return json.load(fh)
    config = {**read('special_tokens_map.json'), **read('tokenizer_config.json')}

    def special_id(key):
      content = _special_content(config.get(key))
      if content is None:
        return None
      i = tok.token_to_id(content)
      if i is None:
        raise ValueError(f'{path}: {key}={content!r} is not in the vocabulary of tokenizer.json')
      return i
    bos, eos, pad, unk = (special_id(k) for k in ('bos_token', 'eos_token', 'pad_token',
                                                  'unk_token'))
    # add_bos: stated, or what tokenizer.json's own post-processor does (Llama 3's adds bos)
    add_bos = config.get('add_bos_token')
    if add_bos is None:
      add_bos = bos is not None and tok.encode('', add_special_tokens=True).ids[:1] == [bos]
    template = config.get('chat_template')
    if template is None and os.path.isfile(os.path.join(path, 'chat_template.jinja')):
      with open(os.path.join(path, 'chat_template.jinja')) as f:
        template = f.read()
    if template is None:
      template = read('chat_template.json').get('chat_template')
    if isinstance(template, list):   # named templates: the default one
      named = {t.get('name'): t.get('template') for t in template}
      template = named.get('default', next(iter(named.values()), None))
    # post-processing (bos, eos) is done by encode(): tokenizer.json's own is switched off
    tok.post_processor = None
    return cls(tok, path=path, bos_id=bos, eos_id=eos, pad_id=pad, unk_id=unk,
               add_bos=bool(add_bos), chat_template=template)

  @classmethod
  def from_gguf(cls, path: str) -> 'BPETokenizer':
    """The tokenizer in a GGUF file's metadata (fields only; no tensor is read), built once
    per file and process."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f'GGUF file {path!r} does not exist')
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_mtime_ns, st.st_size)
    if key not in _GGUF_CACHE:
      _GGUF_CACHE[key] = cls._read_gguf(path).__getstate__()
    out = cls.__new__(cls)
    out.__setstate__({**_GGUF_CACHE[key], 'path': path})
    return out

  @classmethod
  def _read_gguf(cls, path: str) -> 'BPETokenizer':
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models

    from jaxlm import gguf
    field = gguf.read_header(path).fields.get   # GGUFError (a ValueError) names a bad file
    model = field('tokenizer.ggml.model')
    if model != 'gpt2':
      raise ValueError(
          f"{path}: tokenizer.ggml.model={model!r} is not supported: jaxlm builds byte-level "
          f"BPE tokenizers ('gpt2') from GGUF files; convert the checkpoint to a Hugging Face "
          f"directory (tokenizer.json or tokenizer.model) instead")
    pre = field('tokenizer.ggml.pre')
    if pre not in GGUF_PRE_TOKENIZERS:
      raise ValueError(f'{path}: tokenizer.ggml.pre={pre!r} is not supported; jaxlm knows '
                       f'{sorted(GGUF_PRE_TOKENIZERS)}')
    tokens = list(field('tokenizer.ggml.tokens'))
    merges = field('tokenizer.ggml.merges')
    if merges is None:
      raise ValueError(f'{path}: a gpt2 tokenizer without tokenizer.ggml.merges')
    types = list(field('tokenizer.ggml.token_type', [1] * len(tokens)))
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                                 [tuple(m.split(' ', 1)) for m in merges]))
    tok.pre_tokenizer = _pre_tokenizer(*GGUF_PRE_TOKENIZERS[pre])
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, ...) are special: matched whole in text, never split.
    # One written outside the byte alphabet is not a real token of a byte-level vocabulary
    # (a mislabelled text piece) and is left out, as transformers' reader does.
    alphabet = set(byte_alphabet().values())
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types)
                            if ty == _CONTROL and set(t) <= alphabet])
    tok.add_tokens([AddedToken(t, normalized=False, special=False)
                    for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

    def token_id(key):
      i = field(f'tokenizer.ggml.{key}')
      return None if i is None else int(i)
    return cls(tok, path=path, bos_id=token_id('bos_token_id'), eos_id=token_id('eos_token_id'),
               pad_id=token_id('padding_token_id'), unk_id=token_id('unknown_token_id'),
               add_bos=bool(field('tokenizer.ggml.add_bos_token', False)),
               chat_template=field('tokenizer.chat_template'))

  # -- pickling: the built tokenizer travels as JSON (no file is read again) -------------

  def __getstate__(self):
    state = {k: v for k, v in self.__dict__.items() if k not in ('_tok', '_special_ids')}
    return {**state, '_tok': self._tok.to_str()}

  def __setstate__(self, state):
    from tokenizers import Tokenizer as HFTokenizer
    state = dict(state)
    tok = HFTokenizer.from_str(state.pop('_tok'))
    add_bos = state.pop('add_bos')
    self.__init__(tok, add_bos=add_bos, **{k: state[k] for k in (
        'path', 'bos_id', 'eos_id', 'pad_id', 'unk_id', 'chat_template')})

  def __repr__(self):
    return f'BPETokenizer({self.path!r})'

  # -- the interface ---------------------------------------------------------------------

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    if eos and self.eos_id is None:
      raise ValueError(f'tokenizer {self.path!r} has no eos token')
    return ([self.bos_id] if bos and self.add_bos else []) + ids + ([self.eos_id] if eos else [])

  def encode(self, text: str, *, bos: bool = True, eos: bool = False) -> list[int]:
    """Token ids of `text`; special tokens written in it (<|im_start|>) become their ids."""
    return self._wrap(self._tok.encode(text, add_special_tokens=False).ids, bos, eos)

  def encode_batch(self, texts: Sequence[str], *, bos: bool = True,
                   eos: bool = False) -> list[list[int]]:
    return [self._wrap(e.ids, bos, eos)
            for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
    """Text of `ids`: special tokens (bos, eos, padding, <|im_start|>, ...) dropped, or
    (skip_special=False) written out."""
    ids = [int(i) for i in ids]
    if skip_special:
      ids = [i for i in ids if i not in self._special_ids]
    return self._tok.decode(ids, skip_special_tokens=False)

  def id_to_piece(self, i: int) -> str:
    piece = self._tok.id_to_token(int(i))
    if piece is None:
      raise IndexError(f'token id {i} is outside the vocabulary of {self.vocab_size}')
    return piece

  def save_hf(self, path: str) -> None:
    """Write tokenizer.json and tokenizer_config.json (special tokens, add_bos_token, chat
    template) into a Hugging Face directory, for transformers and `from_hf_dir`."""
    os.makedirs(path, exist_ok=True)
    self._tok.save(os.path.join(path, 'tokenizer.json'))
    piece = lambda i: None if i is None else self._tok.id_to_token(i)
    config = {'tokenizer_class': 'PreTrainedTokenizerFast', 'add_bos_token': self.add_bos,
              'bos_token': piece(self.bos_id), 'eos_token': piece(self.eos_id),
              'pad_token': piece(self.pad_id), 'unk_token': piece(self.unk_id)}
    if self.chat_template:
      config['chat_template'] = self.chat_template
    with open(os.path.join(path, 'tokenizer_config.json'), 'w') as f:
      json.dump(config, f, indent=2)

  def token_to_id(self, piece: str) -> int | None:
    """The id of a vocabulary entry ('<|im_end|>', 'Ġkey'), None when there is none."""
    return self._tok.token_to_id(piece)

  def text_pieces(self) -> dict[str, int]:
    """{piece: id} of the pieces that stand for text (all but the special tokens)."""
    return {p: i for p, i in self._tok.get_vocab(with_added_tokens=True).items()
            if i not in self._special_ids}

  def check_model(self, cfg) -> None:
    """As `Tokenizer.check_model`: vocabulary within the model's, same bos/eos."""
    _check_model(self, cfg)


def load_tokenizer(spec: str):
  """The tokenizer a spec names:
  - `embedded:NAME`: the embedded model's file (jaxlm.embedded), then as below;
  - a `.gguf` file: the byte-level BPE tokenizer in its metadata;
  - a directory with tokenizer.json (BPE) or tokenizer.model (sentencepiece), or either file;
  - a sentencepiece `.model` file.
  Anything else: FileNotFoundError or ValueError naming the spec."""
  from jaxlm import embedded
  if not isinstance(spec, str) or not spec:
    raise ValueError(f'tokenizer spec {spec!r} must be a path or embedded:NAME')
  path = embedded.resolve(spec)   # EmbeddedModelError (a FileNotFoundError) when missing
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, 'tokenizer.json')):
      return BPETokenizer.from_hf_dir(path)
    if os.path.isfile(os.path.join(path, 'tokenizer.model')):
      return Tokenizer(os.path.join(path, 'tokenizer.model'))
    raise FileNotFoundError(f'tokenizer directory {spec!r} has neither tokenizer.json nor '
                            f'tokenizer.model')
  if not os.path.exists(path):
    raise FileNotFoundError(f'tokenizer {spec!r} does not exist (expected a sentencepiece '
                            f'.model, a .gguf file, a Hugging Face directory or embedded:NAME)')
  if path.endswith('.gguf'):
    return BPETokenizer.from_gguf(path)
  if os.path.basename(path) == 'tokenizer.json':
    return BPETokenizer.from_hf_dir(os.path.dirname(path) or '.')
  if path.endswith('.model'):
    return Tokenizer(path)
  raise ValueError(f'cannot tell which tokenizer {spec!r} is: expected a sentencepiece .model, '
                   f'a .gguf file, a Hugging Face directory (tokenizer.json) or embedded:NAME')
