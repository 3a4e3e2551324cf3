"""The Mistral model with every CPU attention implementation: same logits, same step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from jaxlm.model import get_config, init_model

TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 512, (4, 65)))


def _model(impl, **kw):
  # sliding window 16 < T = 64; blocks of 16 so several are skipped
  cfg = get_config('tiny', attention_impl=impl, attention_block_q=16, attention_block_kv=16, **kw)
  return init_model(cfg, seed=0)


def _loss(model, tokens):
  logits = model(tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _train_step(model, tokens):
  # SGD: the update is linear in the gradient, so matching gradients give matching
  # parameters (Adam's first step is sign-like and amplifies rounding in tiny gradients).
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  loss, grads = nnx.value_and_grad(_loss)(model, tokens)
  optimizer.update(model, grads)
  return loss, grads, nnx.state(model, nnx.Param)


def _assert_trees_close(a, b, atol):
  for (path, x), (_, y) in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
    np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), atol=atol, err_msg=str(path))


@pytest.fixture(scope='module')
def dense_step():
  model = _model('dense')
  logits = model(TOKENS[:, :-1])
  return logits, _train_step(model, TOKENS)


@pytest.mark.parametrize('impl', ['blockwise', 'chunked'])
def test_kernel_model_matches_dense(dense_step, impl):
  logits, (loss, grads, params) = dense_step
  model = _model(impl)
  np.testing.assert_allclose(model(TOKENS[:, :-1]), logits, atol=2e-5)
  got_loss, got_grads, got_params = nnx.jit(_train_step)(model, TOKENS)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
  _assert_trees_close(got_grads, grads, 2e-6)
  _assert_trees_close(got_params, params, 1e-6)


def test_ring_model_on_data2_context4_matches_single_device_dense(dense_step):
  logits, (loss, grads, params) = dense_step
  mesh = jax.make_mesh((2, 4), ('data', 'context'), axis_types=(AxisType.Auto,) * 2)
  model = _model('ring')
  tokens = jax.device_put(TOKENS[:, :-1], NamedSharding(mesh, P('data', 'context')))
  with jax.set_mesh(mesh):
    got_logits = nnx.jit(lambda m, t: m(t))(model, tokens)
    # one training step, the batch sharded over data and the sequence over context
    got_loss, got_grads, got_params = nnx.jit(_train_step)(model, TOKENS)
  np.testing.assert_allclose(got_logits, logits, atol=2e-5)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-6)
  _assert_trees_close(got_grads, grads, 2e-6)
  _assert_trees_close(got_params, params, 1e-6)
