"""The Flax Mistral against transformers' MistralForCausalLM."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_logits, make_hf_model
from jaxlm import convert
from jaxlm.model import get_config, init_model


@pytest.mark.parametrize('overrides', [
    {},  # GQA 4/2, sliding window 8 < T, rope_theta 5e4
    dict(num_attention_heads=4, num_key_value_heads=4, sliding_window=None, rope_theta=1e6),
    dict(num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=5),
], ids=['gqa-window', 'mha-nowindow', 'headdim-window5'])
def test_logits_match_transformers(tmp_path, overrides):
  hf = make_hf_model(tmp_path, seed=1, **overrides)
  tokens = np.random.RandomState(0).randint(0, 128, (3, 24))
  cfg, model = convert.load_hf(str(tmp_path))
  assert cfg.sliding_window == overrides.get('sliding_window', 8)
  ours = np.asarray(model(jnp.asarray(tokens)))
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, hf_logits(hf, tokens), atol=1e-4, rtol=0)


def test_explicit_positions_match_default(hf_checkpoint):
  _, model = convert.load_hf(str(hf_checkpoint[0]))
  tokens = jnp.asarray(np.random.RandomState(1).randint(0, 128, (2, 16)))
  positions = jnp.broadcast_to(jnp.arange(16), (2, 16))
  np.testing.assert_array_equal(model(tokens), model(tokens, positions))
  # RoPE is relative: shifting all positions leaves logits unchanged up to rounding;
  # a sliding-window or position bug would not.
  np.testing.assert_allclose(model(tokens, positions + 37), model(tokens), atol=2e-4)


def test_segments_isolate_packed_sequences(hf_checkpoint):
  """Two sequences packed in one row give the logits each gives alone."""
  _, model = convert.load_hf(str(hf_checkpoint[0]))
  rs = np.random.RandomState(2)
  a, b = rs.randint(0, 128, (1, 10)), rs.randint(0, 128, (1, 14))
  packed = jnp.asarray(np.concatenate([a, b], 1))
  positions = jnp.asarray(np.concatenate([np.arange(10), np.arange(14)])[None])
  segments = jnp.asarray(np.array([[1] * 10 + [2] * 14]))
  out = model(packed, positions, segment_ids_BxT=segments)
  np.testing.assert_allclose(out[:, :10], model(jnp.asarray(a)), atol=1e-5)
  np.testing.assert_allclose(out[:, 10:], model(jnp.asarray(b)), atol=1e-5)


def test_bfloat16_load_runs_and_stays_close(hf_checkpoint):
  path, hf = hf_checkpoint
  tokens = np.random.RandomState(3).randint(0, 128, (2, 24))
  ref = hf_logits(hf, tokens)
  cfg, model = convert.load_hf(str(path), dtype='bfloat16')
  assert cfg.dtype == cfg.param_dtype == 'bfloat16'
  assert model.layers[0].attn.q_proj[...].dtype == jnp.bfloat16
  ours = np.asarray(model(jnp.asarray(tokens)))
  assert ours.dtype == np.float32 and np.isfinite(ours).all()
  scale = np.abs(ref).max()
  assert np.abs(ours - ref).max() < 0.05 * scale
  assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


FAMILY = {   # the tiny preset as each member of the family
    'mistral': {},
    'llama-tied': dict(architecture='llama', sliding_window=None, tie_word_embeddings=True),
    'llama-bias-llama3': dict(architecture='llama', sliding_window=None, attention_bias=True,
                              rope_type='llama3', rope_factor=4.0, rope_original_max_position=16),
    'qwen2-tied': dict(architecture='qwen2', attention_bias=True, tie_word_embeddings=True),
}


@pytest.mark.parametrize('fields', list(FAMILY.values()), ids=list(FAMILY))
def test_param_counts_and_axis_names(fields):
  assert get_config('mistral-7b-v0.1').num_params() == 7_241_732_096  # published size
  cfg = get_config('tiny', **fields)
  model = init_model(cfg)
  assert hasattr(model, 'lm_head') != cfg.tie_word_embeddings
  assert hasattr(model.layers[0].attn, 'q_bias') == cfg.attention_bias
  params = nnx.state(model, nnx.Param)
  assert sum(x.size for x in jax.tree.leaves(params)) == cfg.num_params()
  allowed = {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp'}
  for path, var in nnx.to_flat_state(params):
    names = var.get_metadata()['out_sharding']
    assert len(names) == var.ndim and set(names) <= allowed, (path, names)


def test_presets():
  v1, v2 = get_config('mistral-7b-v0.1'), get_config('mistral-7b-v0.2')
  assert (v1.vocab_size, v1.hidden_size, v1.num_layers, v1.num_heads, v1.num_kv_heads,
          v1.intermediate_size, v1.rope_theta, v1.sliding_window) == (
              32000, 4096, 32, 32, 8, 14336, 1e4, 4096)
  assert (v2.rope_theta, v2.sliding_window, v2.max_position_embeddings) == (1e6, None, 32768)


@pytest.mark.parametrize('bad, match', [
    (dict(num_heads=6, num_kv_heads=4), 'multiple of num_kv_heads=4'),
    (dict(dtype='float64'), "dtype='float64'"),
    (dict(sliding_window=0), 'sliding_window'),
    (dict(hidden_size=0), 'hidden_size must be a positive int, got 0'),
    (dict(architecture='gpt2'), "architecture='gpt2' is not one of"),
    (dict(architecture='llama'), "sliding_window=16 with architecture='llama'"),
    (dict(attention_bias=True), "attention_bias=True with architecture='mistral'"),
    (dict(architecture='qwen2'), "attention_bias=False with architecture='qwen2'"),
    (dict(rope_type='yarn'), "rope_type='yarn' is not one of"),
    (dict(rope_type='llama3', rope_factor=0.0), 'rope_factor must be positive, got 0.0'),
    (dict(rope_type='llama3', rope_high_freq_factor=1.0),
     'rope_high_freq_factor=1.0 must be greater than rope_low_freq_factor=1.0'),
    (dict(rope_type='llama3', rope_original_max_position=0),
     'rope_original_max_position must be a positive int, got 0'),
    (dict(tie_word_embeddings=1), 'tie_word_embeddings must be a bool, got 1'),
])
def test_config_errors_name_the_field(bad, match):
  with pytest.raises(ValueError, match=match):
    get_config('tiny', **bad)


def test_unknown_config_field_and_preset():
  with pytest.raises(ValueError, match=r"unknown MistralConfig field\(s\) \['hiden_size'\]"):
    get_config('tiny', hiden_size=3)
  with pytest.raises(ValueError, match="unknown model preset 'mistral-9b'"):
    get_config('mistral-9b')


def test_gradients_are_finite_and_nonzero():
  model = init_model(get_config('tiny'))
  tokens = jnp.asarray(np.random.RandomState(4).randint(0, 512, (2, 32)))

  def loss(m):
    logits = m(tokens[:, :-1])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

  grads = nnx.grad(loss)(model)
  for path, g in nnx.to_flat_state(grads):
    assert np.isfinite(g[...]).all() and np.abs(g[...]).max() > 0, path


@pytest.mark.parametrize('name', ['mistral', 'qwen2-tied'])
def test_logit_positions_equal_gathered_full_logits_and_grads(name):
  """Logits at chosen positions only: the same values and parameter gradients as
  gathering the full logits (answer-only training computes the head at a few positions)."""
  model = init_model(get_config('tiny', **FAMILY[name]), seed=5)
  rs = np.random.RandomState(5)
  tokens = jnp.asarray(rs.randint(0, 512, (2, 31)))   # the shapes of the test above
  where = jnp.asarray(np.stack([np.sort(rs.choice(30, 4, replace=False)) for _ in range(2)]),
                      jnp.int32)
  targets = jnp.take_along_axis(tokens, where + 1, axis=1)

  def loss(m, gathered):
    if gathered:
      logits = m(tokens, logit_positions_BxP=where)
    else:
      logits = jnp.take_along_axis(m(tokens), where[..., None], axis=1)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  full = jnp.take_along_axis(model(tokens), where[..., None], axis=1)
  some = model(tokens, logit_positions_BxP=where)
  assert some.shape == (2, 4, 512) and some.dtype == jnp.float32
  np.testing.assert_allclose(some, full, atol=1e-6, rtol=0)
  a = nnx.to_flat_state(nnx.grad(loss)(model, True))
  b = nnx.to_flat_state(nnx.grad(loss)(model, False))
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_allclose(x[...], y[...], atol=1e-6, rtol=1e-5, err_msg=str(path))


def test_tied_head_counts_as_matmul_in_flops():
  from jaxlm import flops
  untied = get_config('tiny', architecture='llama', sliding_window=None)
  tied = untied.replace(tie_word_embeddings=True)
  bias = untied.replace(attention_bias=True)
  assert tied.num_params() == untied.num_params() - 512 * 64
  assert flops.matmul_params(tied) == flops.matmul_params(untied) == flops.matmul_params(bias)
  assert bias.num_params() == untied.num_params() + 2 * (16 * (4 + 2 * 2) + 64)
