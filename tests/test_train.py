"""The trainer: sharded step equality, bit-exact resume after SIGKILL/SIGTERM, restore on
another mesh, loss masking, config errors, corrupted checkpoints, learning."""
import glob
import json
import os
import subprocess
import tempfile
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from jaxlm import sharding as shd
from jaxlm import train as trainer
from jaxlm.model import get_config, init_model

import train_config  # tests/train_config.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


small_config = train_config.get_config


def run_cli(workdir, *overrides):
  cmd = [sys.executable, '-m', 'jaxlm.train', '--config=tests/train_config.py',
         f'--workdir={workdir}', *overrides]
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def final_params(workdir):
  """Model and optimizer state of the newest checkpoint: numpy arrays keyed by path."""
  import orbax.checkpoint as ocp
  steps = sorted(int(os.path.basename(p)) for p in glob.glob(f'{workdir}/checkpoints/*')
                 if os.path.basename(p).isdigit())
  # Restored onto one local device, whatever topology (processes, devices) saved it.
  path = f'{workdir}/checkpoints/{steps[-1]}/state'
  ckptr = ocp.StandardCheckpointer()
  meta = ckptr.metadata(path)
  one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                        getattr(meta, 'item_metadata', meta))
  restored = ckptr.restore(path, target)
  flat = jax.tree_util.tree_flatten_with_path(restored)[0]   # model and optimizer state
  return steps[-1], {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}


def assert_same_params(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_step_on_data2_fsdp2_tensor2_mesh_equals_single_device():
  cfg = get_config('tiny', sliding_window=None)
  tokens = np.random.RandomState(0).randint(0, 512, (8, 33)).astype(np.int32)
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'loss_mask': (np.arange(32) >= 20).astype(np.int32)[None].repeat(8, 0),
           'positions': np.tile(np.arange(32, dtype=np.int32), (8, 1)),
           'segment_ids': np.ones((8, 32), np.int32)}
  results = []
  for sizes, n in (({'data': 2, 'fsdp': 2, 'tensor': 2}, 8), ({}, 1)):
    mesh = shd.make_mesh(sizes, jax.devices()[:n])
    model = init_model(cfg)
    # SGD: parameters match exactly when gradients do (see test_model_attention.py)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    graphdef, state = nnx.split((model, optimizer))
    shardings = shd.state_shardings(state, mesh)
    bs = NamedSharding(mesh, shd.batch_spec(False))
    step = jax.jit(trainer.make_train_step(graphdef, 2, optax.constant_schedule(0.1)),
                   in_shardings=(shardings, bs), out_shardings=(shardings, None))
    with jax.set_mesh(mesh):
      new, metrics = step(jax.device_put(state, shardings),
                          {k: jax.device_put(v, bs) for k, v in batch.items()})
    if n == 8:
      q = nnx.merge(graphdef, new)[0].layers[0].attn.q_proj[...]
      assert len(q.sharding.device_set) == 8 and q.sharding.spec == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
    results.append((new, metrics))
  (a, ma), (b, mb) = results
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-6)
  for (p, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a)), nnx.to_flat_state(nnx.state(b))):
    np.testing.assert_allclose(np.asarray(x[...]), np.asarray(y[...]), atol=1e-6, err_msg=str(p))


def test_loss_ignores_prompt_targets():
  model = init_model(get_config('tiny'))
  rs = np.random.RandomState(1)
  tokens = rs.randint(0, 512, (2, 17)).astype(np.int32)
  mask = np.zeros((2, 16), np.int32)
  mask[:, 12:] = 1
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           'segment_ids': np.ones((2, 16), np.int32)}
  base, _ = trainer.loss_sums(model, batch)
  changed = dict(batch, targets=np.where(mask == 1, batch['targets'], rs.randint(0, 512, (2, 16))))
  np.testing.assert_array_equal(trainer.loss_sums(model, changed)[0], base)
  changed_answer = dict(batch, targets=np.where(mask == 1, (batch['targets'] + 1) % 512, batch['targets']))
  assert float(trainer.loss_sums(model, changed_answer)[0]) != float(base)


def test_loss_is_the_answer_tokens_cross_entropy_and_padding_never_counts():
  model = init_model(get_config('tiny'))
  rs = np.random.RandomState(2)
  tokens = rs.randint(0, 512, (2, 17)).astype(np.int32)
  mask = np.zeros((2, 16), np.int32)
  mask[:, 10:14] = 1
  seg = np.ones((2, 16), np.int32)
  seg[1, 14:] = 0                                     # padding: never in the loss
  batch = {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'loss_mask': mask,
           'positions': np.tile(np.arange(16, dtype=np.int32), (2, 1)), 'segment_ids': seg}
  logits = np.asarray(model(batch['inputs'], batch['positions'], segment_ids_BxT=seg), np.float64)
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  ce = -np.take_along_axis(logp, batch['targets'][..., None], -1)[..., 0]
  loss, (n, _) = trainer.loss_sums(model, batch)
  assert int(n) == 8
  np.testing.assert_allclose(float(loss), (ce * mask).sum(), rtol=1e-5)
  padded = dict(batch, targets=np.where(seg == 0, 7, batch['targets']))
  np.testing.assert_array_equal(trainer.loss_sums(model, padded)[0], loss)


@pytest.mark.parametrize('section, field, value, match', [
    ('mesh', 'fsdp', 3, r'mesh .* has 3 devices but 1 are available'),
    ('train', 'batch_size', 6, r'train.batch_size=6 is not divisible by data\*fsdp=4'),
    ('mesh', 'tensor', 4, r'mesh.tensor=4 does not divide the model'),
    ('mesh', 'context', 4, r'mesh.context=4 needs model.attention_impl=ring'),
    ('data', 'seq_len', 100, r'data.seq_len=100 is not divisible by 2\*4'),
    ('train', 'schedule', 'step', r"train.schedule='step'"),
])
def test_config_errors(section, field, value, match):
  c = small_config()
  if match.startswith('train.batch_size'):
    c.mesh.fsdp, c.mesh.devices = 4, 4
  if match.startswith('data.seq_len'):
    c.mesh.context, c.mesh.devices, c.model.attention_impl = 4, 4, 'ring'
  c[section][field] = value
  if match.startswith(('mesh.tensor', 'mesh.context')):
    c.mesh.devices = 4
  n = c.mesh.devices
  with pytest.raises(trainer.ConfigError, match=match):
    trainer.validate(c, trainer.model_config(c), n)


def test_unknown_config_key_is_named(tmp_path):
  out = run_cli(tmp_path / 'w', '--config.train.stepz=3')
  assert out.returncode != 0 and 'stepz' in out.stderr


def test_kill_and_sigterm_then_resume_is_bit_identical(tmp_path):
  """SIGKILL needs a process of its own (the CLI); the reference, the resumes and the
  SIGTERM run go in-process (the same code and XLA flags, without a start-up each)."""
  trainer.train(small_config(), str(tmp_path / 'ref'), log=lambda s: None)
  ref_step, ref_params = final_params(tmp_path / 'ref')
  assert ref_step == 6

  killed = run_cli(tmp_path / 'kill', '--config.debug.kill_at_step=3')
  assert killed.returncode == -9                  # SIGKILL after step 3; last checkpoint: 2
  assert final_params(tmp_path / 'kill')[0] == 2
  resumed = run_cli(tmp_path / 'kill')   # the CLI's resume path, as a user runs it
  assert resumed.returncode == 0 and 'resumed from step 2' in resumed.stdout + resumed.stderr
  assert_same_params(final_params(tmp_path / 'kill')[1], ref_params)

  logs = []
  term = trainer.train(small_config(debug__sigterm_at_step=3), str(tmp_path / 'term'),
                       log=logs.append)
  assert term['stopped'] == 'SIGTERM' and final_params(tmp_path / 'term')[0] == 3
  assert any('SIGTERM: saved the checkpoint at step 3' in line for line in logs)
  resumed = trainer.train(small_config(), str(tmp_path / 'term'), log=lambda s: None)
  assert resumed['start_step'] == 3
  assert_same_params(final_params(tmp_path / 'term')[1], ref_params)


def test_restore_onto_a_different_mesh_and_skip_a_corrupt_checkpoint(tmp_path):
  c = small_config()
  c.mesh.fsdp, c.mesh.devices, c.train.steps = 8, 8, 4
  first = trainer.train(c, str(tmp_path), log=lambda s: None)
  saved = {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(first['state'])}
  # Restore the step-4 checkpoint on 4 devices (fsdp=2, tensor=2) and run 0 more steps.
  c2 = small_config()
  c2.mesh.fsdp, c2.mesh.tensor, c2.mesh.devices, c2.train.steps = 2, 2, 4, 4
  logs = []
  second = trainer.train(c2, str(tmp_path), log=logs.append, reevaluate=True)   # finished
  assert second['start_step'] == 4
  for p, v in nnx.to_flat_state(second['state']):
    np.testing.assert_array_equal(np.asarray(v[...]), saved[str(p)], err_msg=str(p))
  q = nnx.merge(second['graphdef'], second['state'])[0].layers[0].attn.q_proj[...]
  assert len(q.sharding.device_set) == 4
  # Corrupt the newest checkpoint: the previous one is used and the problem reported.
  for f in glob.glob(f'{tmp_path}/checkpoints/4/state/**/*', recursive=True):
    if os.path.isfile(f) and os.path.getsize(f) > 1000:
      open(f, 'wb').write(b'garbage')
  logs = []
  third = trainer.train(c2, str(tmp_path), log=logs.append, reevaluate=True)
  assert third['start_step'] == 2
  assert any(f'the checkpoint {tmp_path}/checkpoints/4 is unreadable' in line for line in logs)
  # set aside, not deleted
  assert len(glob.glob(f'{tmp_path}/unreadable_checkpoints/4-*/state')) == 1


def test_short_run_lowers_the_loss(tmp_path):
  c = small_config(train__steps=12, train__lr=3e-3)
  trainer.train(c, str(tmp_path), log=lambda s: None)
  losses = [json.loads(l)['loss'] for l in open(tmp_path / 'metrics.jsonl')]
  assert len(losses) == 12 and np.mean(losses[-3:]) < 0.95 * np.mean(losses[:3])
  assert os.path.exists(tmp_path / 'tensorboard')


def test_aot_only_reports_memory_per_device():
  c = small_config()
  c.mesh.fsdp, c.mesh.devices = 8, 8
  report = trainer.train(c, '/tmp/unused-aot', aot_only=True, log=lambda s: None)
  assert report['devices'] == 8 and report['mesh']['fsdp'] == 8
  assert report['argument_bytes'] > 0 and report['total_bytes_per_device'] > report['temp_bytes']


@pytest.mark.parametrize('name', ['mistral7b_simple_kv', 'mistral7b_multisubkey_kv', 'tiny_kv',
                                  'mistral7b_simple_kv_lora', 'smollm2_simple_kv_lora'])
def test_shipped_configs_validate(name):
  import importlib
  c = importlib.import_module(f'configs.{name}').get_config()
  cfg = trainer.model_config(c)
  # the one-chip LoRA recipe: micro-batches of one (more chips: a lower grad_accum)
  trainer.validate(c, cfg, 1 if name == 'mistral7b_simple_kv_lora' else 8)
  trainer.make_optimizer(c.train, trainer.make_schedule(c.train))


def test_init_from_a_hugging_face_checkpoint(tmp_path):
  from jaxlm import convert
  c = small_config(train__steps=1, train__lr=0.0, train__schedule='constant',
                   train__warmup_steps=0)
  cfg = trainer.model_config(c)
  source = init_model(cfg, seed=7)
  convert.save_hf(cfg, source, str(tmp_path / 'hf_in'))
  c.init_from = str(tmp_path / 'hf_in')
  c.init_hook = 'jaxlm.demo.embed_init:init_hook'   # runs from scratch only: skipped here
  logs = []
  result = trainer.train(c, str(tmp_path / 'run'), log=logs.append)
  assert any("init_hook='jaxlm.demo.embed_init:init_hook' skipped" in line for line in logs)
  model = nnx.merge(result['graphdef'], result['state'])[0]
  np.testing.assert_array_equal(model.lm_head[...], source.lm_head[...])   # lr 0: unchanged
  np.testing.assert_array_equal(model.embed[...], source.embed[...])       # not composed


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  c = small_config(train__steps=2)
  trainer.train(c, str(tmp_path), log=lambda s: None)
  real = trainer.loss_sums
  monkeypatch.setattr(trainer, 'loss_sums',
                      lambda model, batch, **kw: (lambda l, aux: (l * jnp.nan, aux))(
                          *real(model, batch, **kw)))
  c.train.steps = 4
  with pytest.raises(FloatingPointError, match=r'non-finite loss at step 3 .* not applied; the '
                     r'run stops. The last finite checkpoint is step 2 in .*checkpoints'):
    trainer.train(c, str(tmp_path), log=lambda s: None)
  assert final_params(tmp_path)[0] == 2


def test_non_finite_loss_between_logged_steps_is_caught_before_any_save(tmp_path, monkeypatch):
  # Nothing is logged or saved before step 6, so the loss is read one step late (the host
  # builds the next batch meanwhile): step 3's nan is reported after step 4 is dispatched,
  # and no checkpoint is written.
  real = trainer.make_train_step
  def make(graphdef, *a, **kw):
    step = real(graphdef, *a, **kw)
    def poisoned(state, batch):   # nan from the 3rd step on
      done = nnx.merge(graphdef, state)[1].step[...]
      state, metrics = step(state, batch)
      return state, {**metrics, 'loss': jnp.where(done >= 2, jnp.nan, metrics['loss'])}
    return poisoned
  monkeypatch.setattr(trainer, 'make_train_step', make)
  c = small_config(train__steps=6, train__log_every=6, train__checkpoint_every=6)
  with pytest.raises(FloatingPointError, match=r'non-finite loss at step 3 .* No checkpoint '
                                               r'was saved yet'):
    trainer.train(c, str(tmp_path), log=lambda s: None)
  assert not os.path.exists(tmp_path / 'checkpoints') or not os.listdir(tmp_path / 'checkpoints')


def test_a_disk_that_cannot_take_a_checkpoint_stops_the_run_before_the_first_step(tmp_path,
                                                                                  monkeypatch):
  # The run's state (parameters + AdamW's two moments, float32) is what a checkpoint holds;
  # with less free space than that, training would end in a failed save: refused at start.
  import shutil
  from jaxlm import workdir as workdir_lib
  c = small_config(train__steps=2)
  state_bytes = {}
  real_check = workdir_lib.check_space
  def spy(workdir, **kw):
    state_bytes.update(kw)
    return real_check(workdir, **kw)
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib, 'check_space', spy)
  monkeypatch.setattr(workdir_lib.shutil, 'disk_usage',
                      lambda p: usage._replace(free=state_bytes['checkpoint_bytes'] - 1))
  with pytest.raises(workdir_lib.PathError, match=r'its disk has 0\.\d\d GB free, but one '
                     r'checkpoint of this run takes 0\.\d\d GB: the run would train'):
    trainer.train(c, str(tmp_path), log=lambda s: None)
  n = sum(p.size for p in jax.tree.leaves(nnx.state(init_model(trainer.model_config(c)))))
  assert 12 * n <= state_bytes['checkpoint_bytes'] <= 12 * n + 64   # + the step counters
  assert state_bytes['checkpoints'] == 1 and state_bytes['export_bytes'] == 0  # 1 save (step 2)
  assert not os.path.exists(tmp_path / 'metrics.jsonl')
  assert not os.listdir(tmp_path / 'checkpoints')


def test_check_space_messages(tmp_path, monkeypatch):
  import shutil
  from jaxlm import workdir as workdir_lib
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(workdir_lib.shutil, 'disk_usage', lambda p: usage._replace(free=5e9))
  check = lambda **kw: workdir_lib.check_space(str(tmp_path), **kw)
  assert check(checkpoint_bytes=2e9, checkpoints=2, export_bytes=1e9) is None     # 5 GB: fits
  assert check(checkpoint_bytes=2e9, checkpoints=3, export_bytes=1e9) == (     # 7 GB at once
      f'workdir={str(tmp_path)!r}: 5.00 GB free on its disk, less than the 7.00 GB this run '
      f'can hold at once (3 checkpoints of 2.00 GB and its Hugging Face export 1.00 GB); '
      f'lower train.keep_checkpoints or free some space')
  with pytest.raises(workdir_lib.PathError, match=r'5\.00 GB free, but one checkpoint of this '
                     r'run takes 4\.50 GB and its Hugging Face export 1\.00 GB'):
    check(checkpoint_bytes=4.5e9, checkpoints=1, export_bytes=1e9)
  assert 'fail to save' in check(checkpoint_bytes=6e9, checkpoints=1, export_bytes=0,
                                 strict=False)
  assert workdir_lib.check_space('gs://bucket/run', checkpoint_bytes=1e15, checkpoints=1,
                                 export_bytes=0) is None


def test_zigzag_ring_layout_trains_like_the_natural_order(monkeypatch):
  # ring_layout='zigzag': the trainer permutes each batch once on the host (tokens,
  # targets, positions, segment ids) and the ring kernel skips its own permutation; masks
  # follow the positions, so the loss and the update are the same as in natural order.
  from jaxlm.attention.ring import zigzag_indices
  fed = {}
  host_batch = trainer._host_batch

  def recording(c, data_iter, step, zigzag):
    batch = host_batch(c, data_iter, step, zigzag)
    fed.setdefault(c.model.ring_layout, []).append(batch)
    return batch
  monkeypatch.setattr(trainer, '_host_batch', recording)
  runs = {}
  for layout in ('natural', 'zigzag'):
    c = small_config()
    c.mesh.fsdp, c.mesh.context, c.mesh.devices = 2, 2, 4
    c.model.attention_impl, c.model.ring_layout = 'ring', layout
    c.model.attention_block_q = c.model.attention_block_kv = 64
    c.train.steps, c.train.checkpoint_every = 1, 100
    runs[layout] = trainer.train(c, tempfile.mkdtemp(), log=lambda s: None)
  order = zigzag_indices(small_config().data.seq_len, 2)
  for natural, zigzag in zip(fed['natural'], fed['zigzag']):
    for k in natural:
      np.testing.assert_array_equal(zigzag[k], natural[k][:, order], err_msg=k)
  assert abs(runs['natural']['loss'] - runs['zigzag']['loss']) < 1e-5
  a, b = (dict(nnx.to_flat_state(r['state'])) for r in runs.values())
  for k in a:
    np.testing.assert_allclose(np.asarray(a[k][...]), np.asarray(b[k][...]), atol=2e-5,
                               err_msg=str(k))


def test_resumes_a_checkpoint_written_before_data_stream(tmp_path, monkeypatch):
  # Checkpoints written before December 2026 hold grain's per-process data-iterator files
  # under `data` instead of `data_stream`: one process resumes them with the same stream.
  import grain
  import orbax.checkpoint as ocp
  from jaxlm import checkpoint as ckpt

  def old_save(mngr, step, state, data_iter):
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(nnx.to_pure_dict(state)),
        data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

  c = small_config()
  c.train.steps = 4
  ref = trainer.train(c, str(tmp_path / 'ref'), log=lambda s: None)
  with monkeypatch.context() as m:
    m.setattr(ckpt, 'save', old_save)
    c.train.steps = 2
    trainer.train(c, str(tmp_path / 'old'), log=lambda s: None)
  c.train.steps = 4
  logs = []
  resumed = trainer.train(c, str(tmp_path / 'old'), log=logs.append)
  assert resumed['start_step'] == 2 and not any('restarts' in line for line in logs), logs
  a, b = (dict(nnx.to_flat_state(r['state'])) for r in (ref, resumed))
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k][...]), np.asarray(b[k][...]), err_msg=str(k))
