"""The CPU demo: a tiny Mistral learns simple key-value retrieval from scratch.

  python -m jaxlm.train --config=configs/tiny_kv.py --workdir=runs/local
  bash launch/local.sh              # the same, plus set-up
"""
from configs import base


def get_config():
  c = base.get_config()
  c.model.preset = 'tiny'
  c.model.vocab_size = 32000          # the Mistral tokenizer
  c.model.hidden_size = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.intermediate_size = 256
  c.model.sliding_window = None
  c.model.attention_impl = 'dense'
  c.data.task_fields.num_dicts = 3
  c.data.task_fields.keys_per_dict = (2, 2)
  c.data.task_fields.gold_dict_size = 2
  c.data.task_fields.key_digits = (2, 2)
  c.data.task_fields.value_digits = (2, 2)
  c.data.task_fields.answer_template = True
  c.data.task_fields.first_position_prob = 0.0
  c.data.task_fields.early_position_prob = 0.0
  c.data.seq_len = 256
  c.data.packing = True
  c.data.chat_format = 'none'
  c.train.steps = 300
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 30
  c.train.weight_decay = 0.01
  c.train.log_every = 25
  c.train.checkpoint_every = 100
  c.eval.per_position = 20
  c.eval.positions = [1, 2, 3]
  c.eval.max_new_tokens = 24
  c.mesh.fsdp = 1
  c.mesh.data = -1
  return c
