"""jaxlm.scaling: the scaling-study runner on simulated CPU devices (real trainer runs)."""
import csv
import json

import train_config  # tests/train_config.py
from jaxlm import scaling


def test_study_rows_table_and_plot(tmp_path):
  base = train_config.get_config()
  logged = []
  rows = scaling.run_study(base, [160, 320], ['ring'], [2], str(tmp_path), steps=3,
                           log=logged.append)
  assert [(r['seq_len'], r['attention'], r['status'], r['mesh']) for r in rows] == [
      (160, 'ring', 'ok', 'context2'), (320, 'ring', 'ok', 'context2')]
  for r in rows:
    assert r['step_time_s'] > 0 and r['model_tflops_per_s'] > 0 and r['mfu'] is None  # CPU
    assert abs(r['tokens_per_s'] * r['step_time_s'] - 2 * r['seq_len']) < 1e-6 * r['tokens_per_s']
  # Doubling the sequence grows the per-device memory (activations scale with T).
  assert rows[1]['temp_gib_per_device'] > rows[0]['temp_gib_per_device']
  assert sum(l.startswith('[scaling] ') and 'ETA' in l for l in logged) == 2
  with open(tmp_path / 'scaling.csv') as f:
    assert len(list(csv.DictReader(f))) == 2
  assert (tmp_path / 'scaling.png').stat().st_size > 0
  assert '| 320 | ring | 2 | context2 | ok |' in (tmp_path / 'scaling.md').read_text()
  # Each row is a fresh run (a rerun into the same directory must not resume the old one).
  again = scaling.run_study(base, [160], ['ring'], [2], str(tmp_path), steps=2,
                            log=lambda _: None)
  assert again[0]['status'] == 'ok'
  assert [json.loads(l)['step'] for l in open(tmp_path / 'T160-ring-d2' / 'metrics.jsonl')] == [1, 2]
  # The rerun's table holds the rerun's rows only.
  assert '| 320 |' not in (tmp_path / 'scaling.md').read_text()


def test_rows_that_cannot_run_are_kept_with_the_reason(tmp_path):
  rows = scaling.run_study(train_config.get_config(), [102], ['ring'], [2], str(tmp_path),
                           mode='aot', log=lambda _: None)
  assert rows[0]['status'].startswith('config error') and 'seq_len=102' in rows[0]['status']
  assert 'config error' in (tmp_path / 'scaling.md').read_text()
