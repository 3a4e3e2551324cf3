"""Smoke run of the model stack on synthetic input (the main job until the trainer lands).

  python -m jaxlm.smoke --config=configs/smoke.py
  python -m jaxlm.smoke --config=configs/smoke.py --config.model.preset=tiny --config.batch=2
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch = 4
  c.seq_len = 256
  c.max_new_tokens = 16
  c.tokenizer = 'data/tokenizers/mistral-v1.model'
  c.workdir = 'runs/smoke'
  c.model = ml_collections.ConfigDict()
  c.model.preset = 'small'        # a name in jaxlm.model.PRESETS
  c.model.dtype = 'float32'       # compute dtype
  c.model.param_dtype = 'float32'
  c.model.attention_impl = 'dense'
  return c
