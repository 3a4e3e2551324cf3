"""Multi-subkey dictionary key-value retrieval (the paper's GPT-3.5 Turbo data) applied to
Mistral-7B-Instruct-v0.1: 150 tasks of 49 dictionaries, 3 epochs (the appendix says 2).

  python -m jaxlm.train --config=configs/mistral7b_multisubkey_kv.py --workdir=runs/m7b_msk \\
      --config.init_from=/path/to/Mistral-7B-Instruct-v0.1

The paper fine-tuned GPT-3.5 Turbo on this data through OpenAI's API (export it with
`python -m jaxlm.data.export --task=multisubkey_kv --num=150 --format=openai ...`); running
it on Mistral is an ablation this codebase adds, with the simple-KV recipe's optimizer.
"""
from configs import mistral7b_simple_kv


def get_config():
  c = mistral7b_simple_kv.get_config()
  c.data.task = 'multisubkey_kv'
  c.data.task_fields = type(c.data.task_fields)({'num_dicts': 49, 'answer_template': True})
  c.data.num_examples = 150
  c.data.num_epochs = 3
  c.train.steps = 28                  # 450 examples / 16 per batch, last partial batch dropped
  c.eval.max_new_tokens = 64
  return c
