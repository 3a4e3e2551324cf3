"""General benchmarks that fine-tuning must not hurt (the paper's Table 2), each scored
as lm-evaluation-harness scores it (the reference file is named per benchmark; 0.4.x):

- MMLU (Hendrycks et al.; lm_eval/tasks/mmlu/default/_default_template_yaml): the original
  CSV release, `{dev,test}/{subject}_{split}.csv` with rows `question,A,B,C,D,answer`;
  "The following are multiple choice questions (with answers) about {subject}.\\n\\n",
  k-shot (default 5) from the first rows of the subject's dev file, each
  `{question.strip()}\\nA. ..\\nD. ..\\nAnswer: X` joined by a blank line; the answer is
  the letter " A".." D" of highest log-likelihood. Accuracy over all questions and the
  mean over subjects.
- HellaSwag (Zellers et al.; lm_eval/tasks/hellaswag/hellaswag.yaml and utils.py):
  hellaswag_{split}.jsonl with `ctx_a`, `ctx_b`, `activity_label`, `endings`, `label`;
  the log-likelihood of " " + each ending after the cleaned context; `acc`, and
  `acc_norm`: the log-likelihood divided by the ending's length in characters (the
  ending's, without the space).
- GSM8K (Cobbe et al.; lm_eval/tasks/gsm8k/gsm8k.yaml): test.jsonl with `question`,
  `answer` (ending `#### N`); 5-shot (`--shots`) from the *train* file
  (`--data=gsm8k_train=FILE`), drawn as lm-eval draws them (random.Random(1234), one
  sample of k per test question in order), each `Question: q\\nAnswer: {full answer}`
  joined by a blank line; greedy generation until "Question:" (or an end-of-turn token),
  256 new tokens; exact match after lm-eval's two filters: `strict-match` (the number after
  "#### ") and `flexible-extract` (the last number-like span), both reported.
- TriviaQA (Joshi et al.; lm_eval/tasks/triviaqa/default.yaml): the official JSON
  (`{"Data": [{"Question", "Answer": {"Aliases", ...}}]}`) or one record per line;
  `Question: {question}?\\nAnswer:` (a "?" is appended to every question, as the YAML
  does), generation until a newline, "." or ","; one leading space removed; exact match
  ignoring case and punctuation against any alias.
- NQ-Open (Lee et al.; lm_eval/tasks/nq_open/nq_open.yaml): jsonl with `question` and
  `answer` (or Lost in the Middle's `answers`); "Answer these questions:\\n\\n" then
  `Q: {question}?\\nA:` (few-shot examples joined by one newline), the same stops and
  filter; exact match ignoring case, punctuation and the articles of the YAML's regex.
  The reference data is the `nq_open` validation split (3610 questions); the default
  file here is Lost in the Middle's 2655-question subset of it (a note says so).

No chat template and no bos token by default (lm-eval's HF model encodes the raw prompt
with add_special_tokens=False): Options.chat_template=True (`--chat_template`) wraps each
prompt in the run's chat format instead. Few-shot examples for TriviaQA and NQ-Open
(`--shots`, default 0 as in lm-eval) are the file's first records, which are then not
evaluated (lm-eval samples them from the train split).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import random
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
    'gsm8k_train': os.path.join(DATA, 'gsm8k', 'train.jsonl'),   # few-shot examples
    'triviaqa': os.path.join(SAMPLES, 'triviaqa.sample.json'),
    'nq_open': os.path.join(DATA, 'lost-in-the-middle', 'nq-open-oracle.jsonl.gz'),
}
DEFAULT_SHOTS = {'mmlu': 5, 'gsm8k': 5, 'triviaqa': 0, 'nq_open': 0, 'hellaswag': 0}
FEWSHOT_SEED = 1234   # lm-eval's default fewshot_random_seed
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
  s = row['question'].strip() + ''.join(f'\n{l}. {c}' for l, c in zip(LETTERS, row['choices']))
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
                    'subject': subject, 'prompt': runner.render(pairs[4 * i][0]),
                    'choices': [f' {l}' for l in LETTERS],
                    'loglik': [ll[4 * i + j][0] for j in range(4)]})
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
    norm = [x / len(e) for x, e in zip(lls, r['endings'])]   # lm-eval: len(choice)
    acc.append(float(int(np.argmax(lls)) == r['label']))
    acc_norm.append(float(int(np.argmax(norm)) == r['label']))
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': int(np.argmax(norm)),
                  'answers': [r['label']], 'score': acc_norm[-1], 'benchmark': 'hellaswag',
                  'prompt': runner.render(r['query']), 'choices': [' ' + e for e in r['endings']],
                  'loglik': lls})
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


QA_STOP = ('\n', '.', ',')   # lm-eval's `until` for triviaqa and nq_open


def qa_prompt(benchmark: str, question: str, answer: str | None = None) -> str:
  """lm-eval's doc_to_text (the question as given, "?" appended), with ` answer` for a
  few-shot example."""
  s = f'Q: {question}?\nA:' if benchmark == 'nq_open' else f'Question: {question}?\nAnswer:'
  return s + (f' {answer}' if answer is not None else '')


def qa_context(benchmark: str, shots: list[dict], question: str) -> str:
  """description + few-shot examples + the question, with the task's delimiters."""
  description = 'Answer these questions:\n\n' if benchmark == 'nq_open' else ''
  delim = '\n' if benchmark == 'nq_open' else '\n\n'
  head = ''.join(qa_prompt(benchmark, s['question'], s['answers'][0]) + delim for s in shots)
  return description + head + qa_prompt(benchmark, question)


def qa_score(benchmark: str, output: str, answers: list[str]) -> float:
  ignore = metrics.NQ_OPEN_IGNORE if benchmark == 'nq_open' else ()
  return metrics.lm_eval_exact_match(metrics.remove_leading_space(output), answers,
                                     regexes_to_ignore=ignore, ignore_case=True,
                                     ignore_punctuation=True)


def run_short_qa(runner, opts, path, benchmark):
  rows = _qa_rows(path, benchmark)
  k = DEFAULT_SHOTS[benchmark] if opts.shots is None else opts.shots
  shots, rows = rows[:k], take(rows[k:], opts.num_examples)   # shots never evaluated
  prompts = [qa_context(benchmark, shots, r['question']) for r in rows]
  outs = runner.generate(prompts, max_new_tokens=opts.max_new_tokens or 32, stop=QA_STOP,
                         label=benchmark)
  vals, preds = [], []
  for r, out, prompt in zip(rows, outs, prompts):
    v = qa_score(benchmark, out, r['answers'])
    vals.append(v)
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': out,
                  'answers': r['answers'], 'score': v, 'benchmark': benchmark,
                  'prompt': runner.render(prompt)})
  return [score_row('general', f'{benchmark}_em', vals, data=path, shots=k)], preds


GSM8K_STOP = ('Question:', '</s>', '<|im_end|>')   # lm-eval's `until`


def read_gsm8k(path: str) -> list[dict]:
  rows = []
  for lineno, rec in read_jsonl(path, ('question', 'answer')):
    try:
      gold = metrics.gsm8k_gold(rec['answer'])
    except ValueError as e:
      raise DataError(f'{path}:{lineno}: {e}') from e
    rows.append({'id': f'{os.path.basename(path)}:{lineno}', 'question': rec['question'],
                 'answer': rec['answer'], 'gold': gold})
  if not rows:
    raise DataError(f'{path}: no records')
  return rows


def gsm8k_prompts(test: list[dict], train: list[dict], k: int,
                  seed: int = FEWSHOT_SEED) -> list[str]:
  """Each test question after k examples sampled from train as lm-eval samples them: one
  random.Random(seed), `rnd.sample(train, k)` per question in order."""
  rnd = random.Random(seed)
  out = []
  for r in test:
    shots = rnd.sample(train, k) if k else []
    head = ''.join(f'Question: {s["question"]}\nAnswer: {s["answer"]}\n\n' for s in shots)
    out.append(head + f'Question: {r["question"]}\nAnswer:')
  return out


def gsm8k_scores(output: str, answer: str) -> dict[str, float | str]:
  """lm-eval's two GSM8K filters and exact_match against the full answer field."""
  kw = dict(regexes_to_ignore=metrics.GSM8K_IGNORE, ignore_case=True)
  strict = metrics.lm_eval_regex(output, metrics.GSM8K_STRICT)
  flexible = metrics.lm_eval_regex(output, metrics.GSM8K_FLEXIBLE, group_select=-1)
  return {'strict': strict, 'flexible': flexible,
          'strict_match': metrics.lm_eval_exact_match(strict, [answer], **kw),
          'flexible_extract': metrics.lm_eval_exact_match(flexible, [answer], **kw)}


def run_gsm8k(runner, opts, path):
  test = take(read_gsm8k(path), opts.num_examples)
  k = DEFAULT_SHOTS['gsm8k'] if opts.shots is None else opts.shots
  train_path = opts.path('gsm8k_train', DEFAULT_DATA['gsm8k_train']) if k else None
  train = read_gsm8k(train_path) if k else []
  if len(train) < k:
    raise DataError(f'gsm8k: {k}-shot needs {k} examples in {train_path}, found {len(train)}')
  prompts = gsm8k_prompts(test, train, k)
  outs = runner.generate(prompts, max_new_tokens=opts.max_new_tokens or 256, stop=GSM8K_STOP,
                         label='gsm8k')
  strict, flexible, preds = [], [], []
  for r, out, prompt in zip(test, outs, prompts):
    s = gsm8k_scores(out, r['answer'])
    strict.append(s['strict_match'])
    flexible.append(s['flexible_extract'])
    preds.append({'id': r['id'], 'gold_position': None, 'prediction': out,
                  'extracted': {'strict-match': s['strict'], 'flexible-extract': s['flexible']},
                  'answers': [r['gold']], 'score': s['strict_match'], 'benchmark': 'gsm8k',
                  'prompt': runner.render(prompt)})
  rows = dict(data=path, shots=k, fewshot_data=train_path)
  return [score_row('general', 'gsm8k_strict_match', strict, **rows),
          score_row('general', 'gsm8k_flexible_extract', flexible, **rows)], preds


def check(opts: Options, benchmarks=BENCHMARKS) -> None:
  """Every benchmark's data read and its few-shot source checked, without the model."""
  for b in benchmarks:
    path = opts.path(b, DEFAULT_DATA[b])
    if b == 'mmlu':
      k = DEFAULT_SHOTS['mmlu'] if opts.shots is None else opts.shots
      for subject in mmlu_subjects(path):
        _read_mmlu_csv(os.path.join(path, 'test', f'{subject}_test.csv'))
        dev_file = os.path.join(path, 'dev', f'{subject}_dev.csv')
        if k and len(_read_mmlu_csv(dev_file)) < k:
          raise DataError(f'mmlu: {k}-shot needs {k} rows in {dev_file}')
    elif b == 'hellaswag':
      list(read_jsonl(path, ('ctx_a', 'ctx_b', 'activity_label', 'endings', 'label')))
    elif b == 'gsm8k':
      read_gsm8k(path)
      k = DEFAULT_SHOTS['gsm8k'] if opts.shots is None else opts.shots
      if k:
        train_path = opts.path('gsm8k_train', DEFAULT_DATA['gsm8k_train'])
        if len(read_gsm8k(train_path)) < k:
          raise DataError(f'gsm8k: {k}-shot needs {k} examples in {train_path}')
    else:
      rows = _qa_rows(path, b)
      k = DEFAULT_SHOTS[b] if opts.shots is None else opts.shots
      if len(rows) <= k:
        raise DataError(f'{b}: {path} has {len(rows)} records; {k} few-shot examples leave '
                        'none to evaluate')


def run(runner, opts: Options, benchmarks=BENCHMARKS) -> SuiteResult:
  scores, preds, notes = [], [], []
  if not opts.chat_template:   # lm-eval's default: the raw prompt, no bos
    runner = runner.with_format('plain')
  for b in benchmarks:
    path = opts.path(b, DEFAULT_DATA[b])
    if os.path.abspath(path).startswith(os.path.abspath(SAMPLES)):
      notes.append(f'general/{b}: the shipped data are hand-made sample records, not {b}')
    if b == 'nq_open' and path == DEFAULT_DATA['nq_open']:
      notes.append('general/nq_open: Lost in the Middle\'s 2655-question subset of the NQ-Open '
                   'validation split (lm-eval uses all 3610: --data=nq_open=FILE)')
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
