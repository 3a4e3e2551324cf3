"""FLenQA (Levy, Jacoby and Goldberg 2024, alonj/Same-Task-More-Tokens): True/False
reasoning over facts padded to 250-3000 tokens, with and without chain of thought.

Records (its FLenQA.zip jsonl): `label` (True/False), `dataset` (PIR, MonoRel,
Simplified RuleTaker), `assertion/question`, `mixin` (the facts inside the padding),
`rule` (RuleTaker only), `padding_type`, `dispersion`, `ctx_size`. Prompts are the
repository's per task, in a direct and a chain-of-thought form; the answer is read by its
rule (`metrics.flenqa_category`): the last of true/false decides, else 'other/refused',
which counts as wrong. Accuracy is reported by task, ctx_size and prompt form. Reference:
the repository's `FLenQA analysis.ipynb` (prompts, the answer rule, 400 output tokens for
both prompt forms).
"""

from __future__ import annotations

import os

from jaxlm.evaluate import metrics
from jaxlm.evaluate.common import DataError, Options, SAMPLES, SuiteResult, read_jsonl, score_row, take

DEFAULT_DATA = os.path.join(SAMPLES, 'flenqa.sample.jsonl')
MAX_NEW_TOKENS = {False: 400, True: 400}   # the reference notebook: 400 for both prompt types


def prompt(rec: dict, cot: bool) -> str:
  q, mixin = rec['assertion/question'], rec['mixin']
  task = rec['dataset']
  if task == 'PIR':
    if cot:
      return ('Show your steps then answer with \u2019true\u2019 or \u2019false\u2019.\n'
              f'{mixin}\nTrue/False Question: {q}\n'
              'Let\u2019s work this out in a step by step way to\nbe sure we have the right answer.\n')
    return f'{mixin}\nTrue/False Question: {q}\nAnswer only True or False.\n'
  if task == 'MonoRel':
    head = (f'Here are some facts. Answer the exact following question based on the text: {q} '
            'Answer the question as it appears exactly.\n')
    if cot:
      return (head + 'Show your steps then answer with \u2019true\u2019 or \u2019false\u2019.\n'
              f'{mixin}\n{q}\n'
              'Let\u2019s work this out in a step by step way to be sure we have the right answer. '
              'Show your work and finally answer with \u2019true\u2019 or \u2019false\u2019. The final '
              'step should include the exact text of the question and the answer.\n')
    return head + f'{mixin}\n{q}\nAnswer only True or False.\n'
  if task == 'Simplified RuleTaker':
    rule = rec['rule']
    if cot:
      return (f'Answer whether the statement {q} can be derived from the rule and the facts.\n'
              'Show your steps then answer with either "True" or "False".\n'
              f'Rule: {rule}\nFacts: {mixin}\n'
              'Answer with either "True or "False". Let\'s work this out in a step by step way '
              'to be sure we have the right answer.\n')
    return (f'Answer whether the statement {q} can be derived from the rule and the facts. '
            'Answer with either "True" or "False".\n'
            f'Rule: {rule}\nFacts: {mixin}\nAnswer with either "True or "False".\n')
  raise ValueError(f'unknown FLenQA dataset {task!r}')


TASKS = ('PIR', 'MonoRel', 'Simplified RuleTaker')


def load(path: str) -> list[dict]:
  out = []
  for lineno, rec in read_jsonl(path, ('label', 'dataset', 'assertion/question', 'mixin')):
    if rec['dataset'] not in TASKS:
      raise DataError(f'{path}:{lineno}: dataset {rec["dataset"]!r} is not one of {TASKS}')
    if rec['dataset'] == 'Simplified RuleTaker' and 'rule' not in rec:
      raise DataError(f'{path}:{lineno}: a Simplified RuleTaker record needs a rule')
    if str(rec['label']).strip().lower() not in ('true', 'false'):
      raise DataError(f'{path}:{lineno}: label {rec["label"]!r} is not True or False')
    rec = dict(rec)
    rec['id'] = rec.get('global_sample_id', f'{os.path.basename(path)}:{lineno}')
    out.append(rec)
  if not out:
    raise DataError(f'{path}: no records')
  return out


def check(opts: Options) -> None:
  load(opts.path('flenqa', DEFAULT_DATA))


def run(runner, opts: Options) -> SuiteResult:
  path = opts.path('flenqa', DEFAULT_DATA)
  records = take(load(path), opts.num_examples)
  scores, preds = [], []
  for cot in opts.cot:
    prompts = [prompt(r, cot) for r in records]
    outs = runner.generate(prompts, max_new_tokens=opts.max_new_tokens or MAX_NEW_TOKENS[cot],
                           label=f'flenqa {"cot" if cot else "direct"}')
    groups: dict[tuple, list[float]] = {}
    for r, out, text in zip(records, outs, prompts):
      category = metrics.flenqa_category(out)
      v = float(category == str(r['label']).strip().lower())
      preds.append({'id': r['id'], 'gold_position': r.get('dispersion'), 'prediction': out,
                    'answers': [str(r['label'])], 'score': v, 'category': category,
                    'task': r['dataset'], 'ctx_size': r.get('ctx_size'), 'cot': cot,
                    'prompt': runner.render(text)})
      for key in ((r['dataset'], r.get('ctx_size')), (r['dataset'], 'all'), ('all', 'all')):
        groups.setdefault(key, []).append(v)
    for (task, size), vals in sorted(groups.items(), key=lambda kv: str(kv[0])):
      scores.append(score_row('flenqa', 'accuracy', vals, data=path, task=task, ctx_size=size,
                              cot=cot))
  notes = ['flenqa: the shipped data are hand-made sample records, not FLenQA'] if (
      os.path.abspath(path).startswith(os.path.abspath(SAMPLES))) else []
  return SuiteResult(scores, preds, notes=notes)
