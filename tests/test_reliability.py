"""A run's workdir is never destroyed, a checkpoint is never poisoned, and a bad setting is
refused before any work (issue 21): the config of a resumed run against the workdir's,
non-finite steps, one-line errors, damaged data-iterator state, Ctrl-C, finished runs."""
import glob
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlm import checkpoint as ckpt
from jaxlm import train as trainer
from jaxlm import workdir as workdir_lib

import train_config  # tests/train_config.py
from test_train import ROOT, assert_same_params, final_params, run_cli

small_config = train_config.get_config
quiet = lambda line: None


def tree_snapshot(root):
  """{relative path: (size, mtime, first bytes)} of every file under root."""
  out = {}
  for path in glob.glob(f'{root}/**/*', recursive=True):
    if os.path.isfile(path):
      st = os.stat(path)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, f.read(64))
  return out


def flat_state(state):
  return {str(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(state)}


def copy_run(finished_run, tmp_path):
  import shutil
  shutil.copytree(finished_run[0], tmp_path / 'w')
  return tmp_path / 'w'


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4) and its final state."""
  w = tmp_path_factory.mktemp('run')
  result = trainer.train(small_config(train__steps=4), str(w), log=quiet)
  return w, flat_state(result['state'])


def test_a_different_run_in_the_workdir_is_refused_and_nothing_is_touched(finished_run,
                                                                           tmp_path):
  w, _ = finished_run
  before = tree_snapshot(w)
  for field, value, line in [('model', 'num_layers', 'model.num_layers: 1 -> 2'),
                             ('data', 'seq_len', 'data.seq_len: 320 -> 384'),
                             ('train', 'batch_size', 'train.batch_size: 8 -> 16')]:
    c = small_config(train__steps=6)
    c[field][value] = {'num_layers': 2, 'seq_len': 384, 'batch_size': 16}[value]
    with pytest.raises(trainer.ConfigError, match='holds another run') as e:
      trainer.train(c, str(w), log=quiet)
    assert line in str(e.value) and 'train.steps' not in str(e.value)
  assert tree_snapshot(w) == before
  # the command line says it in a `config error:` message, without a traceback
  out = run_cli(w, '--config.model.num_layers=2')
  assert out.returncode == 1 and out.stderr.startswith('config error: ') \
      and 'model.num_layers: 1 -> 2' in out.stderr and 'Traceback' not in out.stderr
  assert tree_snapshot(w) == before


def test_restart_sets_the_old_run_aside(finished_run, tmp_path):
  w = copy_run(finished_run, tmp_path)
  before = tree_snapshot(w)
  logs = []
  result = trainer.train(small_config(train__steps=2, model__num_layers=2), str(w),
                         restart=True, log=logs.append)
  assert result['start_step'] == 0 and result['step'] == 2
  moved = glob.glob(f'{w}/previous/*')
  assert len(moved) == 1 and any(f'moved the previous run in {w} to' in l for l in logs)
  assert tree_snapshot(moved[0]) == before   # the old run, byte for byte
  assert json.load(open(w / 'config.json'))['model']['num_layers'] == 2


def test_allowed_changes_are_noted_and_a_finished_run_is_not_redone(finished_run, tmp_path):
  w = copy_run(finished_run, tmp_path)
  before = tree_snapshot(w)
  logs = []
  result = trainer.train(small_config(train__steps=4, train__log_every=2), str(w),
                         log=logs.append)
  assert result['finished'] and result['step'] == 4
  assert any('finished at step 4' in l for l in logs)
  assert any('changed since this run started: train.log_every: 1 -> 2' in l for l in logs)
  assert tree_snapshot(w) == before   # nothing rewritten, nothing appended
  # a larger train.steps trains on (a noted change); --reevaluate redoes the end only
  logs = []
  result = trainer.train(small_config(train__steps=6), str(w), log=logs.append)
  assert result['start_step'] == 4 and result['step'] == 6
  assert any('train.steps: 4 -> 6' in l for l in logs)
  assert json.load(open(w / 'finished.json'))['step'] == 6
  result = trainer.train(small_config(train__steps=6), str(w), log=quiet, reevaluate=True)
  assert result['start_step'] == 6 and result['step'] == 6 and 'finished' not in result


def test_a_structure_mismatch_is_not_called_corruption_and_deletes_nothing(finished_run,
                                                                           tmp_path):
  w = copy_run(finished_run, tmp_path)
  os.remove(w / 'config.json')   # no record of the old run: the checkpoint itself is checked
  os.remove(w / 'finished.json')
  before = {k: v for k, v in tree_snapshot(w).items() if k.startswith('checkpoints')}
  with pytest.raises(ckpt.CheckpointMismatchError,
                     match=r'checkpoints/4 holds another model .*0/layers/1/.*: not in the '
                           r'checkpoint.*Nothing was changed'):
    trainer.train(small_config(train__steps=6, model__num_layers=2), str(w), log=quiet)
  after = {k: v for k, v in tree_snapshot(w).items() if k.startswith('checkpoints')}
  assert after == before and not os.path.exists(w / 'unreadable_checkpoints')


def test_a_damaged_data_stream_falls_back_to_the_previous_checkpoint(finished_run, tmp_path):
  w = copy_run(finished_run, tmp_path)
  os.remove(w / 'finished.json')
  data_file = w / 'checkpoints' / '4' / 'data_stream' / 'metadata'   # Orbax's JSON item
  text = open(data_file).read()
  open(data_file, 'w').write(text[:len(text) // 2])   # truncated
  logs = []
  result = trainer.train(small_config(train__steps=4), str(w), log=logs.append)
  assert result['start_step'] == 2   # not 4 with the stream restarted
  assert any(f'the checkpoint {w}/checkpoints/4 is unreadable' in l for l in logs)
  # the same parameters as the uninterrupted run: step 3 and 4 saw the same batches
  assert_same_params(flat_state(result['state']), finished_run[1])
  assert len(glob.glob(f'{w}/unreadable_checkpoints/4-*/data_stream')) == 1


def _poison_step(monkeypatch, at_step, what):
  """The train step with its gradient (what='grad') or its resulting state (what='state')
  made non-finite at optimizer step `at_step` (1-based)."""
  real = trainer.make_train_step

  def make(graphdef, grad_accum, schedule, loss_positions=0, **kwargs):
    if what == 'grad':   # the loss scaled by nan: a nan gradient, the step must skip
      real_loss = trainer.loss_sums
      def loss_sums(model, batch, **kw):
        l, aux = real_loss(model, batch, **kw)
        return l * jnp.where(poison['now'], jnp.nan, 1.0), aux
      poison = {'now': False}
      step_fn = real(graphdef, grad_accum, schedule, loss_positions, **kwargs)

      def stepped(state, batch):
        done = nnx.merge(graphdef, state)[1].step[...]
        poison['now'] = done == at_step - 1
        monkeypatch.setattr(trainer, 'loss_sums', loss_sums)
        try:
          return step_fn(state, batch)
        finally:
          monkeypatch.setattr(trainer, 'loss_sums', real_loss)
      return stepped
    step_fn = real(graphdef, grad_accum, schedule, loss_positions, **kwargs)

    def stepped(state, batch):   # finite metrics, a state with an inf in it
      done = nnx.merge(graphdef, state)[1].step[...]
      state, metrics = step_fn(state, batch)
      model, opt = nnx.merge(graphdef, state)
      model.embed[...] = model.embed[...].at[0, 0].set(
          jnp.where(done == at_step - 1, jnp.inf, model.embed[0, 0]))
      return nnx.state((model, opt)), metrics
    return stepped
  monkeypatch.setattr(trainer, 'make_train_step', make)


def test_a_non_finite_gradient_applies_nothing(tmp_path, monkeypatch):
  """'skip': the poisoned step leaves the state exactly as it was; the run goes on."""
  ref = trainer.train(small_config(train__steps=2), str(tmp_path / 'ref'), log=quiet)
  _poison_step(monkeypatch, 3, 'grad')
  logs = []
  c = small_config(train__steps=3, train__on_nonfinite='skip')
  result = trainer.train(c, str(tmp_path / 'skip'), log=logs.append)
  assert result['step'] == 3 and result['skipped_steps'] == 1
  assert any('non-finite loss at step 3' in l and 'skipped (1 steps' in l for l in logs)
  got = flat_state(result['state'])
  want = flat_state(ref['state'])
  for k in want:   # parameters and moments unchanged by step 3 (the step counter too)
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  metrics = [json.loads(l) for l in open(tmp_path / 'skip' / 'metrics.jsonl')]
  assert [m['skipped'] for m in metrics] == [0.0, 0.0, 1.0]


def test_skipping_stops_after_max_skipped_steps_in_a_row(tmp_path, monkeypatch):
  real = trainer.loss_sums
  monkeypatch.setattr(trainer, 'loss_sums', lambda model, batch, **kw: (
      lambda l, aux: (l * jnp.nan, aux))(*real(model, batch, **kw)))
  c = small_config(train__steps=6, train__on_nonfinite='skip', train__max_skipped_steps=2)
  with pytest.raises(trainer.NonFiniteError, match=r'step 2 .* \(2 in a row = '
                                                   r'train.max_skipped_steps\).*No checkpoint'):
    trainer.train(c, str(tmp_path), log=quiet)


def test_a_non_finite_state_is_never_saved(tmp_path, monkeypatch):
  _poison_step(monkeypatch, 4, 'state')   # step 4's metrics are finite, its state is not
  c = small_config(train__steps=6, train__log_every=6)
  with pytest.raises(trainer.NonFiniteError, match=r'the state after step 4 holds non-finite '
                     r'values; it was not saved.*last finite checkpoint is step 2'):
    trainer.train(c, str(tmp_path), log=quiet)
  step, params = final_params(tmp_path)
  assert step == 2 and all(np.isfinite(v).all() for v in params.values()
                           if np.issubdtype(v.dtype, np.floating))


def test_a_learning_rate_that_blows_up_stops_and_the_last_checkpoint_resumes(tmp_path):
  """Through the command line: 4 sane steps, then train.lr=1e30 from step 5 blows the run
  up; it stops naming the step and the last finite checkpoint (4), saving nothing
  non-finite, and resuming from it with a sane rate finishes with finite parameters."""
  w = tmp_path / 'w'
  trainer.train(small_config(train__steps=4), str(w), log=quiet)
  out = run_cli(w, '--config.train.steps=10', '--config.train.lr=1e30',
                '--config.train.schedule=constant')
  assert out.returncode == 1 and 'Traceback' not in out.stderr, out.stderr[-2000:]
  assert out.stderr.startswith('training stopped: non-finite') and \
      f'The last finite checkpoint is step 4 in {w}/checkpoints' in out.stderr, out.stderr
  step, params = final_params(w)
  assert step == 4
  trainer.train(small_config(train__steps=10), str(w), log=quiet)
  step, params = final_params(w)
  assert step == 10 and all(np.isfinite(v).all() for v in params.values()
                            if np.issubdtype(v.dtype, np.floating))


@pytest.mark.parametrize('args, error', [
    (['--config.train.batch_size=-3'], 'config error: train.batch_size=-3: must be a positive'),
    (['--config.train.checkpoint_every=0'], 'config error: train.checkpoint_every=0: must be'),
    (['--config.train.grad_accum=0'], 'config error: train.grad_accum=0: must be a positive'),
    (['--config.train.stepz=3'], "config error: --config.train.stepz=3: no such config field "
                                 "(did you mean 'steps'?)"),
    (['--config=configs/no_such.py'], 'config error: --config=configs/no_such.py: cannot load'),
    (['--config.init_from=/no/such/dir'], "config error: init_from='/no/such/dir':"),
    (['--config.data.task_fields.num_dicts=0'], "config error: data.task='simple_kv': "),
    (['WORKDIR_IS_A_FILE'], "path error: workdir="),
    (['WORKDIR_UNDER_A_FILE'], "path error: workdir="),
])
def test_bad_settings_are_one_line_before_any_work(args, error, tmp_path):
  w = tmp_path / 'w'
  if args == ['WORKDIR_IS_A_FILE']:
    w.write_text('not a directory')
    args = []
  if args == ['WORKDIR_UNDER_A_FILE']:   # cannot be created (as on a read-only disk)
    (tmp_path / 'f').write_text('not a directory')
    w, args = tmp_path / 'f' / 'w', []
  env = {**os.environ, 'PYTHONPATH': ROOT}
  config = next((a for a in args if a.startswith('--config=')), '--config=tests/train_config.py')
  cmd = [sys.executable, '-m', 'jaxlm.train', config, f'--workdir={w}',
         *[a for a in args if not a.startswith('--config=')]]
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(error), out.stderr[-2000:]
  assert not w.is_dir() or not os.listdir(w)   # nothing written


def test_ctrl_c_saves_like_sigterm_and_a_second_aborts(tmp_path, monkeypatch):
  ref = trainer.train(small_config(train__steps=4), str(tmp_path / 'ref'), log=quiet)
  logs = []
  handler = signal.getsignal(signal.SIGINT)   # SIG_IGN when pytest runs in the background
  c = small_config(train__steps=4, debug__sigint_at_step=3)
  result = trainer.train(c, str(tmp_path / 'int'), log=logs.append)
  assert result['stopped'] == 'SIGINT' and final_params(tmp_path / 'int')[0] == 3
  assert any('Ctrl-C: saving a checkpoint after this step' in l for l in logs)
  assert signal.getsignal(signal.SIGINT) is handler   # restored
  result = trainer.train(small_config(train__steps=4), str(tmp_path / 'int'), log=quiet)
  assert result['start_step'] == 3
  assert_same_params(flat_state(result['state']), flat_state(ref['state']))
  # two Ctrl-C: KeyboardInterrupt at once, nothing saved for that step
  real = trainer._inject_faults

  def twice(c, step, mngr):
    if step == 3:
      os.kill(os.getpid(), signal.SIGINT)
      os.kill(os.getpid(), signal.SIGINT)
    real(c, step, mngr)
  monkeypatch.setattr(trainer, '_inject_faults', twice)
  with pytest.raises(KeyboardInterrupt):
    trainer.train(small_config(train__steps=4), str(tmp_path / 'abort'), log=quiet)
  assert final_params(tmp_path / 'abort')[0] == 2


def test_which_changes_a_resumed_run_may_make():
  saved = {'seed': 0, 'model': {'num_layers': 2, 'remat': 'none', 'param_dtype': 'float32'},
           'data': {'seq_len': 320, 'num_threads': 0, 'task_fields': {'num_dicts': 3}},
           'train': {'steps': 6, 'batch_size': 8, 'lr': 1e-3}, 'mesh': {'fsdp': 1}}
  new = {'seed': 0, 'model': {'num_layers': 2, 'remat': 'full', 'param_dtype': 'bfloat16',
                              'scan_layers': False},
         'data': {'seq_len': 320, 'num_threads': 2, 'task_fields': {'num_dicts': 4},
                  'packing': True},
         'train': {'steps': 9, 'batch_size': 8, 'lr': 1e-4}, 'mesh': {'fsdp': 4}}
  refused, allowed = workdir_lib.diff(saved, new)
  assert [l.split(':')[0] for l in refused] == ['data.packing', 'data.task_fields',
                                                'model.param_dtype']
  # kernels, speed-only data fields, schedule and length, the mesh; and a field added
  # since (scan_layers) at its default
  assert [l.split(':')[0] for l in allowed] == ['data.num_threads', 'mesh.fsdp',
                                                'model.remat', 'model.scan_layers',
                                                'train.lr', 'train.steps']


def test_run_files_other_processes_read_are_written_atomically(tmp_path, monkeypatch):
  """The other processes of a multi-process run check WORKDIR/config.json while process 0
  writes it (a race once seen as 'config.json cannot be read: JSONDecodeError' and a gloo
  timeout): config.json and finished.json are written to a temporary file and renamed, so a
  reader sees no file or the whole file."""
  import builtins
  written = []
  real_open = builtins.open

  def spy(file, mode='r', *args, **kwargs):
    if any(m in mode for m in 'wax'):
      written.append(os.path.basename(str(file)))
    return real_open(file, mode, *args, **kwargs)
  monkeypatch.setattr(builtins, 'open', spy)
  c = small_config()
  c.train.steps = 1
  trainer.train(c, str(tmp_path), log=quiet)
  monkeypatch.undo()
  assert workdir_lib.CONFIG not in written and workdir_lib.FINISHED not in written
  assert any(w.startswith(workdir_lib.CONFIG + '.tmp-') for w in written)
  assert json.load(open(tmp_path / workdir_lib.CONFIG))['train']['steps'] == 1
  assert workdir_lib.finished_step(str(tmp_path)) == 1
  assert not glob.glob(str(tmp_path / '*.tmp-*'))


def test_the_end_overlaps_the_last_checkpoint_and_marks_finished_only_after_it(tmp_path,
                                                                             monkeypatch):
  """The final evaluation and export run while the last checkpoint is written; finished.json
  comes only once that checkpoint is on disk, and an end that fails leaves the checkpoint
  whole and the run unfinished: the rerun does the end again without training."""
  w = tmp_path / 'w'
  real_mark, real_finish = workdir_lib.mark_finished, trainer._finish
  seen = []
  monkeypatch.setattr(workdir_lib, 'mark_finished', lambda d, step: (
      seen.append(sorted(os.listdir(os.path.join(d, 'checkpoints')))), real_mark(d, step)))

  def failing_end(*args, **kwargs):
    raise RuntimeError('the evaluation failed')
  monkeypatch.setattr(trainer, '_finish', failing_end)
  with pytest.raises(RuntimeError, match='the evaluation failed'):
    trainer.train(small_config(train__steps=4), str(w), log=quiet)
  assert sorted(os.listdir(w / 'checkpoints')) == ['2', '4'] and not seen
  assert not os.path.exists(w / 'finished.json')
  ends = []
  monkeypatch.setattr(trainer, '_finish', lambda *a, **k: (ends.append(1), real_finish(*a, **k)))
  result = trainer.train(small_config(train__steps=4), str(w), log=quiet)
  assert result['start_step'] == 4 and result['step'] == 4 and ends == [1]
  assert seen == [['2', '4']]   # the finished mark saw the last checkpoint complete
  assert json.load(open(w / 'finished.json'))['step'] == 4
