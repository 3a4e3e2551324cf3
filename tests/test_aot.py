"""Ahead-of-time compilation: the CPU-mesh report always; TPU topologies through libtpu
(launch/test.sh installs requirements-tpu.txt when it can)."""
import json
import os
import subprocess
import sys

import pytest

import train_config  # tests/train_config.py
from jaxlm import aot
from jaxlm import train as trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# launch/test.sh installs libtpu into .venv/tpu-extra (not site-packages: with libtpu
# importable, every plain `import jax` run would probe for a TPU and print warnings).
TPU_EXTRA = os.path.join(ROOT, '.venv', 'tpu-extra')
if os.path.isdir(TPU_EXTRA) and TPU_EXTRA not in sys.path:
  sys.path.append(TPU_EXTRA)
try:
  import libtpu  # noqa: F401
  NO_LIBTPU = None
except ImportError as e:
  NO_LIBTPU = (f'libtpu could not be installed here (launch/test.sh puts it in '
               f'.venv/tpu-extra from requirements-tpu.txt): {e}')


def _report(tmp_path, **fields):
  c = train_config.get_config()
  c.mesh.fsdp, c.mesh.devices = 4, 4
  for k, v in fields.items():
    section, name = k.split('__')
    c[section][name] = v
  return trainer.train(c, str(tmp_path), aot_only=True, log=lambda _: None)


def test_cpu_mesh_report_grows_with_batch_and_sequence(tmp_path):
  base = _report(tmp_path / 'a')
  assert base['devices'] == 4 and base['mesh']['fsdp'] == 4 and base['fits'] is None
  assert json.load(open(tmp_path / 'a' / 'aot.json'))['total_bytes_per_device'] == \
      base['total_bytes_per_device']
  double_b = _report(tmp_path / 'b', train__batch_size=16)
  T = train_config.get_config().data.seq_len
  double_t = _report(tmp_path / 't', data__seq_len=2 * T)
  # The batch is an argument: 5 int32 [B, T] arrays, split over the 4 fsdp devices.
  batch_bytes = 5 * 4 * 8 * T // 4
  for bigger in (double_b, double_t):
    assert bigger['argument_bytes'] - base['argument_bytes'] == batch_bytes
    assert bigger['temp_bytes'] > base['temp_bytes']
    assert bigger['model_flops_per_step'] > 1.99 * base['model_flops_per_step']
  # Attention makes a longer sequence cost more FLOPs than a bigger batch of the same tokens.
  assert double_t['model_flops_per_step'] > double_b['model_flops_per_step']


@pytest.mark.parametrize('name, gen, chips, slices, shape', [
    ('v5p-8', 'v5p', 4, 1, (2, 2, 1)), ('v5p-16', 'v5p', 8, 1, (2, 2, 2)),
    ('v5p-32', 'v5p', 16, 1, (2, 2, 4)), ('v5p-128', 'v5p', 64, 1, (4, 4, 4)),
    ('v5e-16', 'v5e', 16, 1, (4, 4)), ('v5litepod-8', 'v5e', 8, 1, (2, 4)),
    ('v6e-8', 'v6e', 8, 1, (2, 4)), ('v6e-256', 'v6e', 256, 1, (16, 16)),
    ('2xv5p-32', 'v5p', 16, 2, (2, 2, 4))])
def test_topology_names(name, gen, chips, slices, shape):
  t = aot.parse_topology(name)
  assert (t.generation, t.chips, t.slices, t.shape) == (gen, chips, slices, shape)
  assert t.num_devices == chips * slices


@pytest.mark.parametrize('name, msg', [
    ('v5p-7', 'multiple of 2'), ('v7x-8', "generation 'v7x' is not supported"),
    ('tpu', 'is not a TPU type'), ('v6e-12', 'power-of-two')])
def test_bad_topology_names(name, msg):
  with pytest.raises(aot.TopologyError, match=msg):
    aot.parse_topology(name)


def _tpu_config():
  c = train_config.get_config()
  c.data.seq_len = 256   # a multiple of the TPU's 128-wide tiles: argument bytes come out exact
  return c


@pytest.mark.skipif(NO_LIBTPU is not None, reason=str(NO_LIBTPU))
def test_compiles_for_a_tpu_topology_without_a_tpu(tmp_path):
  r = trainer.train(_tpu_config(), str(tmp_path), aot_only=True,
                    topology='v5e-4', log=lambda _: None)
  assert r['topology'] == 'v5e-4' and r['devices'] == 4 and r['device_kind'] == 'TPU v5 lite'
  assert r['mesh']['fsdp'] == 4 and r['fits'] is True
  assert r['hbm_bytes_per_device'] == aot.CHIPS['v5e']['hbm']
  assert r['compiler_flops_per_device'] > 0 and 0 < r['mfu_upper_bound'] <= 1.5
  assert r["step_time_lower_bound_s"] >= r["compiler_flops_per_device"] / 197e12
  two = trainer.train(_tpu_config(), str(tmp_path / 's'), aot_only=True,
                      topology='2xv5e-4', log=lambda _: None)
  assert two['devices'] == 8 and (two['mesh']['data'], two['mesh']['fsdp']) == (2, 4)
  # Doubling the batch on the topology doubles each device's slice of it: the arguments grow
  # by 8 rows x seq_len positions x 5 int32 features / 4 devices. (The total is not monotone in
  # the batch for a model this small: the TPU compiler's fusion choices move it both ways.)
  c = _tpu_config()
  c.train.batch_size = 16
  big = trainer.train(c, str(tmp_path / 'b'), aot_only=True, topology='v5e-4',
                      log=lambda _: None)
  assert big['argument_bytes'] - r['argument_bytes'] == 8 * c.data.seq_len * 5 * 4 // 4


@pytest.mark.skipif(NO_LIBTPU is not None, reason=str(NO_LIBTPU))
def test_single_chip_topologies_are_described():
  for name in ('v5e-1', 'v6e-1', 'v6e-2'):   # hosts smaller than libtpu's default 2x2
    topo = aot.parse_topology(name)
    assert len(aot.topology_devices(topo)) == topo.chips


def test_cli_names_bad_topologies_and_missing_libtpu(tmp_path, monkeypatch):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  cmd = [sys.executable, '-m', 'jaxlm.train', '--config=tests/train_config.py',
         f'--workdir={tmp_path}', '--aot_only']
  r = subprocess.run(cmd + ['--topology=v9z-8'], cwd=ROOT, env=env, capture_output=True,
                     text=True)
  assert r.returncode != 0 and "topology error: --topology='v9z-8'" in r.stderr
  r = subprocess.run(cmd[:-1] + ['--topology=v5e-4'], cwd=ROOT, env=env, capture_output=True,
                     text=True)
  assert r.returncode != 0 and 'only applies with --aot_only' in r.stderr
  monkeypatch.setitem(sys.modules, 'libtpu', None)   # as if it were not installed
  with pytest.raises(aot.TopologyError, match='requirements-tpu.txt'):
    aot.topology_devices(aot.parse_topology('v5e-4'))


@pytest.mark.parametrize('chips', [1, 4, 8, 16, 32, 64, 256])
@pytest.mark.parametrize('attention', ['blockwise', 'ring'])
def test_fit_study_meshes_use_every_chip_and_split_the_batch(chips, attention):
  from jaxlm.bench import fit
  m = fit.mesh_for(chips, 16, attention)
  assert m['data'] * m['fsdp'] * m['tensor'] * m['context'] == chips
  assert 16 % (m['data'] * m['fsdp']) == 0
  assert (m['context'] >= 2) == (attention == 'ring' and chips > 1)
  assert m['tensor'] == 1 or attention != 'ring'


def test_fit_study_table_names_the_smallest_fitting_topology(tmp_path):
  from jaxlm.bench import fit
  row = lambda t, T, fits, gib: dict(topology=t, seq_len=T, attention='blockwise', remat='full',
                                     mesh='fsdp4', fits=fits, gib_per_device=gib, hbm_gib=88.5,
                                     step_time_lower_bound_s=1.0, status='ok')
  rows = [row('v5p-8', 4096, True, 40.0), row('v5p-8', 32768, False, 120.0),
          row('v5p-16', 32768, True, 70.0), row('v5p-16', 131072, False, 300.0)]
  text = fit.write_outputs(str(tmp_path), rows, ['v5p-8', 'v5p-16'])
  assert '- 4096 tokens: smallest fitting topology v5p-8' in text
  assert '- 32768 tokens: smallest fitting topology v5p-16' in text
  assert '- 131072 tokens: no topology in the study fits' in text
  assert (tmp_path / 'fit.png').stat().st_size > 0 and (tmp_path / 'fit.csv').exists()


def test_fit_study_compiles_the_configs_scanned_layers_or_unrolled_ones():
  from jaxlm.bench import fit
  mesh = fit.mesh_for(8, 16, 'splash')
  assert fit.case_config(4096, 'splash', 'full', mesh, None).model.scan_layers is True
  assert fit.case_config(4096, 'splash', 'full', mesh, None, unrolled=True).model.scan_layers \
      is False
