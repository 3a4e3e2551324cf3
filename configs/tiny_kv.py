"""The CPU demo: a tiny Mistral learns simple key-value retrieval from scratch.

  python -m jaxlm.train --config=configs/tiny_kv.py --workdir=runs/local
  bash launch/local.sh              # the same, plus set-up

The paper's task in miniature: 1 to 4 dictionaries (drawn per example; evaluation uses 4)
of 2-3 pairs, 1-2 digit keys and values, the answer template. Numbers are single tokens of a 382-piece tokenizer
(data/tokenizers/kv-tiny.model, built by jaxlm/data/tiny_tokenizer.py), so a 2-layer
model can learn retrieval as one induction step; several examples are packed per
512-token row, so each step supervises many answers.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.tokenizer = 'data/tokenizers/kv-tiny.model'
  c.model.preset = 'tiny'
  c.model.vocab_size = 512
  c.model.hidden_size = 128
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.head_dim = 32
  c.model.intermediate_size = 512
  c.model.sliding_window = None
  c.model.attention_impl = 'dense'
  c.data.task_fields.num_dicts = (1, 4)   # drawn per example: easy ones bootstrap retrieval
  c.data.task_fields.curriculum_examples = 0
  c.data.task_fields.extra_queries = 0
  c.data.task_fields.keys_per_dict = (2, 3)
  c.data.task_fields.gold_dict_size = 2
  c.data.task_fields.key_digits = (1, 2)
  c.data.task_fields.value_digits = (1, 2)
  c.data.task_fields.answer_template = True
  c.data.task_fields.first_position_prob = 0.0
  c.data.task_fields.early_position_prob = 0.0
  c.data.seed = 1
  c.data.seq_len = 512
  c.data.packing = True
  c.data.chat_format = 'none'
  c.train.steps = 900                 # about 10 minutes on 2 CPU cores
  c.train.batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 60
  c.train.b2 = 0.98
  c.train.weight_decay = 0.01
  c.train.log_every = 50
  c.train.checkpoint_every = 200
  c.eval.every = 300
  c.eval.per_position = 25
  c.eval.positions = [1, 2, 3, 4]
  c.eval.task_fields.num_dicts = 4        # evaluate on the hardest size
  c.eval.max_new_tokens = 24
  c.eval.batch_size = 50
  c.mesh.data, c.mesh.fsdp, c.mesh.devices = 1, 1, 1
  return c
