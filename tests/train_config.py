"""The trainer tests' small run, as a config file (tests/test_train.py uses it in-process
and through the CLI): `python -m jaxlm.train --config=tests/train_config.py`.
It derives from configs/base.py (the core path: the Mistral tokenizer and chat format,
simple_kv), not from the from-scratch demo (tests/test_demo.py covers that)."""
from configs import base


def get_config(**overrides):
  c = base.get_config()
  c.model.preset = 'tiny'
  c.model.vocab_size = 32000                 # the Mistral v1 tokenizer's
  c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 1, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 8
  c.model.attention_impl = 'dense'
  c.data.task_fields.num_dicts = 3
  c.data.task_fields.keys_per_dict = (2, 2)
  c.data.task_fields.gold_dict_size = 2
  c.data.task_fields.key_digits = (1, 2)
  c.data.task_fields.value_digits = (1, 2)
  c.data.seq_len = 320                       # two examples per packed row
  c.data.packing = True
  c.train.batch_size, c.train.steps, c.train.log_every = 8, 6, 1
  c.train.lr, c.train.b2, c.train.end_lr_frac = 3e-3, 0.98, 0.5
  c.train.checkpoint_every, c.train.warmup_steps = 2, 2
  c.eval.per_position = 0
  c.eval.positions = (1, 2, 3)
  c.eval.max_new_tokens = 24
  c.export_hf = False
  c.mesh.data, c.mesh.fsdp, c.mesh.devices = 1, -1, 1   # launch/multiprocess.sh: all devices
  for k, v in overrides.items():
    section, field = k.split('__')
    c[section][field] = v
  return c
