"""The evaluation suites follow their references' conventions (issue 19). Each expected
value below is worked out by hand from the reference's own rules, named per test:
lm-evaluation-harness's task YAMLs, filters (lm_eval/filters/extraction.py) and metric
(lm_eval/api/metrics.py exact_match), Lost in the Middle's scripts/evaluate_kv_responses.py
and the FLenQA notebook."""
import json
import random

import pytest

from jaxlm.evaluate import metrics
from jaxlm.evaluate.common import Options
from jaxlm.evaluate.suites import flenqa, general, litm_kv


# --- lm-eval's exact_match and filters --------------------------------------------------------
def test_triviaqa_exact_match_ignores_case_and_punctuation_but_keeps_articles():
  score = lambda out, aliases: general.qa_score('triviaqa', out, aliases)
  assert score(' The Beatles', ['the beatles']) == 1.0          # one leading space dropped
  assert score(' Paris.', ['Paris']) == 1.0                     # punctuation dropped
  assert score(' Beatles', ['The Beatles']) == 0.0              # articles kept (not SQuAD)
  assert score('  Paris', ['Paris']) == 0.0                     # only one space is removed
  assert score(' paris', ['London', 'PARIS']) == 1.0            # any alias
  assert score(' Paris France', ['Paris']) == 0.0               # whole-string match


def test_nq_open_exact_match_drops_the_yaml_articles():
  score = lambda out, answers: general.qa_score('nq_open', out, answers)
  assert score(' The Beatles', ['Beatles']) == 1.0              # "The " removed from both
  assert score(' a dog', ['dog']) == 1.0
  assert score(' theater', ['ater']) == 0.0                     # \b(?:the ) needs the space
  assert score(' U.S.', ['us']) == 1.0                          # punctuation, then case


def test_gsm8k_strict_and_flexible_filters():
  gold = 'She sold 9 * 2 = <<9*2=18>>18 clips.\n#### 1,018'
  s = general.gsm8k_scores('The total is 1,018.\n#### 1,018', gold)
  assert (s['strict'], s['strict_match'], s['flexible_extract']) == ('1,018', 1.0, 1.0)
  s = general.gsm8k_scores('so she paid $1018.', gold)          # no "####": strict fails
  assert s['strict'] == metrics.INVALID and s['strict_match'] == 0.0
  assert s['flexible'] == '$1018.' and s['flexible_extract'] == 1.0   # $ and final . ignored
  s = general.gsm8k_scores('First 12, then 1018 and finally 7', gold)
  assert s['flexible'] == '7' and s['flexible_extract'] == 0.0  # the LAST number-like span
  assert metrics.lm_eval_regex('no digits', metrics.GSM8K_FLEXIBLE, -1) == metrics.INVALID


# --- prompts ---------------------------------------------------------------------------------
def test_qa_prompts_are_the_yaml_templates():
  # triviaqa: "Question: {{question}}?\nAnswer:" appends "?" even after one
  assert general.qa_context('triviaqa', [], 'Who wrote Hamlet?') == \
      'Question: Who wrote Hamlet??\nAnswer:'
  shot = {'question': 'capital of france', 'answers': ['Paris', 'paris']}
  assert general.qa_context('triviaqa', [shot], 'q2') == (
      'Question: capital of france?\nAnswer: Paris\n\nQuestion: q2?\nAnswer:')
  # nq_open: the description, then examples joined by a single newline
  assert general.qa_context('nq_open', [shot, shot], 'who is x') == (
      'Answer these questions:\n\nQ: capital of france?\nA: Paris\n'
      'Q: capital of france?\nA: Paris\nQ: who is x?\nA:')
  assert general.QA_STOP == ('\n', '.', ',')


def test_gsm8k_shots_come_from_train_as_lm_eval_samples_them():
  train = [{'question': f't{i}', 'answer': f'work {i}\n#### {i}'} for i in range(20)]
  test = [{'question': 'q0'}, {'question': 'q1'}]
  prompts = general.gsm8k_prompts(test, train, 3)
  rnd = random.Random(1234)                                     # lm-eval's fewshot seed
  for row, prompt in zip(test, prompts):
    shots = rnd.sample(train, 3)                                # one draw per question, in order
    want = ''.join(f'Question: {s["question"]}\nAnswer: {s["answer"]}\n\n' for s in shots)
    assert prompt == want + f'Question: {row["question"]}\nAnswer:'
  assert prompts[0].split('\n\n')[:3] != prompts[1].split('\n\n')[:3]
  assert general.DEFAULT_SHOTS['gsm8k'] == 5 and general.GSM8K_STOP[0] == 'Question:'
  assert general.DEFAULT_DATA['gsm8k_train'].endswith('gsm8k/train.jsonl')


def test_mmlu_strips_the_question():
  row = {'question': '  What is 2+2?\n', 'choices': ['1', '2', '3', '4'], 'answer': 'D'}
  assert general.mmlu_format(row, False) == 'What is 2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:'


class _Stub:
  """A runner that returns fixed log-likelihoods / outputs and records what it was asked."""

  def __init__(self, lls=None, outputs=None):
    self.lls, self.outputs, self.calls = lls, outputs, []

  def with_format(self, name):
    self.calls.append(('with_format', name))
    return self

  def render(self, prompt):
    return prompt

  def loglik(self, pairs, label=''):
    self.calls.append(('loglik', pairs))
    return [(x, 1, False) for x in self.lls[:len(pairs)]]

  def generate(self, prompts, max_new_tokens, stop=(), label='', **kw):
    self.calls.append(('generate', prompts, max_new_tokens, tuple(stop)))
    return self.outputs[:len(prompts)]


def test_hellaswag_acc_norm_divides_by_the_length_of_the_ending(tmp_path):
  # endings 'a' (1 char) and 'abc' (3 chars): lm-eval's len(ending) gives -2.2 vs -2.1
  # (ending 1); dividing by len(' ' + ending) would give -1.1 vs -1.575 (ending 0)
  path = tmp_path / 'hs.jsonl'
  path.write_text(json.dumps({'ctx_a': 'A man', 'ctx_b': 'walks', 'activity_label': 'Walking',
                              'endings': ['a', 'abc', 'abcdefghij', 'abcdefghij'],
                              'label': 1}) + '\n')
  stub = _Stub(lls=[-2.2, -6.3, -100.0, -100.0])
  (acc, acc_norm), preds = general.run_hellaswag(stub, Options(), str(path))
  assert acc_norm['value'] == 1.0 and acc['value'] == 0.0
  assert stub.calls[0][1][0] == ('Walking: A man Walks', ' a')  # " " + ending is scored
  assert preds[0]['prompt'] == 'Walking: A man Walks'


def test_general_prompts_are_raw_unless_a_chat_template_is_asked(tmp_path):
  path = tmp_path / 'tqa.jsonl'
  path.write_text(json.dumps({'question': 'Who?', 'answer': {'aliases': ['Me']}}) + '\n')
  for chat_template, formats in ((False, [('with_format', 'plain')]), (True, [])):
    stub = _Stub(outputs=[' Me'])
    opts = Options(data={'triviaqa': str(path)}, chat_template=chat_template)
    res = general.run(stub, opts, benchmarks=('triviaqa',))
    assert [c for c in stub.calls if c[0] == 'with_format'] == formats
    (_, prompts, max_new, stop), = [c for c in stub.calls if c[0] == 'generate']
    assert prompts == ['Question: Who??\nAnswer:'] and stop == ('\n', '.', ',')
    assert res.scores[0]['value'] == 1.0 and res.predictions[0]['prompt'] == prompts[0]


def test_the_plain_format_adds_no_bos_and_moves_trailing_space_to_the_continuation():
  from jaxlm.evaluate.runner import Runner
  from jaxlm.model import get_config, init_model
  from jaxlm.tokenizer import Tokenizer
  tok = Tokenizer()
  cfg = get_config('tiny', vocab_size=tok.vocab_size, num_layers=1, sliding_window=None)
  plain = Runner(init_model(cfg), tok, chat_format='mistral', verbose=False).with_format('plain')
  assert plain.render('Q?') == 'Q?'
  ctx, cont = plain.split_pair('Question: 2+2?\nAnswer: ', 'B')   # HFLM._encode_pair
  assert ctx == tok.encode('Question: 2+2?\nAnswer:', bos=False) and ctx[0] != tok.bos_id
  assert ctx + cont == tok.encode('Question: 2+2?\nAnswer: B', bos=False)


# --- Lost in the Middle kv and FLenQA ---------------------------------------------------------
def test_litm_kv_scores_the_value_anywhere_in_the_output_case_ignored():
  value = '9f1c2e3a-AB12-4cd5-8ef6-0123456789ab'
  assert litm_kv.kv_accuracy(f'Sure!\nThe value is "{value.lower()}".', value) == 1.0
  assert litm_kv.kv_accuracy('Sure!\nI cannot find it.', value) == 0.0
  # the first-line best-subspan score it replaces would have said 0 for the first case
  assert metrics.best_subspan_em(metrics.first_line(f'Sure!\n{value}'), [value]) == 0.0


def test_flenqa_generates_400_tokens_for_both_prompt_types():
  assert flenqa.MAX_NEW_TOKENS == {False: 400, True: 400}


# --- checks before work ------------------------------------------------------------------------
class _NoModel:
  """Any model call fails the test: the checks must come first."""
  tokenizer = None
  stats = {}

  def __getattr__(self, name):
    raise AssertionError(f'the model was used ({name}) before every setting was checked')


def test_every_setting_is_checked_against_the_data_before_the_first_model_call(tmp_path):
  import gzip
  from jaxlm.evaluate.common import DataError
  from jaxlm.evaluate.harness import run_suites
  from jaxlm.evaluate.suites import mdqa
  rows = [json.loads(line) for line in gzip.open(mdqa.DEFAULT_DATA, 'rt')][:12]
  small = tmp_path / 'small.jsonl'
  small.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  opts = Options(data={'mdqa': str(small)}, num_docs=[3, 20], num_examples=2)
  # 3 documents would fit; 20 cannot (12 questions): refused before mdqa's first setting runs
  with pytest.raises(DataError, match=r'--num_docs 20: only \d+ usable distractors .* need 19 '
                                      r'\(the file has 12 questions'):
    run_suites(_NoModel(), ['mdqa'], opts, str(tmp_path / 'out'), 'x', {}, {})
  # a later suite's bad setting stops the run before an earlier suite starts
  opts = Options(data={'mdqa': str(small), 'gsm8k_train': str(tmp_path / 'missing.jsonl')},
                 num_docs=[3], num_examples=2)
  with pytest.raises(DataError, match="gsm8k_train: data file .*missing.jsonl' does not exist"):
    run_suites(_NoModel(), ['mdqa', 'general'], opts, str(tmp_path / 'out'), 'x', {}, {},
               benchmarks=('gsm8k',))
  with pytest.raises(ValueError, match=r'--positions \[7\] are outside 1..3 for 3 documents'):
    run_suites(_NoModel(), ['litm_kv', 'mdqa'], Options(data={'mdqa': str(small)}, num_docs=[3],
                                                       positions=[1, 7]),
               str(tmp_path / 'out'), 'x', {}, {})
