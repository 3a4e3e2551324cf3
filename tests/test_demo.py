"""The from-scratch demo (jaxlm/demo, configs/tiny_kv.py): its task 'demo_kv' (extra turns,
curriculum), its tokenizers, composed embeddings and their trainer wiring through init_hook."""
import re

import numpy as np
import pytest
from flax import nnx

from jaxlm import train as trainer
from jaxlm.data import TaskConfigError, make_task
from jaxlm.demo.embed_init import compose_embeddings, piece_splits
from jaxlm.model import init_model
from jaxlm.tokenizer import Tokenizer

import train_config  # tests/train_config.py
from test_data_tasks import parse_simple


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


def tiny_config(**overrides):
  """tests/train_config.py's small model on the demo's task, tokenizer and init hook."""
  from configs import tiny_kv
  c = train_config.get_config(**overrides)
  demo = tiny_kv.get_config()
  c.tokenizer, c.init_hook, c.embed_init = demo.tokenizer, demo.init_hook, demo.embed_init
  c.model.vocab_size = demo.model.vocab_size
  c.data.task, c.data.task_fields = demo.data.task, demo.data.task_fields
  c.data.chat_format, c.eval.task = demo.data.chat_format, demo.eval.task
  return c


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
  c = tiny_config(train__steps=1, train__lr=0.0, train__schedule='constant',
                  train__warmup_steps=0)
  assert c.init_hook == 'jaxlm.demo.embed_init:init_hook' and c.embed_init == 'compose'
  result = trainer.train(c, str(tmp_path), log=lambda s: None)
  model = nnx.merge(result['graphdef'], result['state'])[0]
  random = np.asarray(init_model(trainer.model_config(c), seed=c.seed).embed[...])
  expected = compose_embeddings(random, piece_splits(Tokenizer(c.tokenizer)))
  np.testing.assert_array_equal(np.asarray(model.embed[...]), expected)   # lr 0: unchanged
  assert not np.array_equal(expected, random)


def test_embed_init_and_init_hook_errors(tmp_path):
  c = tiny_config(train__steps=1)
  c.embed_init = 'sum'
  with pytest.raises(trainer.ConfigError, match=r"embed_init='sum' must be 'random' or 'compose'"):
    trainer.train(c, str(tmp_path / 'a'), log=lambda s: None)
  c = tiny_config()
  c.init_hook = 'jaxlm.demo.embed_init:no_such_function'
  with pytest.raises(trainer.ConfigError, match=r"init_hook='jaxlm.demo.embed_init:no_such_"):
    trainer.validate(c, trainer.model_config(c), 1)


def test_curriculum_ramps_the_number_of_dictionaries(tok):
  task = make_task('demo_kv', tok, num_dicts=(1, 4), curriculum_examples=400)
  assert [task.max_dicts(i) for i in (0, 99, 100, 250, 399, 400, 10**6)] == [1, 1, 2, 3, 4, 4, 4]
  sizes = [task.example(0, i).num_dicts for i in range(800)]
  assert all(s <= task.max_dicts(i) for i, s in enumerate(sizes))
  assert set(sizes[:100]) == {1} and set(sizes[400:]) == {1, 2, 3, 4}
  # A pure function of the index: the same example whatever was generated before.
  assert task.example(0, 321) == make_task('demo_kv', tok, num_dicts=(1, 4),
                                           curriculum_examples=400).example(0, 321)
  with pytest.raises(TaskConfigError, match='curriculum_examples=5 needs a num_dicts range'):
    make_task('demo_kv', tok, num_dicts=4, curriculum_examples=5)


def test_extra_queries_ask_unique_keys_and_keep_the_first_turn(tok):
  plain = make_task('demo_kv', tok, num_dicts=6, keys_per_dict=(2, 3), key_digits=(1, 2))
  multi = make_task('demo_kv', tok, num_dicts=6, keys_per_dict=(2, 3), key_digits=(1, 2),
                    extra_queries=5)
  for i in range(20):
    a, b = plain.example(0, i), multi.example(0, i)
    assert (a.prompt, a.answer) == (b.prompt, b.answer) and not a.turns
    assert 1 <= len(b.turns) <= 5 and 'turns' not in a.to_dict() and 'turns' in b.to_dict()
    where = {}
    for d, pairs in parse_simple(b.prompt):
      for k, v in pairs:
        where.setdefault(k, []).append((v, d))
    asked = set()
    for q, ans in b.turns:
      key = int(re.search(r'value of key (\d+) and', q).group(1))
      assert len(where[key]) == 1 and key != b.gold_key and key not in asked
      asked.add(key)
      v, d = where[key][0]
      assert ans == f'The value of key {key} is {v} and it is in Dictionary [{d}].'
    f = multi.to_features(b, tok, 'mistral')
    supervised = tok.decode(f['targets'][f['loss_mask'] == 1])
    for text in [b.answer] + [ans for _, ans in b.turns]:
      assert text in supervised
    assert sum(f['targets'] == tok.eos_id) == len(b.turns) + 1
  with pytest.raises(TaskConfigError, match='extra_queries=2 needs num_dicts'):
    make_task('demo_kv', tok, num_dicts=None, num_tokens=500, extra_queries=2)


def test_short_extra_questions_ask_the_same_keys(tok):
  full = make_task('demo_kv', tok, num_dicts=5, keys_per_dict=(2, 3), key_digits=(1, 2),
                   answer_template=True, extra_queries=4)
  short = make_task('demo_kv', tok, num_dicts=5, keys_per_dict=(2, 3), key_digits=(1, 2),
                    answer_template=True, extra_queries=4, extra_question='short')
  for i in range(10):
    a, b = full.example(0, i), short.example(0, i)
    assert (a.prompt, a.answer) == (b.prompt, b.answer) and len(a.turns) == len(b.turns) >= 1
    for (qa, ra), (qb, rb) in zip(a.turns, b.turns):
      key = re.search(r'value of key (\d+) and', qa).group(1)
      assert qb == f'Report the value of key {key} and the dictionary it is in.' and qb in qa
      assert ra == rb and 'template' not in qb
  with pytest.raises(TaskConfigError, match="extra_question='brief' must be 'full' or 'short'"):
    make_task('demo_kv', tok, num_dicts=4, extra_queries=2, extra_question='brief')


def test_extra_unique_values_asks_only_pairs_named_by_their_value(tok):
  task = make_task('demo_kv', tok, num_dicts=4, keys_per_dict=(2, 2), key_digits=(1, 1),
                   value_digits=(1, 1), unique_keys='all', extra_queries=8,
                   extra_unique_values=True)
  plain = make_task('demo_kv', tok, num_dicts=4, keys_per_dict=(2, 2), key_digits=(1, 1),
                    value_digits=(1, 1), unique_keys='all', extra_queries=8)
  fewer = 0
  for i in range(30):
    ex = task.example(0, i)
    values = [v for _, pairs in parse_simple(ex.prompt) for _, v in pairs]
    for _, ans in ex.turns:
      v = int(re.search(r' is (\d+) and', ans).group(1))
      assert values.count(v) == 1, (ans, values)
    fewer += len(ex.turns) < len(plain.example(0, i).turns)
  assert fewer > 0   # 1-digit values repeat: the filter must have dropped some pairs


def test_plain_demo_tokenizer_builds_deterministically_and_keeps_numbers_whole(tmp_path):
  # (the 'plain' and 'merged' variants are BENCHMARKS history, built on demand, not shipped)
  from jaxlm.demo.tokenizers import build
  build(str(tmp_path / 'a.model'))
  build(str(tmp_path / 'kv.model'))
  assert open(tmp_path / 'kv.model', 'rb').read() == open(tmp_path / 'a.model', 'rb').read()
  tok = Tokenizer(str(tmp_path / 'kv.model'))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (382, 1, 2)
  for n in (0, 7, 42, 99):   # a number is one piece wherever the task prints it
    pieces = [tok.id_to_piece(i) for i in tok.encode(f'{{{n}: {n}, {n}: 5}} Report the value '
                                                     f'of key {n} and', bos=False)]
    assert pieces.count(str(n)) == 4, pieces
  ex = make_task('simple_kv', tok, num_dicts=4, keys_per_dict=(2, 3), key_digits=(1, 2),
                 value_digits=(1, 2), answer_template=True).example(5, 0)
  assert tok.decode(tok.encode(ex.prompt)) == ex.prompt
  assert len(tok.encode(ex.prompt, bos=False)) < 100   # the task's fixed sentences are single pieces


def test_merged_demo_tokenizer_makes_each_lookup_start_from_the_current_token(tmp_path):
  from jaxlm.demo.tokenizers import build
  build(str(tmp_path / 'kv.model'), 'merged')
  tok = Tokenizer(str(tmp_path / 'kv.model'))
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (695, 1, 2)
  def pieces(text):
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    return [tok.id_to_piece(i).replace('\u2581', ' ') for i in ids]
  assert pieces('Dictionary [3] {12: 5, 7: 45}\nDictionary [4] {9: 1}\n\n') == [
      'Dictionary [3] {', '12: ', '5', ', ', '7: ', '45', '}\n', 'Dictionary [4] {', '9: ', '1',
      '}\n\n']
  assert pieces('The value of key 12 is 45 and it is in Dictionary [3].') == [
      'The value of key ', '12 is ', '45 and it is in Dictionary [', '3', '].']
  assert pieces('Report the value of key 12 and the dictionary it is in.') == [
      'Report the value of key ', '12', ' and the dictionary it is in.']
  with pytest.raises(ValueError, match="variant='big' must be one of"):
    build(str(tmp_path / 'x.model'), 'big')


def test_pairs_demo_tokenizer_makes_a_one_digit_pair_one_piece(tmp_path):
  from jaxlm.demo.tokenizers import build
  from jaxlm.tokenizer import REPO_ROOT
  shipped = f'{REPO_ROOT}/data/tokenizers/kv-tiny-pairs.model'
  build(str(tmp_path / 'kv.model'), 'pairs')
  assert open(tmp_path / 'kv.model', 'rb').read() == open(shipped, 'rb').read()
  tok = Tokenizer(shipped)
  assert tok.vocab_size == 895
  text = 'Dictionary [1] {3: 7, 5: 12, 8: 1}\nDictionary [2] {4: 4}\n\nAbove'
  ids = tok.encode(text, bos=False)
  assert tok.decode(ids) == text
  assert [tok.id_to_piece(i).replace('\u2581', ' ') for i in ids][:8] == [
      'Dictionary [1] {', '3: 7, ', '5: ', '12', ', ', '8: 1}\n', 'Dictionary [2] {', '4: 4}\n']


def test_demo_runs_evaluate_the_first_turn_without_the_curriculum():
  from jaxlm.data.tasks import eval_task
  c = tiny_config()
  c.eval.task = ''                                   # not named: the demo task's eval_task
  c.data.task_fields.num_dicts, c.data.task_fields.curriculum_examples = (2, 4), 100
  c.eval.task_fields.num_dicts = 4
  name, fields = eval_task(c)
  assert name == 'simple_kv' and 'curriculum_examples' not in fields
  assert 'extra_queries' not in fields and fields['num_dicts'] == 4   # eval.task_fields wins
