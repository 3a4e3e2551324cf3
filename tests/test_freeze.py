"""Partial fine-tuning (train.trainable_layers, jaxlm.freeze): only the top layers and the
final norm move and hold optimizer state; the backward pass stops at the lowest trained
layer (the compiled step's FLOPs against jaxlm.flops); config errors and resume rules."""
import jax
import numpy as np
import pytest
from flax import nnx

from jaxlm import flops
from jaxlm import train as trainer
from jaxlm.model import get_config, init_model
from test_train import small_config


def _config(trainable_layers=1, **overrides):
  c = small_config(train__steps=3, **overrides)
  c.model.num_layers = 3
  c.train.trainable_layers = trainable_layers
  return c


def _trained(path):
  return path[0] == 'final_norm' or (path[0] == 'layers' and path[1] == 2)


def test_only_the_top_layers_move_and_hold_optimizer_state(tmp_path):
  c = _config()
  c.mesh.fsdp, c.mesh.devices = 2, 2
  logs = []
  result = trainer.train(c, str(tmp_path), log=logs.append)
  assert any('training the top 1 of 3 layers and the final norm' in l for l in logs)
  model, optimizer = nnx.merge(result['graphdef'], result['state'])
  start = dict(nnx.to_flat_state(nnx.state(init_model(trainer.model_config(c), seed=c.seed),
                                           nnx.Param)))
  trained_shapes = []
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    same = np.array_equal(np.asarray(var[...]), np.asarray(start[path][...]))
    assert same != _trained(path), path
    if _trained(path):
      trained_shapes.append(var.shape)
  moments = [x.shape for x in jax.tree.leaves(nnx.state(optimizer.opt_state)) if x.ndim]
  assert sorted(moments) == sorted(2 * trained_shapes)


def test_compiled_step_stops_the_backward_at_the_lowest_trained_layer():
  """XLA's FLOP count of the compiled step against jaxlm.flops' formula for full
  fine-tuning, every layer (embeddings frozen), the top two and the top one: the formula
  tracks the compiled program within 3% as layers freeze (XLA also counts elementwise work,
  ~6% here). Had the frozen layers still run their input gradients, the top-one step would
  be ~10% above the formula, not on it."""
  reports = {}
  for n in (0, 3, 2, 1):
    c = _config(n, train__batch_size=2)
    c.model.hidden_size, c.model.intermediate_size = 256, 1024
    c.model.num_heads, c.model.num_kv_heads, c.model.head_dim = 4, 2, 64
    reports[n] = trainer.train(c, '/tmp/unused-aot', aot_only=True, log=lambda s: None)
  ratio = {n: r['compiler_flops_per_device'] / r['model_flops_per_step']
           for n, r in reports.items()}
  assert all(1.0 <= x < 1.1 for x in ratio.values()), ratio
  assert max(ratio.values()) - min(ratio.values()) < 0.03, ratio
  saved = lambda r: reports[0][r] - reports[1][r]   # two layers' backward, the head's weight
  assert saved('compiler_flops_per_device') == pytest.approx(
      saved('model_flops_per_step'), rel=0.1)


def test_formula_counts_forward_plus_the_trained_layers_backward():
  cfg = get_config('tiny', tie_word_embeddings=True)
  T, K = 384, 32
  forward = flops.forward_flops_per_token(cfg, T, K)
  head = flops.head_flops_per_token(cfg, T, K)
  assert head == 2 * cfg.vocab_size * cfg.hidden_size * K / T
  per_layer = (forward - head) / cfg.num_layers
  assert flops.train_flops_per_token(cfg, T, K, trainable_layers=1) == pytest.approx(
      forward + 2 * per_layer + head)
  # every layer trained, the embedding frozen: full fine-tuning less the head's weight gradient
  assert flops.train_flops_per_token(cfg, T, K, trainable_layers=cfg.num_layers) == \
      pytest.approx(flops.train_flops_per_token(cfg, T, K) - head)


@pytest.mark.parametrize('change, match', [
    (dict(trainable_layers=-1), r'train.trainable_layers=-1: must be an integer >= 0'),
    (dict(trainable_layers=True), r'train.trainable_layers=True: must be an integer'),
    (dict(trainable_layers=4), r'train.trainable_layers=4: the model has 3 layers'),
    (dict(lora=4), r'train.trainable_layers=1 and train.lora.rank=4: choose one'),
    (dict(scan=True), r'train.trainable_layers=1 needs model.scan_layers=False'),
])
def test_config_errors_name_the_field(tmp_path, change, match):
  c = _config(change.get('trainable_layers', 1))
  c.train.lora.rank = change.get('lora', 0)
  c.model.scan_layers = change.get('scan', False)
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.train(c, str(tmp_path / 'run'), log=lambda s: None)
  assert not (tmp_path / 'run').exists()   # refused before anything is written
  with pytest.raises(trainer.ConfigError, match=match):   # and before an AOT compile
    trainer.train(c, str(tmp_path / 'aot'), aot_only=True, log=lambda s: None)


def test_a_resumed_run_may_not_change_what_it_trains():
  from jaxlm import workdir as workdir_lib
  saved = {'train': {'steps': 4, 'trainable_layers': 10}}
  refused, _ = workdir_lib.diff(saved, {'train': {'steps': 4, 'trainable_layers': 12}})
  assert [l.split(':')[0] for l in refused] == ['train.trainable_layers']
  # a run from before the field: every parameter trained, as 0 means
  refused, allowed = workdir_lib.diff({'train': {'steps': 4}},
                                      {'train': {'steps': 4, 'trainable_layers': 0}})
  assert refused == [] and len(allowed) == 1
  refused, _ = workdir_lib.diff({'train': {'steps': 4}},
                                {'train': {'steps': 4, 'trainable_layers': 2}})
  assert [l.split(':')[0] for l in refused] == ['train.trainable_layers']
