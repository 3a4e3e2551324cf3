"""The benchmark scripts still run (tiny sizes; their numbers live in BENCHMARKS.md)."""
from jaxlm.bench import attention_check, data, step


def test_step_benchmark_runs(capsys):
  step.main(['--preset', 'tiny', '--batch', '1', '--seq', '16', '--steps', '1', '--warmup', '1'])
  out = capsys.readouterr().out
  assert 'jaxlm (jax.jit, dense attention)' in out and 'throughput ratio' in out


def test_data_benchmark_runs(capsys):
  data.main(['--budgets', '512', '--tasks', 'simple_kv', '--seconds', '0.05'])
  assert '| simple_kv | 512 |' in capsys.readouterr().out


def test_attention_check_runs(capsys):
  attention_check.main(['--seq', '64', '--heads', '2', '--kv_heads', '1', '--head_dim', '16',
                        '--runs', '1', '--window', '8'])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith('| blockwise')]
  assert rows and all(float(x) < 1e-4 for x in rows[0].split('|')[2:6])


def test_evaluation_throughput_benchmark_runs(capsys):
  from jaxlm.bench import evaluate
  evaluate.main(['--preset', 'tiny', '--prompt', '16', '--batch', '2', '--new', '3',
                 '--repeats', '1'])
  out = capsys.readouterr().out
  rows = [l for l in out.splitlines() if l.startswith('| MDQA 20 docs')]
  assert rows and all(float(x) > 0 for x in rows[0].split('|')[2:4])
