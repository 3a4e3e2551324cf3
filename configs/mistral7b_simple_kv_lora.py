"""The paper's Mistral 7B recipe with LoRA instead of full fine-tuning: the same data,
prompts and schedule as configs/mistral7b_simple_kv.py, adapters of rank 16 on every
attention and MLP projection (jaxlm.lora), the base frozen in bfloat16.

  python -m jaxlm.train --config=configs/mistral7b_simple_kv_lora.py --workdir=runs/m7b_lora \\
      --config.init_from=/path/to/Mistral-7B-Instruct-v0.1
  python -m jaxlm.train --config=configs/mistral7b_simple_kv_lora.py --aot_only --topology=v6e-1

Why: full fine-tuning keeps float32 master weights and two AdamW moments for all 7.24B
parameters (~116 GB) and needs a v5p-8; with LoRA the frozen base is 14.5 GB of bfloat16
and the trainable state ~0.5 GB, so one accelerator holds the recipe (BENCHMARKS.md, "Will
it fit", the LoRA rows: v6e-1 and an 80 GB GPU). The global batch stays the paper's 16
sequences, as 16 micro-batches of one (train.grad_accum) so that one chip's activations fit;
on more chips lower grad_accum (batch_size / grad_accum must be divisible by the chips).
Learning rate: LoRA's usual 1e-4 (PEFT/QLoRA recipes use 1e-4..2e-4), since adapters start
at zero and the paper's 5e-6 would barely move them in 43 steps; this is our choice, not
the paper's (the paper fine-tunes every parameter).
"""
from configs import mistral7b_simple_kv


def get_config():
  c = mistral7b_simple_kv.get_config()
  c.train.lora.rank = 16
  c.train.lora.alpha = 32.0
  c.train.lora.dropout = 0.05
  c.train.lora.targets = ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj',
                          'down_proj')
  c.train.lr = 1e-4
  c.train.grad_accum = 16             # micro-batches of one sequence: one chip holds them
  c.mesh.fsdp = -1
  return c
