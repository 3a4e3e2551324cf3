"""Examples -> token features: chat-formatted prompt and answer, and the answer-only loss mask.

    features = to_features(example, tokenizer, 'auto')   # {'inputs', 'targets', 'loss_mask'}

The answer is tokenized on its own (as instruct tokenizers do for assistant turns) and the
chat format's end-of-turn token appended by id, so the mask covers exactly the answer and
its end-of-turn token. `conversation_features` does the same for several question-answer
turns about one prompt (the later turns follow in the same format; the text between turns
carries no loss).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxlm import chat
from jaxlm.data.common import Example, TaskConfigError

FEATURES = ('inputs', 'targets', 'loss_mask')


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
  return chat.prompt_ids(fmt, tokenizer, example.prompt, ids=example.prompt_ids)


def conversation_features(turns: Sequence[tuple[str, str]], tokenizer, chat_format, *,
                          prompt_ids=None) -> dict[str, np.ndarray]:
  """Next-token features of (question, answer) turns, the first question being the prompt;
  the loss mask is 1 exactly where the target is an answer token or the end-of-turn token
  that closes it. `prompt_ids`: the prompt's own tokens when a task counted them
  (Example.prompt_ids), so that it is not tokenized again."""
  fmt = resolve_chat_format(chat_format, tokenizer)
  tokens, labelled = [], []
  for i, (question, answer) in enumerate(turns):   # e.g. Mistral: [INST] q [/INST]a</s>
    q = (chat.prompt_ids(fmt, tokenizer, question, ids=prompt_ids) if i == 0 else
         chat.turn_ids(fmt, tokenizer, question))
    a = chat.answer_ids(fmt, tokenizer, answer)
    tokens += q + a
    labelled += [0] * len(q) + [1] * len(a)
  tokens = np.array(tokens, np.int32)
  mask = np.array(labelled[1:], np.int32)   # target t+1 is an answer token
  return {'inputs': tokens[:-1], 'targets': tokens[1:], 'loss_mask': mask}


def to_features(example: Example, tokenizer, chat_format) -> dict[str, np.ndarray]:
  """Next-token features of the example's prompt and answer (`conversation_features`)."""
  return conversation_features([(example.prompt, example.answer)], tokenizer, chat_format,
                               prompt_ids=example.prompt_ids)
