"""LoRA (jaxlm.lora) against Hugging Face PEFT: the adapter forward, the PEFT adapter format
both ways, merged export through transformers, and LoRA training in the trainer (frozen
base, optimizer state for the adapters only, shardings, bit-exact resume with dropout)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_logits
from jaxlm import convert, lora
from jaxlm import sharding as shd
from jaxlm import train as trainer
from jaxlm.model import get_config, init_model
from test_llama_family import make_family_model
from test_train import small_config

TOKENS = np.random.RandomState(0).randint(0, 128, (2, 20))


@pytest.fixture(scope='module')
def llama(tmp_path_factory):
  """(path, torch model): a tiny random transformers Llama with untied embeddings."""
  path = tmp_path_factory.mktemp('lora_llama')
  return path, make_family_model(path, 'llama', seed=3)


def _randomize(model, seed=0):
  """B is zero at attach (outputs unchanged); give every adapter a random B."""
  for n, (_, _, _, adapter) in enumerate(lora.adapters(model)):
    key = jax.random.fold_in(jax.random.key(seed), n)
    adapter.b.set_value(0.3 * jax.random.normal(key, adapter.b.shape, adapter.b.dtype))


@pytest.mark.parametrize('scan', [False, True])
def test_adapter_equals_peft_and_merge_equals_unmerged(llama, tmp_path, scan):
  """jaxlm's adapters, exported as a PEFT adapter, give PEFT's logits on the transformers
  model; the merged model gives the same logits in jaxlm and, saved, in transformers."""
  import peft
  import transformers
  path, hf = llama
  cfg, model = convert.load_hf(str(path), scan_layers=scan)
  base = np.asarray(model(jnp.asarray(TOKENS)))
  lcfg = lora.LoRAConfig(rank=4, alpha=8.0, targets=('q_proj', 'v_proj', 'o_proj', 'down_proj'))
  lora.attach(model, lcfg, seed=1)
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), base)   # B = 0
  _randomize(model)
  ours = np.asarray(model(jnp.asarray(TOKENS)))
  assert np.abs(ours - base).max() > 0.1   # the adapters matter

  lora.save_peft(model, lcfg, str(tmp_path / 'adapter'), base_model_name_or_path=str(path))
  with open(tmp_path / 'adapter' / 'adapter_config.json') as f:
    assert json.load(f)['r'] == 4
  reference = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
  reference = peft.PeftModel.from_pretrained(reference, str(tmp_path / 'adapter')).eval()
  np.testing.assert_allclose(ours, hf_logits(reference, TOKENS), atol=1e-4, rtol=0)

  merged = lora.merge(model)
  assert not lora.has_adapters(merged) and lora.has_adapters(model)
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(TOKENS))), ours, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(np.asarray(model(jnp.asarray(TOKENS))), ours)   # untouched
  convert.save_hf(cfg, merged, str(tmp_path / 'merged'))
  loaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / 'merged')).eval()
  np.testing.assert_allclose(hf_logits(loaded, TOKENS), ours, atol=1e-4, rtol=0)
  with pytest.raises(ValueError, match='merge'):
    convert.save_hf(cfg, model, str(tmp_path / 'unmerged'))


def test_peft_adapter_loads_into_jaxlm(llama, tmp_path):
  """An adapter PEFT made (random A and B, rank-stabilized scale, MLP and attention
  targets) read by load_peft gives PEFT's logits; a wrong-shaped one is named."""
  import peft
  import transformers
  path, _ = llama
  reference = transformers.LlamaForCausalLM.from_pretrained(str(path)).eval()
  config = peft.LoraConfig(r=3, lora_alpha=5, target_modules=['k_proj', 'gate_proj', 'up_proj'],
                           init_lora_weights=False, use_rslora=True, task_type='CAUSAL_LM')
  reference = peft.get_peft_model(reference, config).eval()
  reference.save_pretrained(str(tmp_path / 'peft'))
  _, model = convert.load_hf(str(path))
  lcfg = lora.load_peft(model, str(tmp_path / 'peft'))
  assert (lcfg.rank, lcfg.alpha, lcfg.use_rslora) == (3, 5.0, True)
  assert lcfg.targets == ('k_proj', 'gate_proj', 'up_proj')
  np.testing.assert_allclose(np.asarray(model(jnp.asarray(TOKENS))),
                             hf_logits(reference, TOKENS), atol=1e-4, rtol=0)

  cfg_file = tmp_path / 'peft' / 'adapter_config.json'
  hf = json.loads(cfg_file.read_text())
  cfg_file.write_text(json.dumps({**hf, 'r': 2}))
  with pytest.raises(lora.LoRAError, match=r'lora_A.weight has shape \(3, 32\), expected \(2, 32\)'):
    lora.load_peft(convert.load_hf(str(path))[1], str(tmp_path / 'peft'))
  cfg_file.write_text(json.dumps({**hf, 'use_dora': True}))
  with pytest.raises(lora.LoRAError, match='use_dora=True is not supported'):
    lora.read_peft_config(str(tmp_path / 'peft'))


def test_dropout_only_inside_a_dropout_key():
  model = init_model(get_config('tiny', num_layers=1))
  lora.attach(model, lora.LoRAConfig(rank=2, dropout=0.5), seed=0)
  _randomize(model)
  tokens = jnp.asarray(TOKENS)

  @jax.jit
  def forward(key):   # the key is traced: each call draws its own masks
    with lora.dropout_key(key):
      return model(tokens)
  plain = jax.jit(lambda: model(tokens))()
  first, again, other = (forward(jax.random.key(k)) for k in (1, 1, 2))
  np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
  assert np.abs(np.asarray(first) - np.asarray(plain)).max() > 1e-3
  assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3


@pytest.mark.parametrize('field, value, match', [
    ('rank', -1, r'train.lora: lora rank=-1: must be an integer >= 0'),
    ('targets', ('q_proj', 'qkv'), r"\['qkv'\] are not"),
    ('dropout', 1.0, r'lora dropout=1.0: must be in \[0, 1\)'),
    ('ranks', 4, r"train.lora has unknown field\(s\) \['ranks'\]"),
])
def test_config_errors_name_the_field(field, value, match):
  c = small_config()
  c.train.lora.rank = 4
  if field == 'ranks':
    c.train.lora.unlock()
  c.train.lora[field] = value
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.validate(c, trainer.model_config(c), 8)


def _lora_config(**overrides):
  c = small_config(train__steps=4, train__checkpoint_every=2, **overrides)
  c.model.dtype = 'bfloat16'   # the frozen base is stored in the compute dtype
  c.train.lora.rank, c.train.lora.alpha, c.train.lora.dropout = 4, 8.0, 0.1
  c.train.lora.targets = ('q_proj', 'v_proj', 'gate_proj', 'down_proj')
  return c


def test_lora_run_trains_adapters_only_sharded_and_exports(tmp_path):
  """On 8 devices (fsdp 4 x tensor 2): the base is frozen in bfloat16 and unchanged, the
  adapters move, the optimizer holds state for the adapters alone, adapter axes follow
  their base weight's; the run exports the adapter (PEFT) and the merged model, and
  restore_model reads the checkpoint back."""
  c = _lora_config()
  c.mesh.fsdp, c.mesh.tensor, c.mesh.devices = 4, 2, 8
  c.export_hf = True
  logs = []
  result = trainer.train(c, str(tmp_path), log=logs.append)
  assert any('LoRA rank 4 (alpha 8) on q_proj,v_proj,gate_proj,down_proj' in l for l in logs)
  model, optimizer = nnx.merge(result['graphdef'], result['state'])
  cfg = trainer.model_config(c)
  start = init_model(cfg, seed=c.seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if isinstance(var, lora.LoRAParam):
      assert var.dtype == jnp.float32, path
      continue
    assert var.dtype == jnp.bfloat16, path
    initial = nnx.to_flat_state(nnx.state(start, nnx.Param))
    np.testing.assert_array_equal(np.asarray(var[...]),
                                  np.asarray(dict(initial)[path][...].astype(jnp.bfloat16)))
  adapters = {p: v for p, v in nnx.to_flat_state(nnx.state(model, lora.LoRAParam))}
  assert any(p[-1] == 'b' and np.abs(np.asarray(v[...])).max() > 0 for p, v in adapters.items())
  moments = [x for x in jax.tree.leaves(nnx.state(optimizer.opt_state)) if x.ndim]
  assert sorted(x.shape for x in moments) == sorted(2 * [v.shape for v in adapters.values()])
  a = model.layers[0].attn.q_proj_lora.a[...]   # [D, r]: D over fsdp like q_proj's D
  b = model.layers[0].attn.q_proj_lora.b[...]   # [r, H, E]: heads over tensor
  assert a.sharding.spec == jax.sharding.PartitionSpec('fsdp', None)
  assert b.sharding.spec == jax.sharding.PartitionSpec(None, 'tensor', None)

  unmerged = np.asarray(model(jnp.asarray(TOKENS)))
  _, merged = convert.load_hf(str(tmp_path / 'hf'), dtype='float32')
  np.testing.assert_allclose(np.asarray(merged(jnp.asarray(TOKENS))), unmerged, atol=0.05)
  with open(tmp_path / 'hf_adapter' / 'adapter_config.json') as f:
    assert json.load(f)['target_modules'] == list(c.train.lora.targets)
  mesh = shd.make_mesh({}, jax.devices()[:1])
  _, restored, step = trainer.restore_model(c, str(tmp_path), mesh)
  assert step == 4 and lora.has_adapters(restored)
  np.testing.assert_array_equal(np.asarray(restored(jnp.asarray(TOKENS))), unmerged)


def test_lora_resume_after_sigterm_is_bit_identical(tmp_path):
  """With adapter dropout on: a run stopped by SIGTERM at step 2 and resumed ends with
  the same adapters and optimizer state as an uninterrupted run (same dropout masks)."""
  ref = trainer.train(_lora_config(), str(tmp_path / 'ref'), log=lambda s: None)
  stopped = trainer.train(_lora_config(debug__sigterm_at_step=2), str(tmp_path / 'run'),
                          log=lambda s: None)
  assert stopped['step'] == 2 and stopped.get('stopped')
  resumed = trainer.train(_lora_config(), str(tmp_path / 'run'), log=lambda s: None)
  assert resumed['start_step'] == 2
  for (p, a), (q, b) in zip(nnx.to_flat_state(ref['state']),
                            nnx.to_flat_state(resumed['state'])):
    assert p == q
    np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))


def test_lora_step_plan_holds_a_fraction_of_full_fine_tuning():
  """Compiled on the 8 CPU devices: the LoRA step's arguments (bfloat16 frozen base, float32
  adapters and their AdamW moments) are a fraction of full fine-tuning's (float32 weights
  and two moments for every parameter)."""
  full = small_config()
  full.model.dtype = 'bfloat16'
  c = _lora_config()
  report = lambda c: trainer.train(c, '/tmp/unused-aot', aot_only=True, log=lambda s: None)
  full_bytes, lora_bytes = report(full)['argument_bytes'], report(c)['argument_bytes']
  params = trainer.model_config(c).num_params()
  assert full_bytes >= 12 * params and lora_bytes < 2.5 * params < full_bytes / 4


def test_fit_study_lowers_accumulation_to_fit_the_mesh():
  from jaxlm.bench import fit
  one = fit.case_config(4096, 'splash', 'full', fit.mesh_for(1, 16, 'splash'), None,
                        config='configs/mistral7b_simple_kv_lora.py')
  four = fit.case_config(4096, 'splash', 'full', fit.mesh_for(4, 16, 'splash'), None,
                         config='configs/mistral7b_simple_kv_lora.py')
  assert (one.train.grad_accum, four.train.grad_accum) == (16, 4)
  assert one.train.lora.rank == 16 and one.model.dtype == 'bfloat16'
  trainer.validate(four, trainer.model_config(four), 4)


@pytest.mark.parametrize('scan', [False, True])
def test_adapter_gradients_with_remat_equal_without(scan):
  """Only the adapters differentiated, the frozen base closed over: rematerialized blocks
  (unrolled or scanned) give the gradients of the plain ones."""
  tokens = jnp.asarray(TOKENS % 512)
  grads = []
  for remat in ('none', 'full'):
    model = init_model(get_config('tiny', remat=remat, scan_layers=scan))
    lora.attach(model, lora.LoRAConfig(rank=2), seed=0)
    _randomize(model)
    graphdef, params, rest = nnx.split(model, lora.TRAINABLE, ...)
    loss = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(tokens) ** 2)
    grads.append(jax.jit(jax.grad(loss))(params))
  for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads[0])) > 0


def test_a_resumed_run_may_not_change_its_adapters():
  from jaxlm import workdir as workdir_lib
  saved = {'train': {'steps': 4, 'lora': {'rank': 16, 'alpha': 32.0, 'dropout': 0.0}}}
  new = {'train': {'steps': 4, 'lora': {'rank': 8, 'alpha': 32.0, 'dropout': 0.1}}}
  refused, allowed = workdir_lib.diff(saved, new)
  assert [l.split(':')[0] for l in refused] == ['train.lora.rank']
  assert [l.split(':')[0] for l in allowed] == ['train.lora.dropout']
  # a run from before LoRA existed: the fields arrive at their defaults (LoRA off)
  before = {'train': {'steps': 4}}
  now = {'train': {'steps': 4, 'lora': {'rank': 0, 'targets': list(lora.TARGETS)}}}
  refused, allowed = workdir_lib.diff(before, now)
  assert refused == [] and len(allowed) == 2   # noted in the log, not refused
