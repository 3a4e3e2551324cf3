"""The main job's current body (jaxlm/smoke.py) on a small configuration."""
import importlib.util
import math
import os

import pytest

from jaxlm import smoke
from jaxlm.tokenizer import TokenizerMismatchError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config():
  spec = importlib.util.spec_from_file_location('smoke_config', f'{ROOT}/configs/smoke.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_smoke_run(tmp_path):
  c = _config()
  c.batch, c.seq_len, c.max_new_tokens, c.workdir = 1, 32, 4, str(tmp_path)
  c.tokenizer = os.path.join(ROOT, c.tokenizer)
  stats = smoke.run(c)
  assert stats['roundtrip_max_diff'] == 0.0
  # A freshly initialized model is close to uniform over the vocabulary.
  assert abs(stats['nll'] - math.log(32000)) < 0.5


def test_smoke_rejects_a_model_the_tokenizer_does_not_fit(tmp_path):
  c = _config()
  c.model.preset, c.workdir = 'tiny', str(tmp_path)
  c.tokenizer = os.path.join(ROOT, c.tokenizer)
  with pytest.raises(TokenizerMismatchError, match='vocab_size=512'):
    smoke.run(c)
