"""The trainer tests' small run, as a config file (tests/test_train.py uses it in-process
and through the CLI): `python -m jaxlm.train --config=tests/train_config.py`."""
from configs import tiny_kv


def get_config(**overrides):
  c = tiny_kv.get_config()
  c.model.hidden_size, c.model.num_layers, c.model.intermediate_size = 32, 1, 64
  c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 8
  c.data.seq_len = 256
  c.train.batch_size, c.train.steps, c.train.log_every = 8, 6, 1
  c.train.checkpoint_every, c.train.warmup_steps = 2, 2
  c.eval.per_position = 0
  c.export_hf = False
  c.data.num_threads = 0
  c.mesh.data, c.mesh.fsdp, c.mesh.devices = 1, -1, 1   # launch/multiprocess.sh: all devices
  for k, v in overrides.items():
    section, field = k.split('__')
    c[section][field] = v
  return c
