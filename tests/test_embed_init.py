"""Compositional embedding initialization (jaxlm/embed_init.py) and its trainer wiring."""
import numpy as np
import pytest
from flax import nnx

from jaxlm import train as trainer
from jaxlm.embed_init import compose_embeddings, piece_splits
from jaxlm.model import init_model
from jaxlm.tokenizer import Tokenizer

import train_config  # tests/train_config.py

PAIRS = 'data/tokenizers/kv-tiny-pairs.model'


def _split(tok, splits, text):
  (pid,) = tok.encode(text, bos=False)
  return [tok.id_to_piece(q) for q in splits[pid]]


def test_pairs_tokenizer_splits_into_key_value_and_separator():
  tok = Tokenizer(PAIRS)
  splits = piece_splits(tok)
  assert _split(tok, splits, '3: 7, ') == ['3:▁', '7', ',▁']
  assert _split(tok, splits, '3: 7}\n') == ['3:▁', '7', '}\n']
  assert _split(tok, splits, '7 and it is in Dictionary [') == ['7', '▁and▁it▁is▁in▁Dictionary▁[']
  assert _split(tok, splits, 'Dictionary [12] {') == ['Dictionary▁[', '12', ']▁{']
  # ties between splits of equally many parts go to the longest first part: `13` + `: `
  assert _split(tok, splits, '13: ') == ['13', ':▁']
  sp = tok._sp
  parts = {q for p in splits.values() for q in p}
  assert not any(sp.IsControl(q) or sp.IsByte(q) or sp.IsUnknown(q) for q in parts)
  assert all(len(p) >= 2 and pid not in p for pid, p in splits.items())
  # pieces without a split (single characters, the task's sentences) are left out
  assert tok.encode('7', bos=False)[0] not in splits


def test_compose_embeddings_sums_parts_and_keeps_the_rest():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(10, 4)).astype(np.float32)
  before = e.copy()
  out = compose_embeddings(e, {5: (1, 2), 9: (5, 3, 4)})
  np.testing.assert_allclose(out[5], (e[1] + e[2]) / np.sqrt(2), rtol=1e-6)
  np.testing.assert_allclose(out[9], (e[5] + e[3] + e[4]) / np.sqrt(3), rtol=1e-6)  # not out[5]
  keep = [i for i in range(10) if i not in (5, 9)]
  np.testing.assert_array_equal(out[keep], e[keep])
  np.testing.assert_array_equal(e, before)   # the input is not modified
  with pytest.raises(ValueError, match='index past the embedding table of 10 rows'):
    compose_embeddings(e, {3: (1, 12)})


def test_trainer_starts_merged_pieces_from_their_parts(tmp_path):
  c = train_config.get_config(train__steps=1, train__lr=0.0, train__schedule='constant',
                              train__warmup_steps=0)
  c.embed_init = 'compose'
  result = trainer.train(c, str(tmp_path), log=lambda s: None)
  model = nnx.merge(result['graphdef'], result['state'])[0]
  random = np.asarray(init_model(trainer.model_config(c), seed=c.seed).embed[...])
  expected = compose_embeddings(random, piece_splits(Tokenizer(c.tokenizer)))
  np.testing.assert_array_equal(np.asarray(model.embed[...]), expected)   # lr 0: unchanged
  assert not np.array_equal(expected, random)


@pytest.mark.parametrize('embed_init, init_from, match', [
    ('sum', '', r"embed_init='sum' must be 'random' or 'compose'"),
    ('compose', '/ckpt/hf', r"init_from='/ckpt/hf' loads trained embeddings"),
])
def test_embed_init_config_errors(embed_init, init_from, match):
  c = train_config.get_config()
  c.embed_init, c.init_from = embed_init, init_from
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.validate(c, trainer.model_config(c), 1)
