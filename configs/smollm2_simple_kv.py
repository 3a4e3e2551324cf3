"""The main job: the paper in miniature on a real pretrained instruct model.

  bash launch/local.sh                # = the command below, plus set-up
  python -m jaxlm.train --config=configs/smollm2_simple_kv.py --workdir=runs/local

SmolLM2-135M-Instruct (the embedded default: a GGUF file installed by launch/_env.sh, see
jaxlm/embedded.py), its own byte-level BPE tokenizer and ChatML chat template, read from the
same file. The run follows the paper's recipe on a CPU budget:
- held-out simple_kv accuracy by gold position of the base model (eval.before);
- fine-tuning with the loss on the answer only (the answer template, then <|im_end|>), on
  simple_kv prompts of 5 dictionaries that the Grain pipeline generates on the fly;
- the same held-out evaluation after, printed side by side with before, WORKDIR/eval_kv.json
  (`accuracy` after, `before`, `task`) and eval_kv.png with both curves;
- the fine-tuned model exported to WORKDIR/hf as a Hugging Face LlamaForCausalLM.
Another checkpoint in the same place: --config.init_from=/path/to/hf_dir or file.gguf.
"""
from configs import base


def get_config():
  c = base.get_config()
  c.init_from = 'embedded:smollm2-135m-instruct'
  c.tokenizer = ''                  # the checkpoint's own tokenizer
  c.model.attention_impl = 'auto'   # on CPU 'chunked' (exact; 1.16x the dense step here)
  c.data.task = 'simple_kv'
  c.data.task_fields.num_dicts = 5
  c.data.task_fields.answer_template = True
  c.data.chat_format = 'auto'       # ChatML, from the checkpoint's chat template
  c.data.seq_len = 384               # 5-dictionary prompts are 322-379 tokens in ChatML
  c.data.on_long = 'skip'
  c.train.steps = 106                # 318 examples: more, smaller steps than 80 of 4
  c.train.batch_size = 3
  c.train.lr = 1e-4
  c.train.schedule = 'cosine'
  c.train.end_lr_frac = 0.0
  c.train.warmup_steps = 10
  c.train.weight_decay = 0.0
  c.train.clip_norm = 0.0            # no clipping: at 1.0 it cut most steps (grad norms 2-6)
  c.train.b2 = 0.95
  c.train.loss_positions = 32        # answers are <= 24 tokens + <|im_end|>: the head runs there only
  c.train.log_every = 5
  c.train.checkpoint_every = 106
  c.train.keep_checkpoints = 1
  c.eval.before = True
  c.eval.per_position = 20
  c.eval.positions = (1, 2, 3, 4, 5)
  c.eval.max_new_tokens = 32
  c.eval.batch_size = 100            # all 100 prompts in one batch: decoding is memory-bound
  c.mesh.fsdp = -1
  c.mesh.devices = 1                 # a CPU job; on N devices: --config.mesh.devices=0 and a
                                     # train.batch_size that N divides
  return c
