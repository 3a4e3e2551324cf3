"""Chat formats as data: how a prompt is wrapped, and how an assistant answer ends.

    fmt = resolve('auto', tokenizer)          # or 'mistral' | 'chatml' | 'llama3' | 'none'
    ids = prompt_ids(fmt, tokenizer, prompt)  # what the model reads before it answers
    eot = end_of_turn_id(fmt, tokenizer)      # the token that closes the answer

A conversation of user prompts p1, p2, ... and answers a1, a2, ... is rendered as

    [bos] system_block(system) first_turn(p1) a1 <end_of_turn> after_turn turn(p2) a2 ...

where each piece of text is a field of the format's `ChatFormat` (no per-format code).
The answer is tokenized on its own and the end-of-turn token appended by id, so the
answer-only loss covers exactly the answer and its end-of-turn token; `after_turn` (ChatML's
newline) is text between turns that no loss is taken on.

- 'mistral': `<s>[INST] {prompt} [/INST]{answer}</s>` (Mistral 7B Instruct v0.1/v0.2; no
  system message).
- 'chatml': `<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{prompt}<|im_end|>\\n
  <|im_start|>assistant\\n{answer}<|im_end|>\\n`, with SmolLM2-Instruct's default system
  message, exactly as its chat template renders with add_generation_prompt=True.
- 'llama3': `<|begin_of_text|><|start_header_id|>user<|end_header_id|>\\n\\n{prompt}<|eot_id|>
  <|start_header_id|>assistant<|end_header_id|>\\n\\n{answer}<|eot_id|>`: Llama 3 Instruct's
  template, which writes a system block only when a system message is given. Llama 3.1 and
  3.2's templates always add a system block with "Cutting Knowledge Date: December 2023" and
  today's date; that block is not rendered here (pass it as `system` to have it).
- 'none': the raw prompt (the from-scratch demo), bos by the tokenizer's convention, eos
  closes the answer.
- 'plain': the raw prompt without bos, eos closes the answer: what lm-evaluation-harness
  feeds a causal model unless asked for a chat template (its HF model encodes with
  add_special_tokens=False); the general benchmarks' default.

`detect_chat_format(tokenizer)` picks one from the tokenizer's chat template (or, without
one, its vocabulary); `resolve('auto', tokenizer)` goes through it, any other name
overrides it.
"""

from __future__ import annotations

import dataclasses
import weakref


class ChatFormatError(ValueError):
  """An unknown chat format, or one the tokenizer cannot render."""


@dataclasses.dataclass(frozen=True)
class ChatFormat:
  name: str
  turn: str                   # a user turn and the assistant header: '{prompt}' is the prompt
  bos: bool                   # encode(..., bos=bos) for the first turn (the tokenizer's own
                              # convention decides whether a bos id is then added)
  end_of_turn: str | None     # the token closing an assistant answer; None: the tokenizer's eos
  after_turn: str = ''        # text after end_of_turn, before the next user turn (no loss)
  begin: str = ''             # text before everything (llama3's <|begin_of_text|>)
  system_block: str | None = None   # '{system}' rendering; None: no system messages
  system: str | None = None   # default system message (None: no system block)
  special_tokens: tuple[str, ...] = ()   # tokens written as text that must be single ids
  markers: tuple[str, ...] = ()          # chat-template substrings that identify the format


SMOLLM2_SYSTEM = 'You are a helpful AI assistant named SmolLM, trained by Hugging Face'

FORMATS: dict[str, ChatFormat] = {f.name: f for f in (
    ChatFormat('mistral', turn='[INST] {prompt} [/INST]', bos=True, end_of_turn='</s>',
               markers=('[INST]',)),
    ChatFormat('chatml', turn='<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n',
               bos=False, end_of_turn='<|im_end|>', after_turn='\n',
               system_block='<|im_start|>system\n{system}<|im_end|>\n', system=SMOLLM2_SYSTEM,
               special_tokens=('<|im_start|>', '<|im_end|>'), markers=('<|im_start|>',)),
    ChatFormat('llama3', turn=('<|start_header_id|>user<|end_header_id|>\n\n{prompt}<|eot_id|>'
                               '<|start_header_id|>assistant<|end_header_id|>\n\n'),
               bos=False, end_of_turn='<|eot_id|>', begin='<|begin_of_text|>',
               system_block='<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>',
               special_tokens=('<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>',
                               '<|eot_id|>'),
               markers=('<|start_header_id|>',)),
    ChatFormat('none', turn='{prompt}', bos=True, end_of_turn=None),
    ChatFormat('plain', turn='{prompt}', bos=False, end_of_turn=None),
)}
AUTO = 'auto'
NAMES = (*FORMATS, AUTO)
DETECT_ORDER = ('chatml', 'llama3', 'mistral')   # template markers, first match wins


def get_format(chat_format: str | ChatFormat) -> ChatFormat:
  """The format of a name (not 'auto', which needs a tokenizer: see `resolve`)."""
  if isinstance(chat_format, ChatFormat):
    return chat_format
  if chat_format == AUTO:
    raise ChatFormatError("chat_format='auto' is chosen from a tokenizer: use "
                          "resolve('auto', tokenizer)")
  if chat_format not in FORMATS:
    raise ChatFormatError(f'chat_format={chat_format!r} must be one of {list(NAMES)}')
  return FORMATS[chat_format]


def detect_chat_format(tokenizer) -> str:
  """The format name of a tokenizer's checkpoint: its chat template's markers
  (<|im_start|> -> chatml, <|start_header_id|> -> llama3, [INST] -> mistral); without a
  template, the vocabulary's special tokens; a sentencepiece tokenizer without either is
  Mistral's."""
  template = getattr(tokenizer, 'chat_template', None)
  if template:
    for name in DETECT_ORDER:
      if any(m in template for m in FORMATS[name].markers):
        return name
    raise ChatFormatError(f'cannot tell the chat format of the chat template of '
                          f'{getattr(tokenizer, "path", tokenizer)!r}; set chat_format to one of '
                          f'{list(FORMATS)}')
  for name in DETECT_ORDER:
    fmt = FORMATS[name]
    if fmt.special_tokens and all(tokenizer.token_to_id(t) is not None
                                  for t in fmt.special_tokens):
      return name
  if getattr(tokenizer, 'kind', None) == 'sentencepiece':
    return 'mistral'
  raise ChatFormatError(f'tokenizer {getattr(tokenizer, "path", tokenizer)!r} has no chat '
                        f'template to choose a chat format from; set chat_format to one of '
                        f'{list(FORMATS)}')


def resolve(chat_format: str | ChatFormat, tokenizer) -> ChatFormat:
  """The format a name means for `tokenizer` ('auto': detect_chat_format), checked: every
  special token it writes as text encodes to its single id, and its end-of-turn token is
  in the vocabulary."""
  fmt = get_format(detect_chat_format(tokenizer) if chat_format == AUTO else chat_format)
  for t in fmt.special_tokens:
    i = tokenizer.token_to_id(t)
    if i is None or tokenizer.encode(t, bos=False) != [i]:
      raise ChatFormatError(
          f'chat_format={fmt.name!r} writes the special token {t!r}, which tokenizer '
          f'{getattr(tokenizer, "path", tokenizer)!r} does not encode as one token; use the '
          f"checkpoint's own format (chat_format='auto')")
  end_of_turn_id(fmt, tokenizer)
  return fmt


def end_of_turn_id(fmt: ChatFormat, tokenizer) -> int:
  """The id of the token that closes an assistant answer."""
  if fmt.end_of_turn is None:
    if tokenizer.eos_id is None:
      raise ChatFormatError(f'chat_format={fmt.name!r} ends answers with eos, which tokenizer '
                            f'{getattr(tokenizer, "path", tokenizer)!r} lacks')
    return tokenizer.eos_id
  i = tokenizer.token_to_id(fmt.end_of_turn)
  if i is None:
    raise ChatFormatError(f'chat_format={fmt.name!r} ends answers with {fmt.end_of_turn!r}, '
                          f'which tokenizer {getattr(tokenizer, "path", tokenizer)!r} lacks')
  return i


def render_prompt(fmt: ChatFormat, prompt: str, *, system: str | None = None) -> str:
  """The text of a first user turn up to where the answer starts (bos not included).
  `system` replaces the format's default system message ('' drops it)."""
  system = fmt.system if system is None else system
  head = fmt.begin
  if system:
    if fmt.system_block is None:
      raise ChatFormatError(f'chat_format={fmt.name!r} has no system messages')
    head += fmt.system_block.format(system=system)
  return head + fmt.turn.format(prompt=prompt)


def render_turn(fmt: ChatFormat, prompt: str) -> str:
  """The text of a later user turn, after the previous answer's end-of-turn token."""
  return fmt.after_turn + fmt.turn.format(prompt=prompt)


def prompt_ids(fmt: ChatFormat, tokenizer, prompt: str, *, system: str | None = None,
               ids=None) -> list[int]:
  """[bos] + the rendered first turn: the tokens a model reads before it answers.

  `ids`: the prompt's own tokens (tokenizer.encode(prompt, bos=False)) when the caller
  already has them (a task that fits a token budget counts them). They are then placed
  between the tokens of the text around the prompt instead of tokenizing the prompt again.
  That is the tokenization of the whole text when the tokenizer splits at the prompt's
  edges, which is checked on the first prompt per tokenizer, format and system message
  (`_splice`); where it does not hold, or the prompt starts or ends with whitespace, the
  whole text is tokenized."""
  if ids is not None and prompt and not (prompt[0].isspace() or prompt[-1].isspace()):
    around = _splice(fmt, tokenizer, system, prompt, ids)
    if around is not None:
      return around[0] + list(ids) + around[1]
  return tokenizer.encode(render_prompt(fmt, prompt, system=system), bos=fmt.bos)


_SPLICES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _splice(fmt: ChatFormat, tokenizer, system, prompt: str, ids) -> tuple | None:
  """(tokens before the prompt, tokens after it) for prompt_ids, or None where splicing
  does not reproduce the whole text's tokens (checked once, on `prompt`)."""
  cache = _SPLICES.setdefault(tokenizer, {})
  key = (fmt, system)
  if key not in cache:
    head, tail = render_prompt(fmt, '\0', system=system).split('\0')
    if getattr(tokenizer, 'kind', None) == 'sentencepiece':
      # the prompt's own tokens carry sentencepiece's dummy-prefix space, which stands for
      # the space before it; a space after it is the next piece's leading space
      head = head[:-1] if head.endswith(' ') else head
      tail = tail[1:] if tail.startswith(' ') else tail
    around = (tokenizer.encode(head, bos=fmt.bos), tokenizer.encode(tail, bos=False))
    whole = tokenizer.encode(render_prompt(fmt, prompt, system=system), bos=fmt.bos)
    cache[key] = around if around[0] + list(ids) + around[1] == whole else None
  return cache[key]


def answer_ids(fmt: ChatFormat, tokenizer, answer: str) -> list[int]:
  """An assistant answer, tokenized on its own, and its end-of-turn token."""
  return tokenizer.encode(answer, bos=False) + [end_of_turn_id(fmt, tokenizer)]


def turn_ids(fmt: ChatFormat, tokenizer, prompt: str) -> list[int]:
  """A later user turn (what follows an answer's end-of-turn token, up to the next answer)."""
  return tokenizer.encode(render_turn(fmt, prompt), bos=False)
