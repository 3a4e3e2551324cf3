"""JSONL export: formats validate, shipped samples regenerate exactly, CLI errors."""
import glob
import json
import os
import subprocess
import sys

import pytest

from jaxlm.data import TaskConfigError
from jaxlm.data.export import FORMATS, export, task_fields, validate_record
from jaxlm.tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


@pytest.mark.parametrize('fmt', FORMATS)
@pytest.mark.parametrize('task', ['simple_kv', 'multisubkey_kv', 'niah'])
def test_exported_lines_validate(tmp_path, tok, task, fmt):
  out = str(tmp_path / 'x.jsonl')
  export(task, task_fields(800, '0.5', True, []), num=4, fmt=fmt, out=out, seed=2,
         tokenizer=tok, log=lambda s: None)
  lines = [json.loads(l) for l in open(out)]
  assert len(lines) == 4
  for record in lines:
    validate_record(record, fmt)
    if fmt == 'plain':
      assert record['task'] == task and record['num_tokens'] <= 800
      assert record['num_tokens'] == len(tok.encode(record['prompt'], bos=False))
    else:
      assert record['messages'][-1]['content'].startswith('The ')
  if fmt == 'openai':
    assert lines[0]['messages'][0] == {
        'role': 'system', 'content': 'Write a response that appropriately completes the request.'}


def test_validator_rejects_bad_records():
  with pytest.raises(ValueError, match="roles must be"):
    validate_record({'messages': [{'role': 'assistant', 'content': 'a'}]}, 'hf')
  with pytest.raises(ValueError, match="lacks field 'gold_dict'"):
    validate_record({'prompt': 'p', 'answer': 'a', 'gold_key': 1, 'gold_value': 2}, 'plain')


def test_shipped_samples_regenerate_exactly(tmp_path, tok):
  files = sorted(glob.glob(f'{ROOT}/data/samples/*.jsonl'))
  assert len(files) == 9
  for path in files:
    task, fmt, _ = os.path.basename(path).split('.')
    out = str(tmp_path / os.path.basename(path))
    export(task, task_fields(600, None, True, []), num=3, fmt=fmt, out=out, seed=0,
           tokenizer=tok, log=lambda s: None)
    assert open(out).read() == open(path).read(), path


def test_cli(tmp_path):
  env = {'PYTHONPATH': ROOT, 'PATH': '/usr/bin:/bin'}
  out = tmp_path / 'cli.jsonl'
  ok = subprocess.run([sys.executable, '-m', 'jaxlm.data.export', '--task=multisubkey_kv',
                       '--num=2', '--format=openai', f'--out={out}', '--set=num_dicts=5',
                       '--gold_position=2'], capture_output=True, text=True, env=env, cwd=ROOT)
  assert ok.returncode == 0, ok.stderr
  assert '2/2 examples' in ok.stderr and len(out.read_text().splitlines()) == 2
  bad = subprocess.run([sys.executable, '-m', 'jaxlm.data.export', '--task=simple_kv',
                        f'--out={out}', '--set=num_dicts=5', '--gold_position=9'],
                       capture_output=True, text=True, env=env, cwd=ROOT)
  assert bad.returncode != 0 and 'gold_position=9 is outside the dictionaries' in bad.stderr
  assert len(out.read_text().splitlines()) == 2     # the earlier file is untouched
  with pytest.raises(TaskConfigError, match="--set 'num_dicts' must look like FIELD=VALUE"):
    task_fields(None, None, False, ['num_dicts'])
