"""launch/: N local processes train as one JAX runtime and match one process; the TPU pod
and SLURM launchers print the commands they would run (no cloud, no scheduler here)."""
import json
import os
import subprocess

import numpy as np

import train_config  # tests/train_config.py
from test_train import final_params, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, env=None, timeout=600):
  e = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  e.update(env or {})
  return subprocess.run(['bash', *args], cwd=ROOT, env=e, capture_output=True, text=True,
                        timeout=timeout)


def _close(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_two_and_four_processes_match_one_and_resume_across_counts(tmp_path):
  # Reference: one process owning 4 devices, the same global batch of 8 (packed: the data
  # stream is global, each process takes its rows).
  assert train_config.get_config().data.packing
  ref = run_cli(tmp_path / 'ref', '--config.mesh.devices=4')
  assert ref.returncode == 0, ref.stderr[-2000:]
  ref_step, ref_params = final_params(tmp_path / 'ref')

  four = _launch('launch/multiprocess.sh', '4', 'tests/train_config.py',
                 f'--workdir={tmp_path}/four')
  assert four.returncode == 0, four.stdout[-2000:] + four.stderr[-2000:]
  assert "4 processes x 1 CPU device(s)" in four.stdout and "'fsdp': 4" in four.stdout
  assert os.path.exists(tmp_path / 'four' / 'process_3.log')
  step, params = final_params(tmp_path / 'four')
  assert step == ref_step == 6
  _close(params, ref_params)

  # Two processes x 2 devices; only process 1 gets SIGTERM, after step 3. Both stop
  # together (the stop flag travels with step 4, which is read when it is logged) with one
  # checkpoint at step 4; one process on 4 devices resumes to 6 with the same data
  # stream, and ends where the reference does.
  first = _launch('launch/multiprocess.sh', '2', 'tests/train_config.py',
                  f'--workdir={tmp_path}/two', '--config.debug.sigterm_at_step=3',
                  '--config.debug.signal_process=1', env={'DEVICES_PER_PROCESS': '2'})
  assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
  assert 'a stop signal on another process: saved the checkpoint at step 4' in first.stdout
  again = run_cli(tmp_path / 'two', '--config.mesh.devices=4')
  assert again.returncode == 0, again.stderr[-2000:]
  assert 'resumed from step 4' in again.stdout and 'restarts' not in again.stdout
  step, params = final_params(tmp_path / 'two')
  assert step == 6
  _close(params, ref_params)


def test_multiprocess_failure_stops_every_process(tmp_path):
  r = _launch('launch/multiprocess.sh', '2', 'tests/train_config.py', f'--workdir={tmp_path}/w',
              '--config.train.stepz=3')
  assert r.returncode != 0 and 'stepz' in r.stdout + r.stderr
  bad = _launch('launch/multiprocess.sh', 'two', 'tests/train_config.py')
  assert bad.returncode == 2 and "got 'two'" in bad.stderr


def test_tpu_pod_dry_run_prints_every_command():
  r = _launch('launch/tpu_pod.sh', '--dry-run', '--name=pod1', '--zone=us-east5-a',
              '--type=v5p-32', '--project=proj', 'configs/mistral7b_simple_kv.py',
              '--workdir=gs://bucket/runs/skv', '--config.train.steps=10')
  assert r.returncode == 0, r.stderr
  lines = r.stdout.splitlines()
  cmds = [l for l in lines if l.startswith('+ ')]
  assert cmds[0] == ('+ gcloud compute tpus tpu-vm create pod1 --accelerator-type=v5p-32 '
                     '--version=v2-alpha-tpuv5 --zone=us-east5-a --project=proj')
  assert any('tpu-vm scp' in c and '--worker=all' in c for c in cmds)
  assert any('JAX_EXTRA=tpu bash launch/setup.sh' in c for c in cmds)
  train = cmds[-1]
  assert train.startswith('+ gcloud compute tpus tpu-vm ssh pod1 --zone=us-east5-a '
                          '--project=proj --worker=all')
  for part in ('python -m jaxlm.train', '--config=configs/mistral7b_simple_kv.py',
               '--config.distributed=True', '--workdir=gs://bucket/runs/skv',
               '--config.train.steps=10'):
    assert part in train


def test_tpu_pod_multislice_and_errors():
  r = _launch('launch/tpu_pod.sh', '--dry-run', '--name=ms', '--zone=z', '--type=v6e-256',
              '--slices=2', '--spot', '--repo=https://example.com/jaxlm.git',
              'configs/mistral7b_simple_kv.py', '--workdir=gs://b/r', '--config.mesh.data=2')
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if l.startswith('+ ')]
  assert cmds[0].startswith('+ gcloud compute tpus queued-resources create ms --node-count=2 '
                            '--node-prefix=ms --accelerator-type=v6e-256')
  assert cmds[0].endswith('--spot')
  assert sum('git clone' in c for c in cmds) == 2
  trains = [c for c in cmds if 'jaxlm.train' in c]
  assert [c.split()[6] for c in trains] == ['ms-0', 'ms-1']
  for args, msg in [(['--name=x', '--zone=z', '--type=v5p'], "--type='v5p'"),
                    (['--zone=z', '--type=v5p-8'], '--name=NAME is required'),
                    (['--name=x', '--zone=z', '--type=v5p-8', '--bogus'], "unknown option '--bogus'")]:
    r = _launch('launch/tpu_pod.sh', '--dry-run', *args, 'configs/tiny_kv.py', '--workdir=gs://b')
    assert r.returncode == 2 and msg in r.stderr, r.stderr
  r = _launch('launch/tpu_pod.sh', '--dry-run', '--name=x', '--zone=z', '--type=v5p-8',
              'configs/tiny_kv.py')
  assert r.returncode == 2 and '--workdir=gs://' in r.stderr


def test_slurm_dry_run_takes_the_coordinator_from_the_allocation():
  env = {'DRY_RUN': '1', 'SLURM_JOB_NODELIST': 'gpu[007-010]', 'SLURM_NNODES': '4',
         'SLURM_JOB_ID': '31337'}
  r = _launch('launch/gpu_slurm.sbatch', 'configs/mistral7b_simple_kv.py',
              '--workdir=/shared/runs/x', env=env)
  assert r.returncode == 0, r.stderr
  cmds = [l for l in r.stdout.splitlines() if l.startswith('+ ')]
  assert cmds[0] == '+ env JAX_EXTRA=cuda12 bash launch/setup.sh'
  srun = cmds[-1]
  assert srun.startswith('+ srun --nodes=4 --ntasks-per-node=1')
  for part in ('JAX_COORDINATOR_ADDRESS=gpu007:31337', 'JAX_NUM_PROCESSES=$SLURM_NTASKS',
               'JAX_PROCESS_ID=$SLURM_PROCID', '-m jaxlm.train',
               '--config=configs/mistral7b_simple_kv.py', '--config.distributed=True',
               '--workdir=/shared/runs/x'):
    assert part in srun, part
  outside = _launch('launch/gpu_slurm.sbatch', 'configs/tiny_kv.py',
                    env={'SLURM_JOB_NODELIST': ''})
  assert outside.returncode == 2 and 'not inside a SLURM allocation' in outside.stderr


def test_transfer_experiment_runs_both_models_and_compares(tmp_path):
  """launch/transfer.sh on a tiny stand-in for both models: two evaluations, one table."""
  from tests.conftest import make_hf_model
  make_hf_model(tmp_path / 'hf', vocab_size=32000, max_position_embeddings=8192)
  r = _launch('launch/transfer.sh', env={'TUNED': str(tmp_path / 'missing')})
  assert r.returncode == 2 and f'no fine-tuned model at {tmp_path}/missing' in r.stderr
  env = {'BASE': str(tmp_path / 'hf'), 'TUNED': str(tmp_path / 'hf'), 'N': '1',
         'OUT': str(tmp_path / 'evals'), 'JAX_PLATFORMS': 'cpu'}
  r = _launch('launch/transfer.sh', '--max_new_tokens=2', env=env)
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ('base', 'simple_kv'):
    res = json.load(open(tmp_path / 'evals' / f'smol_{name}' / 'results.json'))
    assert res['name'] == name
    rows = {(s['variant'], s.get('gold_position')) for s in res['scores']}
    assert rows == {('haystack', 1), ('haystack', 5), ('haystack', 10), ('oracle', 1),
                    ('closedbook', None)}
    assert all(s['n'] == 1 and s['num_docs'] in (0, 1, 10) for s in res['scores'])
  table = (tmp_path / 'evals' / 'compare' / 'comparison.md').read_text()
  assert 'simple_kv (Δ)' in table and 'num_docs=10' in table
  assert (tmp_path / 'evals' / 'compare' / 'mdqa_by_position.png').exists()


def test_env_preloads_tcmalloc_when_present_and_can_be_turned_off():
  import glob
  script = 'source launch/_env.sh requirements-test.txt >/dev/null; echo "[${LD_PRELOAD:-}]"'
  env = {k: v for k, v in os.environ.items() if k not in ('LD_PRELOAD', 'JAXLM_TCMALLOC')}
  on = subprocess.run(['bash', '-c', script], cwd=ROOT, env=env, capture_output=True, text=True)
  off = subprocess.run(['bash', '-c', script], cwd=ROOT, env={**env, 'JAXLM_TCMALLOC': '0'},
                       capture_output=True, text=True)
  assert on.returncode == 0 and off.returncode == 0, on.stderr + off.stderr
  assert off.stdout.strip() == '[]' and 'tcmalloc' not in off.stderr
  libs = glob.glob('/usr/lib/*/libtcmalloc_minimal.so.4') + glob.glob('/usr/lib*/libtcmalloc_minimal.so.4')
  if libs:
    assert on.stdout.strip() == f'[{libs[0]}]'
  else:   # absent: nothing preloaded, and the set-up says how to get it
    assert on.stdout.strip() == '[]' and 'apt-get install libtcmalloc-minimal4' in on.stderr
