"""General benchmarks that fine-tuning must not hurt (the paper's Table 2).

- MMLU (Hendrycks et al.): the original CSV release, `{dev,test}/{subject}_{split}.csv`
  with rows `question,A,B,C,D,answer`; k-shot (default 5) from the subject's dev file;
  the answer is the letter with the highest log-likelihood after `Answer:`. Accuracy over
  all questions and the mean over subjects.
- HellaSwag (Zellers et al.): hellaswag_{split}.jsonl with `ctx_a`, `ctx_b`,
  `activity_label`, `endings`, `label`; log-likelihood of each ending after the context,
  `acc` (raw) and `acc_norm` (divided by the ending's length in characters), with the
  usual clean-up of WikiHow bracket tags.
- GSM8K (Cobbe et al.): test.jsonl with `question`, `answer` (ending `#### N`);
  `Question: ...\\nAnswer:` with k-shot worked solutions (default 0), greedy generation,
  the final number against N.
- TriviaQA (Joshi et al.): the official JSON (`{"Data": [{"Question", "Answer":
  {"Aliases", ...}}]}`) or one such record per line; `Question: ...?\\nAnswer:`, exact match
  against the aliases after normalization.
- NQ-Open (Lee et al.): jsonl with `question` and `answer` (or Lost in the Middle's
  `answers`); `Q: ...?\\nA:`, exact match against the answers.

Generation stops at a newline for the short-answer tasks, as in common harnesses.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re

import numpy as np

from jaxlm.evaluate import metrics
from jaxlm.evaluate.common import (DATA, DataError, Options, SAMPLES, SuiteResult, read_jsonl,
                                   score_row, take)

BENCHMARKS = ('mmlu', 'hellaswag', 'gsm8k', 'triviaqa', 'nq_open')
DEFAULT_DATA = {
    'mmlu': os.path.join(SAMPLES, 'mmlu.sample'),
    'hellaswag': os.path.join(SAMPLES, 'hellaswag.sample.jsonl'),
    'gsm8k': os.path.join(DATA, 'gsm8k', 'test.jsonl'),
    'triviaqa': os.path.join(SAMPLES, 'triviaqa.sample.json'),
    'nq_open': os.path.join(DATA, 'lost-in-the-middle', 'nq-open-oracle.jsonl.gz'),
}
DEFAULT_SHOTS = {'mmlu': 5, 'gsm8k': 0, 'triviaqa': 0, 'nq_open': 0, 'hellaswag': 0}
LETTERS = 'ABCD'


# --- MMLU ---------------------------------------------------------------------------------
def _read_mmlu_csv(path: str) -> list[dict]:
  rows = []
  with open(path, newline='', encoding='utf-8') as f:
    for lineno, row in enumerate(csv.reader(f), 1):
      if len(row) != 6 or row[5].strip() not in LETTERS:
        raise DataError(f'{path}:{lineno}: expected question,A,B,C,D,answer with answer in '
                        f'A-D; got {len(row)} fields {row[-1:]!r}')
      rows.append({'question': row[0], 'choices': row[1:5], 'answer': row[5].strip(),
                   'id': f'{os.path.basename(path)}:{lineno}'})
  return rows


def mmlu_subjects(root: str) -> list[str]:
  files = sorted(glob.glob(os.path.join(root, 'test', '*_test.csv')))
  if not files:
    raise DataError(f'mmlu: no test/*_test.csv files under {root!r}')
  return [os.path.basename(f)[:-len('_test.csv')] for f in files]


def mmlu_format(row: dict, with_answer: bool) -> str:
  s = row['question'] + ''.join(f'\n{l}. {c}' for l, c in zip(LETTERS, row['choices']))
  return s + '\nAnswer:' + (f' {row["answer"]}\n\n' if with_answer else '')


def mmlu_prompt(subject: str, shots: list[dict], row: dict) -> str:
  head = ('The following are multiple choice questions (with answers) about '
          f'{subject.replace("_", " ")}.\n\n')
  return head + ''.join(mmlu_format(s, True) for s in shots) + mmlu_format(row, False)


def run_mmlu(runner, opts, path):
  k = DEFAULT_SHOTS['mmlu'] if opts.shots is None else opts.shots
  scores, preds, by_subject = [], [], {}
  for subject in mmlu_subjects(path):
    test = take(_read_mmlu_csv(os.path.join(path, 'test', f'{subject}_test.csv')), opts.num_examples)
    dev_file = os.path.join(path, 'dev', f'{subject}_dev.csv')
    dev = _read_mmlu_csv(dev_file) if k else []
    if len(dev) < k:
      raise DataError(f'mmlu: {k}-shot needs {k} rows in {dev_file}, found {len(dev)}')
    pairs = [(mmlu_prompt(subject, dev[:k], row), f' {l}') for row in test for l in LETTERS]
    ll = runner.loglik(pairs, label=f'mmlu {subject}')
    vals = []
    for i, row in enumerate(test):
      choice = LETTERS[int(np.argmax([ll[4 * i + j][0] for j in range(4)]))]
      v = float(choice == row['answer'])
      vals.append(v)
      preds.append({'id': row['id'], 'gold_position': None, 'prediction': choice,
                    'answers': [row['answer']], 'score': v, 'benchmark': 'mmlu',
                    'subject': subject})
    by_subject[subject] = vals
  all_vals = [v for vals in by_subject.values() for v in vals]
  scores.append(score_row('general', 'mmlu_accuracy', all_vals, data=path, shots=k))
  scores.append({**score_row('general', 'mmlu_subject_mean', [metrics_mean(v) for v in
                                                             by_subject.values()], data=path,
                             shots=k), 'n': len(all_vals)})
  return scores, preds


def metrics_mean(vals):
  return float(np.mean(vals)) if vals else float('nan')


# --- HellaSwag ----------------------------------------------------------------------------
def hellaswag_clean(text: str) -> str:
  text = text.strip().replace(' [title]', '. ')
  text = re.sub(r'\[.*?\]', '', text)
  return text.replace('  ', ' ')


def run_hellaswag(runner, opts, path):
  rows = []
  for lineno, rec in read_jsonl(path, ('ctx_a', 'ctx_b', 'activity_label', 'endings', 'label')):
    if len(rec['endings']) != 4 or not 0 <= int(rec['label']) < 4:
      raise DataError(f'{path}:{lineno}: expected 4 endings and a label in 0..3')
    ctx = rec['ctx_a'] + ' ' + rec['ctx_b'].capitalize()
    rows.append({'id': rec.get('ind', f'{os.path.basename(path)}:{lineno}'),
                 'query': hellaswag_clean(rec['activity_label'] + ': ' + ctx),
                 'endings': [hellaswag_clean(e) for e in rec['endings']], 'label': int(rec['label'])})
  rows = take(rows, opts.num_examples)
  pairs = [(r['query'], ' ' + e) for r in rows for e in r['endings']]
  ll = runner.loglik(pairs, label='hellaswag')
  acc, acc_norm, preds = [], [], []
  for i, r in enumerate(rows):
    lls = [ll[4 * i + j][0] for j in range(4)]
    norm = [x / len(' ' + e) for x, e in zip(lls, r['endings'])]
    acc.append(float(int(np.argmax(lls)) == r['label']))
    acc_norm.append(float(int(np.argmax(norm)) == r['label']))
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': int(np.argmax(norm)),
                  'answers': [r['label']], 'score': acc_norm[-1], 'benchmark': 'hellaswag'})
  return [score_row('general', 'hellaswag_acc', acc, data=path),
          score_row('general', 'hellaswag_acc_norm', acc_norm, data=path)], preds


# --- generation benchmarks ----------------------------------------------------------------
def _qa_rows(path: str, benchmark: str) -> list[dict]:
  rows = []
  if benchmark == 'triviaqa' and not path.endswith(('.jsonl', '.jsonl.gz')):
    try:
      with open(path, encoding='utf-8') as f:
        data = json.load(f)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno}: not valid JSON ({e.msg})') from e
    if not isinstance(data, dict) or 'Data' not in data:
      raise DataError(f'{path}: expected the TriviaQA JSON with a "Data" list')
    records = [(i + 1, r) for i, r in enumerate(data['Data'])]
    where = lambda n: f'{path}: Data[{n - 1}]'
  else:
    records = list(read_jsonl(path))
    where = lambda n: f'{path}:{n}'
  for n, rec in records:
    if benchmark == 'triviaqa':
      q = rec.get('Question', rec.get('question'))
      ans = rec.get('Answer', rec.get('answer')) or {}
      aliases = ans.get('Aliases', ans.get('aliases')) if isinstance(ans, dict) else None
      rid = rec.get('QuestionId', rec.get('question_id'))
    else:
      q = rec.get('question')
      aliases = rec.get('answer', rec.get('answers'))
      rid = rec.get('id')
    if not isinstance(q, str) or not isinstance(aliases, list) or not aliases:
      raise DataError(f'{where(n)}: needs a question and a non-empty answer list')
    rows.append({'id': rid or f'{os.path.basename(path)}:{n}', 'question': q, 'answers': aliases})
  if not rows:
    raise DataError(f'{path}: no records')
  return rows


def qa_prompt(benchmark: str, question: str, answer: str | None = None) -> str:
  q = question.strip().rstrip('?')
  s = f'Q: {q}?\nA:' if benchmark == 'nq_open' else f'Question: {q}?\nAnswer:'
  return s + (f' {answer}\n\n' if answer is not None else '')


def run_short_qa(runner, opts, path, benchmark):
  rows = _qa_rows(path, benchmark)
  k = DEFAULT_SHOTS[benchmark] if opts.shots is None else opts.shots
  shots, rows = rows[:k], take(rows[k:], opts.num_examples)   # shots never evaluated
  head = ''.join(qa_prompt(benchmark, s['question'], s['answers'][0]) for s in shots)
  outs = runner.generate([head + qa_prompt(benchmark, r['question']) for r in rows],
                         max_new_tokens=opts.max_new_tokens or 32, stop=('\n',), label=benchmark)
  vals, preds = [], []
  for r, out in zip(rows, outs):
    v = metrics.exact_match(out.strip(), r['answers'])
    vals.append(v)
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': out,
                  'answers': r['answers'], 'score': v, 'benchmark': benchmark})
  return [score_row('general', f'{benchmark}_em', vals, data=path, shots=k)], preds


def run_gsm8k(runner, opts, path):
  rows = []
  for lineno, rec in read_jsonl(path, ('question', 'answer')):
    try:
      gold = metrics.gsm8k_gold(rec['answer'])
    except ValueError as e:
      raise DataError(f'{path}:{lineno}: {e}') from e
    rows.append({'id': f'{os.path.basename(path)}:{lineno}', 'question': rec['question'],
                 'answer': rec['answer'], 'gold': gold})
  k = DEFAULT_SHOTS['gsm8k'] if opts.shots is None else opts.shots
  shots, rows = rows[:k], take(rows[k:], opts.num_examples)

  def solution(s):   # the worked answer with its calculator annotations removed
    body, n = s['answer'].split('####')
    return re.sub(r'<<.*?>>', '', body).strip() + f' The answer is {n.strip()}.'
  head = ''.join(f'Question: {s["question"]}\nAnswer: {solution(s)}\n\n' for s in shots)
  outs = runner.generate([head + f'Question: {r["question"]}\nAnswer:' for r in rows],
                         max_new_tokens=opts.max_new_tokens or 256,
                         stop=('\n\nQuestion:', '\n\n\n'), label='gsm8k')
  vals, preds = [], []
  for r, out in zip(rows, outs):
    got = metrics.gsm8k_number(out)
    v = float(got == r['gold'])
    vals.append(v)
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': out, 'extracted': got,
                  'answers': [r['gold']], 'score': v, 'benchmark': 'gsm8k'})
  return [score_row('general', 'gsm8k_accuracy', vals, data=path, shots=k)], preds


def run(runner, opts: Options, benchmarks=BENCHMARKS) -> SuiteResult:
  scores, preds, notes = [], [], []
  for b in benchmarks:
    path = opts.path(b, DEFAULT_DATA[b])
    if os.path.abspath(path).startswith(os.path.abspath(SAMPLES)):
      notes.append(f'general/{b}: the shipped data are hand-made sample records, not {b}')
    if b == 'mmlu':
      s, p = run_mmlu(runner, opts, path)
    elif b == 'hellaswag':
      s, p = run_hellaswag(runner, opts, path)
    elif b == 'gsm8k':
      s, p = run_gsm8k(runner, opts, path)
    else:
      s, p = run_short_qa(runner, opts, path, b)
    scores += s
    preds += p
  return SuiteResult(scores, preds, notes=notes)
