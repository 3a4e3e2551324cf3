"""Task generators: determinism, correctness by construction, budgets, config errors."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxlm.data import TaskConfigError, common, kv, make_task
from jaxlm.tokenizer import Tokenizer

ROOT = __file__.rsplit('/tests/', 1)[0]
LINE = re.compile(r'^Dictionary \[(\d+)\] \{(.*)\}$')


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


def parse_simple(prompt):
  """Independent parser: [(dict index, [(key, value), ...]), ...] from the prompt text."""
  dicts = []
  for line in prompt.split('\n'):
    m = LINE.match(line)
    if m:
      pairs = [tuple(int(x) for x in p.split(': ')) for p in m.group(2).split(', ')]
      dicts.append((int(m.group(1)), pairs))
  return dicts


def parse_multi(prompt):
  dicts = []
  for line in prompt.split('\n'):
    m = LINE.match(line)
    if m:
      pairs = [(tuple(int(x) for x in k.split(', ')), int(v))
               for k, v in re.findall(r'\(([\d, ]+)\): (\d+)', m.group(2))]
      dicts.append((int(m.group(1)), pairs))
  return dicts


def test_same_seed_and_index_same_example_across_processes(tok):
  task = make_task('simple_kv', tok, num_dicts=None, num_tokens=1000)
  here = task.example(3, 17).to_dict()
  code = ('import json; from jaxlm.data import make_task; from jaxlm.tokenizer import Tokenizer;'
          'print(json.dumps(make_task("simple_kv", Tokenizer(), num_dicts=None, '
          'num_tokens=1000).example(3, 17).to_dict()))')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=ROOT, env={'PYTHONPATH': ROOT, 'PATH': '/usr/bin:/bin'})
  assert json.loads(out.stdout) == here
  assert make_task('simple_kv', tok, num_dicts=None, num_tokens=1000).example(3, 17).to_dict() == here
  assert task.example(3, 18).prompt != here['prompt']
  assert task.example(4, 17).prompt != here['prompt']


@pytest.mark.parametrize('fields', [
    {}, dict(answer_template=True), dict(unique_keys='all', num_dicts=40),
    dict(num_dicts=None, num_tokens=2000, key_digits=(2, 2), keys_per_dict=(2, 5))])
def test_simple_kv_correct_by_construction(tok, fields):
  task = make_task('simple_kv', tok, **fields)
  for i in range(20):
    ex = task.example(0, i)
    dicts = parse_simple(ex.prompt)
    assert [d for d, _ in dicts] == list(range(1, ex.num_dicts + 1))
    keys = [k for _, pairs in dicts for k, _ in pairs]
    values = [v for _, pairs in dicts for _, v in pairs]
    assert keys.count(ex.gold_key) == 1 and values.count(ex.gold_value) == 1
    for _, pairs in dicts:
      assert len({k for k, _ in pairs}) == len(pairs)          # keys unique in a dict
    if fields.get('unique_keys') == 'all':
      assert len(set(keys)) == len(keys)
    (gold_dict, pairs), = [(d, p) for d, p in dicts if ex.gold_key in dict(p)]
    assert dict(pairs)[ex.gold_key] == ex.gold_value and gold_dict == ex.gold_dict
    assert len(pairs) == 3                                        # the paper's gold dict size
    lo, hi = fields.get('keys_per_dict', (3, 4))
    assert all(lo <= len(p) <= hi for d, p in dicts if d != gold_dict)
    assert ex.answer == (f'The value of key {ex.gold_key} is {ex.gold_value} and it is in '
                         f'Dictionary [{ex.gold_dict}].')
    assert ex.prompt.endswith(f'Report the value of key {ex.gold_key} and the dictionary it is in.'
                              + (' Answer in the following template:\nThe value of key '
                                 f'{ex.gold_key} is <fill-in-value> and it is in Dictionary '
                                 '[<fill-in-dictionary-name>].' if fields.get('answer_template') else ''))
    # counted only under a token budget (the pipeline tokenizes the formatted prompt)
    assert ex.num_tokens == (len(tok.encode(ex.prompt, bos=False))
                             if fields.get('num_tokens') else None)


def test_simple_kv_number_ranges_follow_the_paper(tok):
  task = make_task('simple_kv', tok)
  numbers = [n for i in range(10) for _, p in parse_simple(task.example(0, i).prompt)
             for kv in p for n in kv]
  digits = np.array([len(str(n)) for n in numbers])
  assert set(digits) == {3, 4} and abs((digits == 3).mean() - 0.5) < 0.05


def _reference_sample_numbers(rng, digits, size):   # the general path, for any digit range
  d = rng.integers(digits[0], digits[1] + 1, size=size)
  return rng.integers(10 ** (d - 1), 10 ** d).astype(np.int64)


@pytest.mark.parametrize('digits', [(1, 1), (4, 4), (12, 12), (3, 4)])
def test_sample_numbers_fixed_digits_fast_path_draws_the_same_stream(digits):
  fast, ref = np.random.default_rng(5), np.random.default_rng(5)
  for size in [(), 1, 7, (3, 2)]:
    np.testing.assert_array_equal(common.sample_numbers(fast, digits, size),
                                  _reference_sample_numbers(ref, digits, size))
  assert fast.integers(1 << 62) == ref.integers(1 << 62)    # the generator is in the same state


@pytest.mark.parametrize('grouped', [False, True])
def test_taken_or_repeated_matches_the_numpy_definition(grouped):
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(1, 30))
    keys = rng.integers(0, 12, n)
    owner = np.sort(rng.integers(0, 4, n)) if grouped else None
    taken = set(rng.integers(0, 12, int(rng.integers(0, 4))).tolist())
    want = np.isin(keys, list(taken)) | kv._duplicates(keys, owner)
    np.testing.assert_array_equal(kv._taken_or_repeated(keys, taken, owner), want)


def test_multisubkey_correct_by_construction(tok):
  task = make_task('multisubkey_kv', tok, answer_template=True)
  shared_seen = 0
  for i in range(15):
    ex = task.example(1, i)
    dicts = parse_multi(ex.prompt)
    assert len(dicts) == ex.num_dicts == 49
    gold = tuple(ex.gold_key)
    listed = [int(x) for x in re.search(r'contains the integers ([\d, ]+) \(not', ex.prompt)
              .group(1).split(', ')]
    assert sorted(listed) == sorted(gold) and len(set(gold)) == 3
    holders = [(d, k, v) for d, pairs in dicts for k, v in pairs if set(gold) <= set(k)]
    assert holders == [(ex.gold_dict, gold, ex.gold_value)]   # only the gold key has them all
    values = [v for _, pairs in dicts for _, v in pairs]
    assert values.count(ex.gold_value) == 1
    shared_seen += sum(bool(set(gold) & set(k)) for _, pairs in dicts for k, _ in pairs) - 1
    assert ex.answer == (f'The key that contains the integers {", ".join(map(str, listed))} is '
                         f'({", ".join(map(str, gold))}). Its value is {ex.gold_value} and it is '
                         f'in Dictionary [{ex.gold_dict}].')
  assert shared_seen > 15 * 49 * 3.5 * 0.3   # distractors do share subkeys with the gold key


@pytest.mark.parametrize('filler', ['nq', 'passkey'])
def test_niah_correct_by_construction(tok, filler):
  task = make_task('niah', tok, num_tokens=1500, filler=filler)
  for i in range(10):
    ex = task.example(0, i)
    needle = f'The special magic number for {ex.gold_key} is {ex.gold_value}.'
    assert ex.prompt.count(needle) == 1 and ex.prompt.count(ex.gold_key) == 2  # needle + question
    assert ex.answer == needle
    sep = '\n\n' if filler == 'nq' else ' '
    body = ex.prompt.split('\n\n', 1)[1].rsplit('\n\n', 1)[0]
    if filler == 'nq':
      units = body.split(sep)
      assert len(units) == ex.num_dicts and units[ex.gold_dict - 1] == needle


@pytest.mark.parametrize('task,fields,tolerance', [
    ('simple_kv', dict(num_dicts=None), 64),
    ('multisubkey_kv', dict(num_dicts=None), 128),
    ('niah', dict(filler='passkey'), 40),
    ('niah', dict(filler='nq'), 600),
])
def test_token_budgets(tok, task, fields, tolerance):
  """Prompts never exceed the budget and fall short by less than one unit (a
  dictionary line; a filler passage for niah): the stated tolerance."""
  for budget in (512, 2048, 8192, 32768):
    t = make_task(task, tok, num_tokens=budget, **fields)
    for i in range(3 if budget < 32768 else 1):
      ex = t.example(0, i)
      assert budget - tolerance <= ex.num_tokens <= budget, (budget, ex.num_tokens)
      assert ex.num_tokens == len(tok.encode(ex.prompt, bos=False))


def test_paper_setting_85_dicts_under_3996_tokens(tok):
  task = make_task('simple_kv', tok, num_dicts=85, num_tokens=3996)
  for i in range(5):
    ex = task.example(0, i)
    assert ex.num_dicts == 85 and ex.num_tokens <= 3996


def test_gold_positions(tok):
  fixed = make_task('simple_kv', tok, num_dicts=20, gold_position=7)
  assert {fixed.example(0, i).gold_dict for i in range(5)} == {7}
  cycle = make_task('simple_kv', tok, num_dicts=21, gold_position=[1, 0.5, 1.0])
  assert [cycle.example(0, i).gold_dict for i in range(6)] == [1, 11, 21, 1, 11, 21]
  uniform = make_task('simple_kv', tok, num_dicts=10, first_position_prob=0, early_position_prob=0)
  counts = np.bincount([uniform.example(0, i).gold_dict for i in range(2000)], minlength=11)[1:]
  assert counts.min() > 150 and counts.max() < 250
  quirk = make_task('simple_kv', tok, num_dicts=85)    # paper: 5% forced to Dictionary [1]
  first = np.mean([quirk.example(0, i).gold_dict == 1 for i in range(2000)])
  assert 0.04 < first < 0.08
  depth = make_task('niah', tok, num_tokens=2000, gold_position=0.0)
  assert depth.example(0, 0).gold_dict == 1


@pytest.mark.parametrize('task, fields, match', [
    ('simple_kv', dict(key_digits=(1, 1), keys_per_dict=(3, 12)),
     r'key_digits=\(1, 1\) holds 9 distinct keys, but up to 12'),
    ('simple_kv', dict(key_digits=(2, 2), unique_keys='all', num_dicts=40),
     r'holds 90 distinct keys, but up to 159'),
    ('simple_kv', dict(num_dicts=None, num_tokens=60), 'num_tokens=60 is too small'),
    ('simple_kv', dict(num_dicts=85, num_tokens=2000), 'cannot hold num_dicts=85'),
    ('simple_kv', dict(num_dicts=10, gold_position=11), 'gold_position=11 is outside the dictionaries'),
    ('simple_kv', dict(num_dicts=None, num_tokens=1000, gold_position=40), 'gold_position=40 may be outside'),
    ('simple_kv', dict(gold_position=1.5), r'gold_position=1.5 must be a depth in \[0, 1\]'),
    ('simple_kv', dict(gold_position='middle'), "gold_position='middle'"),
    ('simple_kv', dict(num_dict=3), r"unknown field\(s\) \['num_dict'\] for SimpleKVConfig"),
    ('multisubkey_kv', dict(shared_subkeys=(1, 3)), 'may share at most subkeys_per_key-1=2'),
    ('niah', dict(num_tokens=30), 'num_tokens=30 is too small'),
    ('niah', dict(filler='books'), "filler='books'"),
    ('sorting', {}, "unknown task 'sorting'"),
])
def test_impossible_settings_fail_at_config_time(tok, task, fields, match):
  with pytest.raises(TaskConfigError, match=match):
    make_task(task, tok, **fields)


def test_num_dicts_range_mixes_sizes(tok):
  task = make_task('simple_kv', tok, num_dicts=(1, 4), gold_position=1.0)
  sizes = [task.example(0, i).num_dicts for i in range(200)]
  assert set(sizes) == {1, 2, 3, 4}
  ex = task.example(0, 3)
  assert ex.gold_dict == ex.num_dicts and len(parse_simple(ex.prompt)) == ex.num_dicts
  with pytest.raises(TaskConfigError, match=r'gold_position=3 may be outside the dictionaries'):
    make_task('simple_kv', tok, num_dicts=(2, 4), gold_position=3)


