"""Evaluation harness: metrics on hand-checked cases, prompt construction against the
reference templates, log-likelihood against the model's logits, every suite end to end on
its sample with a tiny model, the CLI with --hf and --checkpoint, and compare."""
import gzip
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.evaluate import metrics
from jaxlm.evaluate.common import DataError, Options
from jaxlm.evaluate.runner import Runner, cut_at_stop
from jaxlm.evaluate.suites import flenqa, general, kv, litm_kv, mdqa
from jaxlm.model import get_config, init_model
from jaxlm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- metrics --------------------------------------------------------------------------------
@pytest.mark.parametrize('text, expected', [
    ('The  Beatles!', 'beatles'),
    ('An apple, a day', 'apple day'),
    ('THEater', 'theater'),              # articles only as whole words
    ("Röntgen's law", 'röntgens law'),    # apostrophe dropped, accents kept
    ('  a  ', ''),
])
def test_normalize_answer(text, expected):
  assert metrics.normalize_answer(text) == expected


def test_best_subspan_em_and_exact_match():
  assert metrics.best_subspan_em('It was Wilhelm Conrad Röntgen, in 1901.',
                                 ['Wilhelm Conrad Röntgen']) == 1.0
  assert metrics.best_subspan_em('The answer is the Beatles', ['Beatles']) == 1.0
  assert metrics.best_subspan_em('Röntgen', ['Wilhelm Conrad Röntgen']) == 0.0
  assert metrics.best_subspan_em('', ['x']) == 0.0                      # empty: wrong
  assert metrics.best_subspan_em('1,000 people', ['1000']) == 1.0        # comma is punctuation
  assert metrics.exact_match('The Beatles.', ['beatles']) == 1.0
  assert metrics.exact_match('The Beatles were a band', ['beatles']) == 0.0
  assert metrics.first_line('Paris\nDocument [1] ... Paris') == 'Paris'


def test_gsm8k_and_flenqa_extraction():
  assert metrics.gsm8k_gold('She makes 9 * 2 = $<<9*2=18>>18.\n#### 18') == '18'
  assert metrics.gsm8k_gold('#### 1,234') == '1234'
  with pytest.raises(ValueError, match='####'):
    metrics.gsm8k_gold('no marker 5')
  assert metrics.gsm8k_number('3 + 4 = 7 eggs, so $14.00 in total') == '14'
  assert metrics.gsm8k_number('The answer is 12. Check: 12 * 2 = 24') == '12'
  assert metrics.gsm8k_number('no numbers') is None
  assert metrics.flenqa_category('True') == 'true'
  assert metrics.flenqa_category('It is not true.') == 'false'
  assert metrics.flenqa_category('False at first, but after all steps: TRUE.') == 'true'
  assert metrics.flenqa_category('I cannot tell.') == 'other/refused'
  assert metrics.flenqa_correct('False.', 'False') and not metrics.flenqa_correct('', True)


# --- prompts ---------------------------------------------------------------------------------
def test_mdqa_prompt_puts_gold_at_position_and_matches_the_template():
  docs = [{'title': f'T{i}', 'text': f'text {i}'} for i in range(4)]
  gold = {'title': 'Gold', 'text': 'the answer', 'isgold': True}
  for p in range(1, 6):
    placed = mdqa.place_gold(gold, docs, p)
    assert placed[p - 1] is gold and [d for d in placed if d is not gold] == docs
  prompt = mdqa.qa_prompt('who?', mdqa.place_gold(gold, docs[:1], 2))
  assert prompt == (
      'Write a high-quality answer for the given question using only the provided search '
      'results (some of which might be irrelevant).\n\n'
      'Document [1](Title: T0) text 0\nDocument [2](Title: Gold) the answer\n\n'
      'Question: who?\nAnswer:')
  assert mdqa.closedbook_prompt('who?') == 'Question: who?\nAnswer:'
  with pytest.raises(ValueError, match='outside'):
    mdqa.place_gold(gold, docs, 6)


def test_mdqa_built_haystacks_never_contain_the_answer():
  records = mdqa.load(mdqa.DEFAULT_DATA)[:300]
  for i in range(0, 300, 37):
    ds = mdqa.random_distractors(records, i, 29, seed=0)
    assert len(ds) == 29 and len({d['text'] for d in ds}) == 29
    answers = [metrics.normalize_answer(a) for a in records[i]['answers']]
    for d in ds:
      assert not any(a in metrics.normalize_answer(d['title'] + ' ' + d['text']) for a in answers)
    assert records[i]['gold']['text'] not in {d['text'] for d in ds}


def test_litm_kv_prompt_format():
  p = litm_kv.kv_prompt([('a', '1'), ('b', '2'), ('c', '3')], 'b')
  assert '{"a": "1",\n "b": "2",\n "c": "3"}' in p
  assert p.endswith('Key: "b"\nCorresponding value:')


def test_flenqa_prompts_follow_each_task():
  recs = flenqa.load(flenqa.DEFAULT_DATA)
  pir = next(r for r in recs if r['dataset'] == 'PIR')
  assert flenqa.prompt(pir, False) == (f"{pir['mixin']}\nTrue/False Question: "
                                       f"{pir['assertion/question']}\nAnswer only True or False.\n")
  rt = next(r for r in recs if r['dataset'] == 'Simplified RuleTaker')
  assert f"Rule: {rt['rule']}\nFacts: {rt['mixin']}" in flenqa.prompt(rt, True)
  assert 'step by step' in flenqa.prompt(rt, True) and 'step' not in flenqa.prompt(rt, False)


# --- data errors ----------------------------------------------------------------------------
def test_malformed_lines_name_file_and_line(tmp_path):
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x", '
                 '"isgold": true}]}\n\n{"question": "q2", "answers": ["a"]\n')
  with pytest.raises(DataError, match=r'bad.jsonl:3: not valid JSON'):
    mdqa.load(str(bad))
  bad.write_text('{"question": "q", "ctxs": []}\n')
  with pytest.raises(DataError, match=r"bad.jsonl:1: missing field\(s\) \['answers'\]"):
    mdqa.load(str(bad))
  bad.write_text('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t", "text": "x"}]}\n')
  with pytest.raises(DataError, match='bad.jsonl:1: expected exactly one document with isgold'):
    mdqa.load(str(bad))
  gz = tmp_path / 'kv.jsonl.gz'
  with gzip.open(gz, 'wt') as f:
    f.write('{"ordered_kv_records": [["k", "v"], ["k2", "v2"]], "key": "k", "value": "WRONG"}\n')
  with pytest.raises(DataError, match='kv.jsonl.gz:1: key'):
    litm_kv.load(str(gz))
  csv_dir = tmp_path / 'mmlu' / 'test'
  csv_dir.mkdir(parents=True)
  (csv_dir / 'x_test.csv').write_text('q,a,b,c,d,B\nq2,a,b,c,E\n')
  with pytest.raises(DataError, match='x_test.csv:2: expected question,A,B,C,D,answer'):
    general.run_mmlu(None, Options(shots=0), str(tmp_path / 'mmlu'))
  with pytest.raises(DataError, match='does not exist'):
    Options(data={'mdqa': str(tmp_path / 'missing.jsonl')}).path('mdqa', 'x')


# --- the model calls ------------------------------------------------------------------------
@pytest.fixture(scope='module')
def runner():
  cfg = get_config('tiny', vocab_size=32000, hidden_size=32, num_layers=1, num_heads=2,
                   num_kv_heads=1, head_dim=16, intermediate_size=64, sliding_window=None,
                   max_position_embeddings=8192)
  return Runner(init_model(cfg, seed=3), Tokenizer(), chat_format='mistral', batch_size=4,
                verbose=False)


def test_loglik_equals_a_direct_computation_with_the_logits(runner):
  pairs = [('The capital of France is', ' Paris'), ('Question: 2+2?\nAnswer:', ' B'),
           ('A much longer context that pads the batch out to another length,', ' yes it does')]
  got = runner.loglik(pairs)
  for (context, continuation), (ll, n, greedy) in zip(pairs, got):
    ctx, cont = runner.split_pair(context, continuation)
    tokens = jnp.asarray([ctx + cont])
    logp = jax.nn.log_softmax(runner.model(tokens)[0], axis=-1)
    want = sum(float(logp[len(ctx) + j - 1, t]) for j, t in enumerate(cont))
    argmax_all = all(int(jnp.argmax(logp[len(ctx) + j - 1])) == t for j, t in enumerate(cont))
    assert n == len(cont) > 0
    np.testing.assert_allclose(ll, want, rtol=1e-4, atol=1e-4)
    assert greedy == argmax_all


def test_shared_context_loglik_equals_one_sequence_per_pair(runner):
  """Choices scored from one prefill of their context (KV cache copied per choice) equal
  each (context, choice) scored as its own sequence: contexts of several lengths, groups of
  2-4 choices of 1-9 tokens, more contexts than one batch, raw and chat formats."""
  rs = np.random.RandomState(0)
  words = ['alpha', 'beta', 'gamma', 'delta', 'river', 'stone', 'seven', 'blue']
  pairs = []
  for q in range(7):
    context = ' '.join(rs.choice(words, 3 + 5 * q)) + '\nAnswer:'
    for c in range(2 + q % 3):
      pairs.append((context, ' ' + ' '.join(rs.choice(words, 1 + (q + c) % 4))))
  rs.shuffle(pairs)
  for r in (runner, runner.with_format('plain')):
    shared = r.loglik(pairs)
    alone = r.loglik(pairs, share_context=False)
    for (a, n, g), (b, m, h) in zip(shared, alone):
      assert n == m and g == h
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_cut_at_stop():
  assert cut_at_stop('Paris\nQ: next', ('\n',)) == 'Paris'
  assert cut_at_stop('a. b\n', ('\n', '.')) == 'a'
  assert cut_at_stop('abc', ()) == 'abc'


def test_general_multiple_choice_picks_the_highest_loglik(runner):
  opts = Options(num_examples=2)
  scores, preds = general.run_mmlu(runner, opts, general.DEFAULT_DATA['mmlu'])
  subject_rows = general._read_mmlu_csv(os.path.join(general.DEFAULT_DATA['mmlu'], 'test',
                                                     'elementary_mathematics_test.csv'))
  dev = general._read_mmlu_csv(os.path.join(general.DEFAULT_DATA['mmlu'], 'dev',
                                            'elementary_mathematics_dev.csv'))
  for row, pred in zip(subject_rows, preds):
    prompt = general.mmlu_prompt('elementary_mathematics', dev[:5], row)
    assert prompt.count('Answer:') == 6 and prompt.endswith('Answer:')
    lls = [runner.loglik([(prompt, f' {l}')])[0][0] for l in 'ABCD']
    assert pred['prediction'] == 'ABCD'[int(np.argmax(lls))]
    assert pred['score'] == float(pred['prediction'] == row['answer'])
  assert scores[0]['n'] == 2


def test_every_suite_runs_end_to_end_and_missing_answers_score_zero(runner, tmp_path):
  from jaxlm.evaluate.harness import run_suites
  opts = Options(num_examples=2, positions=[1, 3], num_docs=[3], max_new_tokens=3,
                 kv_lengths=[3], kv_fields={'keys_per_dict': (2, 2), 'gold_dict_size': 2,
                                            'key_digits': (2, 2), 'value_digits': (2, 2)})
  res = run_suites(runner, ['kv', 'mdqa', 'flenqa', 'general', 'litm_kv'], opts,
                   str(tmp_path), 'tiny', {'test': True}, {})
  suites = {s['suite'] for s in res['scores']}
  assert suites == {'kv', 'mdqa', 'flenqa', 'general', 'litm_kv'}
  mdqa_rows = [s for s in res['scores'] if s['suite'] == 'mdqa']
  assert {(s['variant'], s.get('gold_position')) for s in mdqa_rows} == {
      ('closedbook', None), ('oracle', 1), ('haystack', 1), ('haystack', 3)}
  metrics_ = {s['metric'] for s in res['scores'] if s['suite'] == 'general'}
  assert metrics_ == {'mmlu_accuracy', 'mmlu_subject_mean', 'hellaswag_acc',
                      'hellaswag_acc_norm', 'gsm8k_strict_match', 'gsm8k_flexible_extract',
                      'triviaqa_em', 'nq_open_em'}
  for suite in ('kv', 'mdqa', 'flenqa', 'general', 'litm_kv'):
    lines = open(tmp_path / f'predictions_{suite}.jsonl').read().splitlines()
    assert lines
    for line in lines:
      rec = json.loads(line)
      assert {'id', 'gold_position', 'prediction', 'answers', 'score', 'prompt'} <= set(rec)
      assert isinstance(rec['prompt'], str) and rec['prompt']
  # An untrained model answers (almost) nothing right: every example is still counted.
  for s in res['scores']:
    assert s['n'] > 0 and 0 <= s['value'] <= 1
  assert any('hand-made' in n for n in res['notes'])
  for png in ('mdqa_by_position.png', 'litm_kv_by_position.png', 'kv_heatmap.png'):
    assert os.path.getsize(tmp_path / png) > 1000
  saved = json.load(open(tmp_path / 'results.json'))
  assert saved['scores'] == json.loads(json.dumps(res['scores']))
  assert saved['throughput']['prefill_tokens'] > 0


def test_kv_suite_scores_a_perfect_answerer_as_perfect(runner):
  """With the generator swapped for an oracle that answers from the example, accuracy is 1;
  with one that answers nothing it is 0 (so the scoring can fail both ways)."""
  from jaxlm.data.tasks import make_task

  class Oracle:
    model, tokenizer = runner.model, runner.tokenizer

    def __init__(self, right):
      self.right = right

    render = staticmethod(lambda prompt: prompt)

    def generate(self, prompts, max_new_tokens, label=''):
      return [self.answers.pop(0) if self.right else '' for _ in prompts]

  opts = Options(num_examples=3, positions=[1, 3], kv_lengths=[3])
  # Build the expected answers in order: positions 1 then 3, examples 0..2.
  answers = []
  for p in (1, 3):
    t = make_task('simple_kv', runner.tokenizer, num_dicts=3, gold_position=p)
    answers += [t.example(kv.SEED, i).answer for i in range(3)]
  good = Oracle(True)
  good.answers = list(answers)
  res = kv.run(good, opts)
  assert all(s['value'] == 1.0 for s in res.scores)
  res = kv.run(Oracle(False), opts)
  assert all(s['value'] == 0.0 for s in res.scores) and len(res.predictions) == 6


# --- CLI ------------------------------------------------------------------------------------
def _run(args, cwd=ROOT):
  env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd)


def test_score_rows_carry_the_standard_error_and_compare_shows_it(tmp_path):
  from jaxlm.evaluate import compare
  from jaxlm.evaluate.common import score_row
  base = score_row('mdqa', 'best_subspan_em', [1.0] * 30 + [0.0] * 70, num_docs=10,
                   gold_position=1)
  # 0/1 scores: the sample standard error is the binomial one, up to n / (n - 1)
  assert base['n'] == 100 and base['value'] == pytest.approx(0.3)
  assert base['stderr'] == pytest.approx(np.sqrt(0.3 * 0.7 / 100) * np.sqrt(100 / 99))
  assert base['stderr'] == pytest.approx(np.std([1.0] * 30 + [0.0] * 70, ddof=1) / 10)
  assert np.isnan(score_row('kv', 'accuracy', [1.0])['stderr'])
  after = score_row('mdqa', 'best_subspan_em', [1.0] * 40 + [0.0] * 60, num_docs=10,
                    gold_position=1)
  runs = [{'name': 'base', 'scores': [base]}, {'name': 'tuned', 'scores': [after]}]
  text = compare.table(runs, markdown=True)
  row = text.splitlines()[2]
  assert '| 100 |' in row and '30.00 ± 4.61' in row and '40.00 ± 4.92 (+10.00)' in row, row
  # with predictions beside the results: the paired standard error of the difference
  rng = np.random.default_rng(0)
  a_scores, b_scores = rng.integers(0, 2, 50), rng.integers(0, 2, 50)
  for name, sc in (('base', a_scores), ('tuned', b_scores)):
    d = tmp_path / name
    d.mkdir()
    rows = [{'id': f'q{i}', 'variant': 'haystack', 'num_docs': 10, 'gold_position': g,
             'score': float(sc[i]) if g == 1 else 0.0} for g in (1, 10) for i in range(50)]
    with open(d / 'predictions_mdqa.jsonl', 'w') as f:
      f.write('\n'.join(json.dumps(r) for r in rows[::-1]) + '\n')   # order does not matter
    score = score_row('mdqa', 'best_subspan_em', [float(x) for x in sc], variant='haystack',
                      num_docs=10, gold_position=1)
    (d / 'results.json').write_text(json.dumps({'name': name, 'scores': [score]}))
  runs = [compare.load(str(tmp_path / 'base')), compare.load(str(tmp_path / 'tuned'))]
  diff = (b_scores - a_scores).astype(float)
  expected = np.std(diff, ddof=1) / np.sqrt(50)
  assert compare.paired_stderr(runs[0], runs[1], runs[0]['scores'][0]) == pytest.approx(expected)
  assert f'± {100 * expected:.2f} paired s.e.' in compare.table(runs)
  (tmp_path / 'tuned' / 'predictions_mdqa.jsonl').unlink()      # no predictions: no paired s.e.
  assert compare.paired_stderr(runs[0], runs[1], runs[0]['scores'][0]) is None
  # the position plot draws the standard errors
  from jaxlm.evaluate import plots
  assert plots.position_curves({r['name']: r['scores'] for r in runs}, str(tmp_path / 'p.png'),
                               suite='mdqa', metric='best_subspan_em', group_key='num_docs')
  assert (tmp_path / 'p.png').stat().st_size > 0


def test_cli_with_hf_and_checkpoint_then_compare(tmp_path):
  from tests.conftest import make_hf_model
  make_hf_model(tmp_path / "hf", vocab_size=32000, max_position_embeddings=8192)
  # A small file in Lost in the Middle's key-value format (the shipped one has 75 pairs).
  litm = tmp_path / 'kv-10.jsonl'
  with open(litm, 'w') as f:
    for i in range(3):
      pairs = [[f'k{i}-{j}', f'v{i}-{j}'] for j in range(10)]
      f.write(json.dumps({'ordered_kv_records': pairs, 'key': pairs[4][0],
                          'value': pairs[4][1]}) + '\n')
  out_a = tmp_path / 'a'
  r = _run(['-m', 'jaxlm.evaluate', f'--hf={tmp_path / "hf"}', '--suite=litm_kv',
            '--suite=flenqa', '--num_examples=2', '--positions=1,10', '--max_new_tokens=2',
            '--cot=no', f'--data=litm_kv={litm}', f'--out={out_a}', '--name=base',
            '--num_fewshot=0', '--chat_template'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'litm_kv' in r.stdout and (out_a / 'results.json').exists()
  res = json.load(open(out_a / 'results.json'))
  assert res['model']['chat_format'] == 'mistral' and res['name'] == 'base'
  assert res['settings']['shots'] == 0 and res['settings']['chat_template'] is True
  assert {s['gold_position'] for s in res['scores'] if s['suite'] == 'litm_kv'} == {1, 10}
  preds = [json.loads(l) for l in open(out_a / 'predictions_litm_kv.jsonl')]
  assert len(preds) == 4 and {p['answers'][0] for p in preds} == {'v0-4', 'v1-4'}

  # A short training run, evaluated from its checkpoint (config read from the run).
  run_dir = tmp_path / 'run'
  r = _run(['-m', 'jaxlm.train', '--config=tests/train_config.py', f'--workdir={run_dir}',
            '--config.train.steps=2'])
  assert r.returncode == 0, r.stderr[-3000:]
  out_b = tmp_path / 'b'
  r = _run(['-m', 'jaxlm.evaluate', f'--checkpoint={run_dir}', '--suite=kv',
            '--num_examples=2', '--kv_lengths=2,3', f'--out={out_b}'])
  assert r.returncode == 0, r.stderr[-3000:]
  res_b = json.load(open(out_b / 'results.json'))
  assert res_b['model']['step'] == 2
  assert {s['num_dicts'] for s in res_b['scores']} == {2, 3}

  # Malformed data: a clear error naming file and line, nonzero exit.
  bad = tmp_path / 'bad.jsonl'
  bad.write_text('{"label": "True"}\n')
  r = _run(['-m', 'jaxlm.evaluate', f'--hf={tmp_path / "hf"}', '--suite=flenqa',
            f'--data={bad}', f'--out={tmp_path / "c"}'])
  assert r.returncode != 0 and 'bad.jsonl:1: missing field' in r.stderr

  r = _run(['-m', 'jaxlm.evaluate.compare', str(out_a), str(out_b), f'--out={tmp_path / "cmp"}'])
  assert r.returncode == 0, r.stderr
  assert 'base' in r.stdout and 'litm_kv' in r.stdout and 'kv' in r.stdout
  assert (tmp_path / 'cmp' / 'comparison.md').exists()
  assert (tmp_path / 'cmp' / 'litm_kv_by_position.png').exists()
