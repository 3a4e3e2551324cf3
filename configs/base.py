"""Defaults every training config starts from; each config file overrides what it needs.

Field reference (all overridable: --config.train.steps=100, --config.mesh.fsdp=-1, ...):
  model.*   preset name plus any jaxlm.model.MistralConfig field
  data.*    jaxlm.data.pipeline.DataConfig fields (global batch = train.batch_size)
  train.*   optimizer, schedule, accumulation, logging and checkpoint cadence; train.lora.*
            LoRA adapters instead of full fine-tuning (jaxlm.lora)
  eval.*    held-out retrieval accuracy by gold position (periodic and final)
  mesh.*    device mesh sizes (one may be -1: the remaining devices)
"""
import dataclasses

import ml_collections

from jaxlm import lora
from jaxlm.config import RUN_FIELDS
from jaxlm.data.pipeline import DataConfig
from jaxlm.model import MistralConfig


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''                  # a Hugging Face checkpoint directory; '' = from scratch
  c.tokenizer = 'data/tokenizers/mistral-v1.model'
  c.init_hook = ''                  # from scratch: 'module:function' called as
                                    # function(model, tokenizer, config) after initialization
  c.export_hf = True                # write WORKDIR/hf at the end
  c.distributed = False             # jax.distributed.initialize() (multi-host launches)

  c.model = ml_collections.ConfigDict()
  c.model.preset = 'tiny'
  # Numerics and kernels (jaxlm.config.RUN_FIELDS, the same for every preset), with the
  # defaults of jaxlm.model.MistralConfig; architecture fields that differ from the preset
  # are added by the config files that change them (see tiny_kv.py).
  model_defaults = MistralConfig()
  for name in RUN_FIELDS:   # param_dtype, dtype, attention_impl, blocks, ring_layout, remat
    c.model[name] = getattr(model_defaults, name)
  c.model.attention_impl = 'auto'   # training picks by mesh and length (jaxlm.attention)

  # jaxlm.data.pipeline.DataConfig's fields and defaults (documented there); the global
  # batch is train.batch_size.
  c.data = ml_collections.ConfigDict({
      k: v for k, v in dataclasses.asdict(DataConfig()).items() if k != 'global_batch_size'})
  c.data.task_fields = ml_collections.ConfigDict()   # the task's config overrides

  c.train = ml_collections.ConfigDict()
  c.train.steps = 100
  c.train.batch_size = 16           # global, in sequences
  c.train.grad_accum = 1
  c.train.lr = 5e-6
  c.train.warmup_steps = 0
  c.train.schedule = 'cosine'       # cosine | linear | constant (after warmup)
  c.train.end_lr_frac = 0.1
  c.train.weight_decay = 0.0
  c.train.b1 = 0.9
  c.train.b2 = 0.95
  c.train.eps = 1e-8
  c.train.clip_norm = 1.0
  c.train.loss_positions = 0        # K>0: logits only at each row's first K answer tokens
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 3
  c.train.peak_flops_per_device = 0.0   # 0: look the chip up in jaxlm.flops.PEAK_FLOPS
  c.train.on_nonfinite = 'stop'     # a step with a non-finite loss or gradient norm applies
                                    # nothing; 'stop' ends the run, 'skip' goes on
  c.train.max_skipped_steps = 10    # 'skip': this many skipped steps in a row stop the run
  # LoRA (jaxlm.lora): rank > 0 trains low-rank adapters on the `targets` projections only;
  # the base is frozen in the compute dtype and has no optimizer state. The run exports
  # WORKDIR/hf (merged) and WORKDIR/hf_adapter (Hugging Face PEFT's adapter format).
  c.train.trainable_layers = 0      # n > 0: train the top n layers and the final norm only;
                                    # the embeddings/head and lower layers stay frozen
                                    # (jaxlm.freeze); 0: every parameter
  c.train.lora = ml_collections.ConfigDict()
  c.train.lora.rank = 0             # 0: full fine-tuning
  c.train.lora.alpha = 16.0         # scale alpha / rank
  c.train.lora.dropout = 0.0        # on the adapters' input, training steps only
  c.train.lora.targets = lora.TARGETS   # a tuple: --config.train.lora.targets="('q_proj','v_proj')"
  c.train.lora.use_rslora = False   # scale alpha / sqrt(rank)

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0                  # 0: only at the end
  c.eval.task = ''                  # '': the training task (with its fields that it has)
  c.eval.before = False             # also evaluate the initial model (before fine-tuning)
  c.eval.per_position = 20
  c.eval.positions = (0.0, 0.25, 0.5, 0.75, 1.0)   # a tuple: --config.eval.positions=(1,5) overrides it
  c.eval.seed = 10_000              # never used by training data
  c.eval.max_new_tokens = 32
  c.eval.batch_size = 16
  c.eval.task_fields = ml_collections.ConfigDict()

  c.mesh = ml_collections.ConfigDict({'data': 1, 'fsdp': -1, 'tensor': 1, 'context': 1,
                                      'devices': 0})   # devices: use the first N (0: all)

  c.debug = ml_collections.ConfigDict()
  c.debug.kill_at_step = 0          # fault injection for resume tests: SIGKILL after this step
  c.debug.sigterm_at_step = 0       # ... or SIGTERM (preemption)
  c.debug.sigint_at_step = 0        # ... or SIGINT (Ctrl-C)
  c.debug.signal_process = -1       # the process those signals go to (-1: every process)
  return c
