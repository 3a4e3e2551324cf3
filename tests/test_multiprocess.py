"""The trainer as two JAX processes on this machine (jax.distributed over gloo): the
multi-host code path (per-process data slices, global arrays from local batches,
multi-process Orbax checkpoints)."""
import os
import socket
import subprocess
import sys

import numpy as np

from test_train import final_params, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_together(tmp_path):
  port = _free_port()
  procs = []
  for i in range(2):
    env = {**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu',
           'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
           'JAX_COORDINATOR_ADDRESS': f'localhost:{port}', 'JAX_NUM_PROCESSES': '2',
           'JAX_PROCESS_ID': str(i)}
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'jaxlm.train', '--config=tests/train_config.py',
         f'--workdir={tmp_path}/w', '--config.distributed=True', '--config.mesh.devices=0',
         '--config.mesh.fsdp=-1'], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  lines = [l for l in outs[0][0].splitlines() if l.startswith('[train] step')]
  assert len(lines) == 6 and 'mesh {\'data\': 1, \'fsdp\': 4' in outs[0][0]
  assert not [l for l in outs[1][0].splitlines() if l.startswith('[train] step')]  # one console
  losses = [float(l.split('loss ')[1].split()[0]) for l in lines]
  assert losses[-1] < losses[0]
  assert os.path.isdir(f'{tmp_path}/w/checkpoints/6')
  # The 2-process checkpoint restores in one process on 4 devices and training goes on.
  more = run_cli(f'{tmp_path}/w', '--config.mesh.devices=4', '--config.mesh.fsdp=4',
                 '--config.train.steps=8')
  assert more.returncode == 0 and 'resumed from step 6' in more.stdout, more.stderr[-2000:]
  assert 'data stream restarts' in more.stdout   # 2 processes' data state, 1 process now
  step, params = final_params(f'{tmp_path}/w')
  assert step == 8 and all(np.isfinite(v).all() for v in params.values())
