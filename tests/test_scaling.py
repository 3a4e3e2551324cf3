"""jaxlm.scaling: the scaling-study runner on simulated CPU devices (real trainer runs)."""
import csv

import train_config  # tests/train_config.py
from jaxlm import scaling


def test_study_rows_table_and_plot(tmp_path):
  base = train_config.get_config()
  logged = []
  rows = scaling.run_study(base, [128, 256], ['blockwise', 'ring'], [2], str(tmp_path),
                           steps=3, log=logged.append)
  assert [(r['seq_len'], r['attention'], r['status']) for r in rows] == [
      (128, 'blockwise', 'ok'), (128, 'ring', 'ok'), (256, 'blockwise', 'ok'), (256, 'ring', 'ok')]
  assert [r['mesh'] for r in rows[:2]] == ['fsdp2', 'context2']
  for r in rows:
    assert r['step_time_s'] > 0 and r['model_tflops_per_s'] > 0 and r['mfu'] is None  # CPU
    assert abs(r['tokens_per_s'] * r['step_time_s'] - 2 * r['seq_len']) < 1e-6 * r['tokens_per_s']
  # Doubling the sequence grows each kernel's per-device memory (activations scale with T).
  for impl in ('blockwise', 'ring'):
    short, long = (r for r in rows if r['attention'] == impl)
    assert long['temp_gib_per_device'] > short['temp_gib_per_device']
  assert sum(l.startswith('[scaling] ') and 'ETA' in l for l in logged) == 4
  with open(tmp_path / 'scaling.csv') as f:
    assert len(list(csv.DictReader(f))) == 4
  assert (tmp_path / 'scaling.png').stat().st_size > 0
  assert '| 256 | ring | 2 | context2 | ok |' in (tmp_path / 'scaling.md').read_text()


def test_rows_that_cannot_run_are_kept_with_the_reason(tmp_path):
  rows = scaling.run_study(train_config.get_config(), [102], ['ring'], [2], str(tmp_path),
                           mode='aot', log=lambda _: None)
  assert rows[0]['status'].startswith('config error') and 'seq_len=102' in rows[0]['status']
  assert 'config error' in (tmp_path / 'scaling.md').read_text()
