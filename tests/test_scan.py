"""Scanned layers (model.scan_layers): the stacked model against the unrolled one and
transformers (logits, generation, one training step), conversion both ways, GGUF, the
'layers' axis in the sharding rules."""
import numpy as np
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from conftest import hf_logits
from jaxlm import convert, generate
from jaxlm import sharding as shd
from jaxlm import train as trainer
from jaxlm.model import get_config, init_model

TOKENS = np.random.RandomState(0).randint(0, 128, (2, 20))


def test_scanned_load_matches_transformers_and_saves_back(hf_checkpoint, tmp_path):
  import transformers
  path, hf = hf_checkpoint
  cfg, model = convert.load_hf(str(path), scan_layers=True)
  assert cfg.scan_layers and model.layers.attn.q_proj.shape[0] == cfg.num_layers
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))), hf_logits(hf, TOKENS),
                             atol=1e-4, rtol=0)
  convert.save_hf(cfg, model, str(tmp_path / 'out'))   # one tensor per layer, as HF names
  back = transformers.MistralForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(hf, TOKENS))
  # the unrolled model of the same checkpoint: the same logits and greedy continuation
  _, flat = convert.load_hf(str(tmp_path / 'out'))
  np.testing.assert_allclose(model(jnp.asarray(TOKENS)), flat(jnp.asarray(TOKENS)),
                             atol=1e-5, rtol=0)
  prompts = [[5, 9, 3, 7], [11, 2]]
  np.testing.assert_array_equal(
      generate.greedy_generate(model, prompts, max_new_tokens=6),
      generate.greedy_generate(flat, prompts, max_new_tokens=6))


def test_scanned_gguf_load_equals_unrolled(tmp_path):
  from test_gguf import tiny_llama, write_gguf
  path = write_gguf(tmp_path / 'tiny.gguf', tiny_llama(True))
  _, flat = convert.load_gguf(path)
  _, scanned = convert.load_gguf(path, scan_layers=True)
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 96, (2, 16)))
  np.testing.assert_allclose(scanned(tokens), flat(tokens), atol=1e-5, rtol=0)


def _stacked_state(flat_model, scanned_model):
  """The unrolled model's parameters written into the scanned model (stacked)."""
  unrolled = nnx.to_flat_state(nnx.state(flat_model, nnx.Param))
  by_path = {p: v[...] for p, v in unrolled}
  target = nnx.state(scanned_model, nnx.Param)
  for p, v in nnx.to_flat_state(target):
    if p[0] == 'layers':
      n = flat_model.cfg.num_layers
      v[...] = jnp.stack([by_path[('layers', i) + p[1:]] for i in range(n)])
    else:
      v[...] = by_path[p]
  nnx.update(scanned_model, target)


@pytest.mark.parametrize('remat, dtype', [('none', 'float32'), ('full', 'float32'),
                                          ('full', 'bfloat16')])
def test_one_training_step_equals_the_unrolled_models(remat, dtype):
  """bfloat16: the recipe's mixed precision (float32 parameters, bfloat16 compute), where
  the scanned model casts the stacked parameters before the scan: the same arithmetic."""
  cfg = get_config('tiny', num_layers=3, remat=remat, dtype=dtype)
  flat = init_model(cfg, seed=3)
  scanned = init_model(cfg.replace(scan_layers=True), seed=0)
  _stacked_state(flat, scanned)
  rs = np.random.RandomState(4)
  batch = {'inputs': jnp.asarray(rs.randint(0, 512, (4, 32))),
           'targets': jnp.asarray(rs.randint(0, 512, (4, 32))),
           'loss_mask': jnp.asarray((rs.rand(4, 32) < 0.3).astype(np.int32)),
           'positions': jnp.broadcast_to(jnp.arange(32), (4, 32)),
           'segment_ids': jnp.ones((4, 32), jnp.int32)}
  from train_config import get_config as run_config
  t = run_config().train
  schedule = trainer.make_schedule(t)
  results = []
  for model in (flat, scanned):
    opt = nnx.Optimizer(model, trainer.make_optimizer(t, schedule), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))
    step = jax.jit(trainer.make_train_step(graphdef, 1, schedule))
    state, metrics = step(state, batch)
    state, metrics = step(state, batch)   # two steps: the optimizer moments count too
    results.append((nnx.merge(graphdef, state)[0], metrics))
  (m_flat, a), (m_scan, b) = results
  # bfloat16 is fused and rounded differently: Adam's sign-like first steps turn a rounding
  # difference in a near-zero gradient into one of up to lr (3e-3) per step
  tol = 1 if dtype == 'float32' else 10
  np.testing.assert_allclose(a['loss'], b['loss'], rtol=1e-6 * tol)
  np.testing.assert_allclose(a['grad_norm'], b['grad_norm'], rtol=1e-5 * tol)
  for i in range(cfg.num_layers):
    for scan, flat_ in ((m_scan.layers.attn.q_proj[...][i], m_flat.layers[i].attn.q_proj[...]),
                        (m_scan.layers.mlp.down_proj[...][i], m_flat.layers[i].mlp.down_proj[...])):
      diff = np.abs(np.asarray(scan) - np.asarray(flat_))
      if dtype == 'float32':
        assert diff.max() < 1e-5, diff.max()
      else:
        assert diff.max() <= 2 * 3e-3 and np.mean(diff > 1e-5) < 0.02, (diff.max(),
                                                                        np.mean(diff > 1e-5))


def test_the_layers_axis_is_named_and_replicated():
  model = init_model(get_config('tiny', scan_layers=True))
  q = model.layers.attn.q_proj
  assert q.get_metadata()['out_sharding'] == ('layers', 'embed', 'heads', 'head_dim')
  mesh = shd.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2, 'context': 1}, jax.devices()[:4])
  spec = shd.param_sharding(q, mesh).spec
  assert spec == jax.sharding.PartitionSpec(None, 'fsdp', 'tensor', None)
