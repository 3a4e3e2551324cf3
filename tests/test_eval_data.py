"""`python -m jaxlm.evaluate.data`: the listed digests match the files this project ships,
and fetch keeps a download only when it verifies (a local HTTP server stands in for the
hosts, which these machines cannot reach)."""
import functools
import http.server
import io
import json
import os
import subprocess
import threading
import zipfile

import pytest

from jaxlm.evaluate import data
from jaxlm.evaluate.common import DATA


@pytest.fixture
def server(tmp_path, monkeypatch):
  for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)   # the local server, never a proxy
  root = tmp_path / 'www'
  root.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
  handler.log_message = lambda *a: None
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield root, f'http://127.0.0.1:{httpd.server_address[1]}'
  httpd.shutdown()


def test_the_listed_digests_are_those_of_the_shipped_copies():
  shipped = {'mdqa-oracle': 'lost-in-the-middle/nq-open-oracle.jsonl.gz',
             'litm-kv-75': 'lost-in-the-middle/kv-retrieval-75_keys.jsonl.gz',
             'gsm8k-test': 'gsm8k/test.jsonl', 'gsm8k-train': 'gsm8k/train.jsonl'}
  for name, rel in shipped.items():
    assert data.verify(data.BY_NAME[name], os.path.join(DATA, rel))
  # the git-blob digest is what `git hash-object` prints (the upstream tree's blob id)
  kv = os.path.join(DATA, 'lost-in-the-middle', 'kv-retrieval-75_keys.jsonl.gz')
  assert data.file_digests(kv)['git_blob'] == '6d125bd4c448d2697c26948b9be66c3bfe33a392'
  try:
    out = subprocess.run(['git', 'hash-object', kv], capture_output=True, text=True).stdout
    assert out.strip() == data.file_digests(kv)['git_blob']
  except FileNotFoundError:
    pass   # no git on this machine: the fixed id above still pins it
  names = [s.name for s in data.SOURCES]
  assert len(names) == len(set(names))
  for suite in ('mdqa', 'litm_kv', 'flenqa', 'mmlu', 'hellaswag', 'gsm8k', 'gsm8k_train',
                'triviaqa', 'nq_open'):
    assert any(s.suite == suite for s in data.SOURCES), suite


def test_fetch_keeps_only_a_verified_download(server, tmp_path):
  root, base = server
  (root / 'good.jsonl').write_text('{"question": "q", "answer": ["a"]}\n')
  (root / 'bad.jsonl').write_text('<html>proxy login</html>\n')
  digests = data.file_digests(str(root / 'good.jsonl'))
  for kind in ('sha256', 'git_blob'):
    src = data.Source('x', 'nq_open', f'{base}/good.jsonl', f'x-{kind}.jsonl', **{kind: digests[kind]})
    path = data.fetch(src, str(tmp_path / 'd'), log=lambda s: None)
    assert open(path).read() == (root / 'good.jsonl').read_text()
    # the same source from a server that returns something else: refused, nothing left
    bad = dataclasses_replace(src, url=f'{base}/bad.jsonl', file=f'y-{kind}.jsonl')
    with pytest.raises(data.FetchError, match=f'has {kind} .* expected {digests[kind]}'):
      data.fetch(bad, str(tmp_path / 'd'), log=lambda s: None)
    assert not any(f.startswith('y-') for f in os.listdir(tmp_path / 'd'))
  with pytest.raises(data.FetchError, match='cannot download .*missing.jsonl'):
    data.fetch(data.Source('m', 'nq_open', f'{base}/missing.jsonl', 'm.jsonl', sha256='0' * 64),
               str(tmp_path / 'd'), log=lambda s: None)


def dataclasses_replace(src, **kw):
  import dataclasses
  return dataclasses.replace(src, **kw)


def test_fetch_unpacks_archives_and_needs_unverified_without_a_digest(server, tmp_path, capsys):
  root, base = server
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('FLenQA/flenqa.jsonl', json.dumps({'label': True}) + '\n')
  (root / 'f.zip').write_bytes(buf.getvalue())
  src = data.Source('z', 'flenqa', f'{base}/f.zip', 'f.zip', unpack='zip')
  with pytest.raises(data.FetchError, match='no published digest .* --unverified'):
    data.fetch(src, str(tmp_path / 'z'), log=lambda s: None)
  logs = []
  data.fetch(src, str(tmp_path / 'z'), unverified=True, log=logs.append)
  assert (tmp_path / 'z' / 'FLenQA' / 'flenqa.jsonl').exists()
  assert data.file_digests(str(root / 'f.zip'))['sha256'] in logs[-1] and 'pin it' in logs[-1]


def test_cli_lists_every_source_and_fetches_from_a_mirror(server, tmp_path, capsys):
  root, base = server
  assert data.main(['--list']) == 0
  out = capsys.readouterr().out
  for s in data.SOURCES:
    assert s.name in out and s.file in out and s.url in out
  assert 'sha256:6a7f72b8' in out and 'git-blob:19d062a7' in out
  with open(os.path.join(DATA, 'gsm8k', 'test.jsonl'), 'rb') as f:
    (root / 'test.jsonl').write_bytes(f.read())
  rc = data.main(['fetch', 'gsm8k-test', f'--dir={tmp_path / "g"}', f'--url={base}/test.jsonl'])
  assert rc == 0 and f'--data=gsm8k={tmp_path / "g" / "test.jsonl"}' in capsys.readouterr().out
  (root / 'test.jsonl').write_text('changed\n')
  rc = data.main(['fetch', 'gsm8k-test', f'--dir={tmp_path / "h"}', f'--url={base}/test.jsonl'])
  assert rc == 1 and 'data error: gsm8k-test: ' in capsys.readouterr().err
  with pytest.raises(SystemExit):
    data.main(['fetch', 'no-such', '--dir=x'])
