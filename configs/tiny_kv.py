"""The CPU demo: a tiny Mistral learns simple key-value retrieval from scratch.

  python -m jaxlm.train --config=configs/tiny_kv.py --workdir=runs/local
  bash launch/local.sh              # the same, plus set-up

The paper's task in miniature: 4 dictionaries of 2 pairs, 1-digit keys (each used once) and
values, the answer template. Designed for data efficiency on 2 CPU cores (BENCHMARKS.md, "The
CPU demo", has the runs behind each choice):
- an 895-piece tokenizer (data/tokenizers/kv-tiny-pairs.model, jaxlm/demo/tokenizers.py)
  in which every fixed sentence of the task, each header `Dictionary [D] {`, each pair of
  1-digit numbers with its separator (`3: 7, `), each `K is ` and each
  `V and it is in Dictionary [` is one piece: the value is then one attention hop from the
  answer's `K is ` to the pair, where a separate key and value token need an induction step
  (a previous-token head) that does not form in 10 minutes here;
- embed_init='compose': every merged piece starts as the scaled sum of its parts' rows
  (`3: 7, ` = `3: ` + `7` + `, `), with initializer_range 0.125, so that all pairs share a
  direction and the head that carries a dictionary's index into its pairs can form (with
  random rows and no size hint it stayed near chance for 1500 steps: BENCHMARKS run I8);
- every dictionary the same size (no curriculum): with 1-2 pairs and a gold one of 2, the
  model settles on the size hint (~50%) instead of learning the index;
- several queries per sequence: after the answer, up to 8 more keys of the same prompt,
  each with a value used once in it (extra_unique_values), are asked as extra turns with
  the question's short form (`extra_question='short'`);
- a 0.2M-parameter, 2-layer model (d=64, 4 heads of 16); rows of 128 tokens, batch 48,
  data generated in the main thread while the previous step runs (0.21-0.29 s/step here);
- AdamW 3e-3, cosine decay to half the rate: the index forms late (step ~1000-1500), and a
  rate decayed to 10% left one seed of two at 73%.
What it reaches (BENCHMARKS.md, "The CPU demo"): the value in every held-out example from
the first evaluation (step 450); value and dictionary index both right in 99% at step 1800,
in 8 min 54 s on 2 cores. Other seeds (--config.seed=S --config.data.seed=S) give 100% and 81%: where the index
forms moves by hundreds of steps.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.tokenizer = 'data/tokenizers/kv-tiny-pairs.model'
  c.init_hook = 'jaxlm.demo.embed_init:init_hook'
  c.embed_init = 'compose'          # (the hook's field) a merged piece starts as the sum of its parts
  c.model.preset = 'tiny'
  c.model.vocab_size = 896
  c.model.hidden_size = 64
  c.model.num_layers = 2
  c.model.num_heads = 4
  c.model.num_kv_heads = 4
  c.model.head_dim = 16
  c.model.intermediate_size = 128
  c.model.initializer_range = 0.125   # with compose: parts that add up stay distinguishable
  c.model.sliding_window = None
  c.model.attention_impl = 'dense'
  c.data.task = 'demo_kv'           # simple_kv + extra turns (jaxlm/demo/kv.py)
  c.data.task_fields.num_dicts = (4, 4)   # always 4 of 2 pairs: no size hint to the index
  c.data.task_fields.curriculum_examples = 0
  c.data.task_fields.extra_queries = 8
  c.data.task_fields.extra_question = 'short'
  c.data.task_fields.keys_per_dict = (2, 2)
  c.data.task_fields.gold_dict_size = 2
  c.data.task_fields.key_digits = (1, 1)
  c.data.task_fields.value_digits = (1, 1)
  c.data.task_fields.unique_keys = 'all'
  c.data.task_fields.extra_unique_values = True
  c.data.task_fields.answer_template = True
  c.data.task_fields.first_position_prob = 0.0
  c.data.task_fields.early_position_prob = 0.0
  c.data.seed = 1
  c.data.seq_len = 128
  c.data.packing = True
  c.data.chat_format = 'none'
  c.data.num_threads = 0             # threads lose to the GIL here (BENCHMARKS.md)
  c.train.steps = 1800                # about 9 minutes on 2 CPU cores, evaluation included
  c.train.batch_size = 48
  c.train.lr = 3e-3
  c.train.end_lr_frac = 0.5           # the index still forms late: keep the rate up
  c.train.warmup_steps = 30
  c.train.b2 = 0.98
  c.train.weight_decay = 0.01
  c.train.log_every = 25
  c.train.checkpoint_every = 450
  c.eval.every = 450
  c.eval.per_position = 25
  c.eval.positions = (1, 2, 3, 4)
  c.eval.task = 'simple_kv'               # held out: the first turn only
  c.eval.task_fields.num_dicts = 4        # evaluate on the hardest size
  c.eval.max_new_tokens = 24
  c.eval.batch_size = 50
  c.mesh.data, c.mesh.fsdp, c.mesh.devices = 1, -1, 1   # launch/multiprocess.sh: all devices
  return c
