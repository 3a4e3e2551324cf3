"""Answer parsing and scoring."""
import pytest

from jaxlm.data import make_task
from jaxlm.data.scoring import parse_answer, score_answer


@pytest.fixture(scope='module')
def ex():
  return make_task('simple_kv', num_dicts=10).example(0, 0)


def test_template_answer_scores_both_parts(ex):
  assert score_answer(ex.answer, ex) == {'value': True, 'dict': True, 'key': None, 'all': True}


@pytest.mark.parametrize('text, value, dict_ok', [
    ('{v}, in Dictionary [{d}]', True, True),
    ('The value of key {k} is {v}. It is in dictionary {d}.', True, True),
    ('Key {k} maps to {v} (Dictionary [{d}])', True, True),
    ('The value of key {k} is {v} and it is in Dictionary [{wrong_d}].', True, False),
    ('The value of key {k} is {wrong_v} and it is in Dictionary [{d}].', False, True),
    ('I cannot find key {k}.', False, False),
])
def test_free_form_answers(ex, text, value, dict_ok):
  text = text.format(k=ex.gold_key, v=ex.gold_value, d=ex.gold_dict,
                     wrong_d=ex.gold_dict % 10 + 1, wrong_v=ex.gold_value + 1)
  s = score_answer(text, ex)
  assert (s['value'], s['dict']) == (value, dict_ok)
  assert s['all'] == (value and dict_ok)


def test_multisubkey_scores_key_value_and_dict():
  ex = make_task('multisubkey_kv', num_dicts=8).example(0, 1)
  assert score_answer(ex.answer, ex)['all']
  k = ex.gold_key
  swapped = ex.answer.replace('(' + ', '.join(map(str, k)) + ')',
                              '(' + ', '.join(map(str, [k[1], k[0], k[2]])) + ')')
  s = score_answer(swapped, ex)
  assert s['key'] is False and s['value'] and s['dict'] and not s['all']
  listed = ex.prompt.split('contains the integers ')[1].split(' (not')[0]
  assert parse_answer(f'The integers {listed} belong to a key with value {ex.gold_value}.',
                      'multisubkey_kv', ex.gold_key)['value'] == ex.gold_value


def test_niah_value_only():
  ex = make_task('niah', num_tokens=None, num_units=5, filler='passkey').example(0, 0)
  assert score_answer(ex.answer, ex) == {'value': True, 'dict': None, 'key': None, 'all': True}
  assert not score_answer('The number is 12.', ex)['value']


def test_a_value_equal_to_its_key_is_read_from_the_template():
  ex = {'task': 'simple_kv', 'gold_key': 8, 'gold_value': 8, 'gold_dict': 2}
  assert score_answer('The value of key 8 is 8 and it is in Dictionary [2].', ex)['all']
  assert not score_answer('The value of key 8 is 9 and it is in Dictionary [2].', ex)['value']
  assert parse_answer('Key 8: the value is 8', 'simple_kv', 8)['value'] is None  # ambiguous
