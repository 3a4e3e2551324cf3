"""Exercise the model stack end to end on synthetic input and print what it measured.

Builds a model from a preset, checks it against the tokenizer, runs a forward pass on
random token batches (logits statistics), round-trips the weights through the Hugging
Face format, and decodes greedily with the KV cache from a tokenized retrieval prompt.

  python -m jaxlm.smoke --config=configs/smoke.py
"""

from __future__ import annotations

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from flax import nnx
from ml_collections import config_flags

from jaxlm import convert, generate
from jaxlm.model import get_config, init_model
from jaxlm.tokenizer import Tokenizer

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/smoke.py', 'smoke-run config')

PROMPT = (
    'Do a task using the list of dictionaries below.\n\n'
    'Dictionary [1] {2031: 681, 922: 2494, 2786: 5769}\n'
    'Dictionary [2] {5561: 7320, 348: 9015, 1007: 66}\n\n'
    'Above is a list of dictionaries such that each key and value is an integer. '
    'Report the value of key 922 and the dictionary it is in.')


def run(c) -> dict[str, float]:
  cfg = get_config(c.model.preset, dtype=c.model.dtype, param_dtype=c.model.param_dtype,
                   attention_impl=c.model.attention_impl)
  tok = Tokenizer(c.tokenizer)
  tok.check_model(cfg)
  print(f'[smoke] jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} '
        f'device(s); model {c.model.preset}: {cfg.num_params() / 1e6:.1f}M params, '
        f'{cfg.num_layers} layers, d={cfg.hidden_size}, {cfg.num_heads}/{cfg.num_kv_heads} heads')
  model = init_model(cfg, seed=c.seed)
  tokens = jax.random.randint(jax.random.key(c.seed), (c.batch, c.seq_len + 1), 3,
                              tok.vocab_size)
  forward = nnx.jit(lambda m, t: m(t))
  t0 = time.perf_counter()
  logits = forward(model, tokens[:, :-1]).block_until_ready()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  logits = forward(model, tokens[:, :-1]).block_until_ready()
  step_s = time.perf_counter() - t0
  logp = jax.nn.log_softmax(logits)
  nll = float(-jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean())
  stats = dict(mean=float(logits.mean()), std=float(logits.std()), min=float(logits.min()),
               max=float(logits.max()), nll=nll, uniform_nll=math.log(cfg.vocab_size))
  print(f'[smoke] forward {c.batch}x{c.seq_len}: compile {compile_s:.1f}s, '
        f'{c.batch * c.seq_len / step_s:,.0f} tokens/s')
  print('[smoke] logits ' + ', '.join(f'{k}={v:.4f}' for k, v in stats.items()))
  if not np.isfinite(np.asarray(logits)).all():
    raise RuntimeError('non-finite logits')

  path = os.path.join(c.workdir, 'hf_checkpoint')
  convert.save_hf(cfg, model, path)
  _, reloaded = convert.load_hf(path, dtype=c.model.param_dtype)
  diff = float(jnp.abs(forward(reloaded, tokens[:, :-1]) - logits).max())
  print(f'[smoke] Hugging Face round trip via {path}: max |logit difference| = {diff:.2e}')
  stats['roundtrip_max_diff'] = diff

  prompt = tok.encode(PROMPT)
  t0 = time.perf_counter()
  out = generate.greedy_generate(model, [prompt] * 2, max_new_tokens=c.max_new_tokens,
                                 eos_id=tok.eos_id, pad_id=tok.pad_id)
  print(f'[smoke] greedy decode with KV cache: prompt {len(prompt)} tokens, '
        f'{c.max_new_tokens} new tokens x 2 rows in {time.perf_counter() - t0:.1f}s '
        f'(includes compilation); an untrained model answers noise:')
  print(f'[smoke]   {tok.decode(out[0])!r}')
  return stats


def main(argv):
  del argv
  run(_CONFIG.value)


if __name__ == '__main__':
  app.run(main)
