"""jaxlm.sweep: grid expansion, run naming, a half-finished sweep resumed, the table."""
import csv
import json
import os
import subprocess
import sys

import pytest

from jaxlm import sweep
from test_train import run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_grid_expansion_and_names():
  grid = sweep.parse_grid('train.lr=1e-3,3e-3  model.num_layers=1,2 data.seed=7')
  assert grid == {'train.lr': ['1e-3', '3e-3'], 'model.num_layers': ['1', '2'],
                  'data.seed': ['7']}
  points = sweep.expand(grid)
  assert [n for n, _ in points] == [
      'lr=1e-3,num_layers=1,seed=7', 'lr=1e-3,num_layers=2,seed=7',
      'lr=3e-3,num_layers=1,seed=7', 'lr=3e-3,num_layers=2,seed=7']
  assert points[1][1] == {'train.lr': '1e-3', 'model.num_layers': '2', 'data.seed': '7'}
  # Two fields with the same last component keep their full names.
  both = sweep.expand(sweep.parse_grid('data.seed=1 eval.seed=2'))
  assert both[0][0] == 'data.seed=1,eval.seed=2'
  assert sweep.expand({'data.task': ['a/b c']})[0][0] == 'task=a-b-c'
  cmd = sweep.command('configs/tiny_kv.py', 'runs/s/x', points[0][1], ['train.steps=5'], None)
  assert cmd[1:] == ['-m', 'jaxlm.train', '--config=configs/tiny_kv.py', '--workdir=runs/s/x',
                     '--config.train.steps=5', '--config.train.lr=1e-3',
                     '--config.model.num_layers=1', '--config.data.seed=7']
  pod = sweep.command('c.py', 'gs://b/x', {'train.lr': '1'}, [], 'bash launch/tpu_pod.sh --name=p')
  assert pod == ['bash', 'launch/tpu_pod.sh', '--name=p', 'c.py', '--workdir=gs://b/x',
                 '--config.train.lr=1']


@pytest.mark.parametrize('text, msg', [
    ('train.lr', 'is not FIELD=v1,v2'), ('train.lr=1,,2', 'empty value'),
    ('a=1 a=2', 'given twice'), ('9x=1', 'not a dotted config field'), ('', 'grid is empty')])
def test_bad_grids_are_named(text, msg):
  with pytest.raises(sweep.SweepError, match=msg):
    sweep.parse_grid(text)


def test_unknown_grid_field_is_rejected_before_any_run(tmp_path):
  r = subprocess.run([sys.executable, '-m', 'jaxlm.sweep', '--config=tests/train_config.py',
                      '--grid=train.lrr=1,2', f'--workdir={tmp_path}'], cwd=ROOT,
                     capture_output=True, text=True, env={**os.environ, 'PYTHONPATH': ROOT})
  assert r.returncode != 0 and "no field 'lrr'" in r.stderr
  assert not os.listdir(tmp_path)


def test_sweep_runs_resumes_half_finished_and_collects(tmp_path):
  work = tmp_path / 'sweep'
  fixed = ['train.steps=2', 'train.checkpoint_every=1']
  rows = sweep.run_sweep('tests/train_config.py', {'train.lr': ['0.001']}, str(work),
                         fixed=fixed, log=lambda *_: None)
  assert [r['status'] for r in rows] == ['ran'] and rows[0]['step'] == 2
  # A second point killed after its first step: a checkpoint, no completion marker.
  partial = run_cli(work / 'lr=0.002', '--config.train.lr=0.002', '--config.train.steps=1')
  assert partial.returncode == 0, partial.stderr[-2000:]

  logged = []
  rows = sweep.run_sweep('tests/train_config.py', {'train.lr': ['0.001', '0.002']}, str(work),
                         fixed=fixed, metric='loss', log=logged.append)
  assert [r['status'] for r in rows] == ['done', 'ran']   # the finished one is not rerun
  assert sum('[sweep] run' in l for l in logged) == 1
  assert 'resumed from step 1' in open(work / 'lr=0.002' / 'sweep_train.log').read()
  assert [r['step'] for r in rows] == [2, 2]
  with open(work / 'sweep.csv') as f:
    table = list(csv.DictReader(f))
  assert [t['train.lr'] for t in table] == ['0.001', '0.002']
  assert all(float(t['loss']) > 0 and float(t['tokens_per_s']) > 0 for t in table)
  assert '| lr=0.002 | 0.002 | ran | 2 |' in open(work / 'sweep.md').read()
  assert (work / 'sweep.png').stat().st_size > 0
  assert json.load(open(work / 'sweep.json'))['grid'] == {'train.lr': ['0.001', '0.002']}

  printed = []
  sweep.run_sweep('tests/train_config.py', {'train.lr': ['0.001', '0.002']}, str(work),
                  mode='print', launcher='bash launch/multiprocess.sh 2', log=printed.append)
  assert printed == [f'bash launch/multiprocess.sh 2 tests/train_config.py --workdir={work}/{n} '
                     f'--config.train.lr={v}' for n, v in (('lr=0.001', '0.001'),
                                                            ('lr=0.002', '0.002'))]
