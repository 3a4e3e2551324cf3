"""Where each suite's real evaluation data comes from, and a verified download of it.

  python -m jaxlm.evaluate.data --list                  # source URL, file name, digest
  python -m jaxlm.evaluate.data fetch mdqa-20docs --dir=evaldata
  python -m jaxlm.evaluate --hf=... --suite=mdqa --data=mdqa=evaldata/nq-open-20_total_documents_gold_at_0.jsonl.gz

Every entry names the public URL, the file name the suite reads (`--data=NAME=PATH`) and a
digest the download must match before it is kept: the file's sha256 where this project
has read the file itself (the shipped copies are byte-identical to upstream), else the
Git blob id of the upstream repository's tree (sha1 of "blob <size>\\0" + content: what
`git hash-object FILE` prints), read from a snapshot of that repository. Two sources are
not on GitHub and their digests have not been read by this project (MMLU's tarball,
TriviaQA's): `fetch` downloads them only with `--unverified` and prints the sha256 it got,
to pin. Downloads go to a temporary file and are renamed into place only when verified;
archives are unpacked after verification.

One gold position is enough for Lost in the Middle's multi-document files: the mdqa suite
moves the gold document to each requested position itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import os
import sys
import tarfile
import time
import urllib.request
import zipfile

LITM = 'https://github.com/nelson-liu/lost-in-the-middle/raw/main'
GSM8K = 'https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data'


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  suite: str                    # the --data key (suite or benchmark) it is for
  url: str
  file: str                     # the name it is saved as (what --data points at)
  sha256: str | None = None
  git_blob: str | None = None   # upstream tree's blob id (sha1) when no sha256 is known
  unpack: str | None = None     # 'tar' | 'zip': extracted next to the file
  note: str = ''

  @property
  def digest(self) -> str:
    if self.sha256:
      return f'sha256:{self.sha256}'
    if self.git_blob:
      return f'git-blob:{self.git_blob}'
    return 'unknown (fetch --unverified; pin the printed sha256)'


SOURCES = (
    Source('mdqa-oracle', 'mdqa', f'{LITM}/qa_data/nq-open-oracle.jsonl.gz',
           'nq-open-oracle.jsonl.gz',
           sha256='6a7f72b846f663a133ef952244e5a4e43f06bcf190afe34e8fbe687ce0d1653e',
           note='2655 NQ-Open questions with their gold passage (shipped in data/; the '
                "default: haystacks of other questions' gold passages)"),
    Source('mdqa-10docs', 'mdqa',
           f'{LITM}/qa_data/10_total_documents/nq-open-10_total_documents_gold_at_0.jsonl.gz',
           'nq-open-10_total_documents_gold_at_0.jsonl.gz',
           git_blob='eff71009ef7056aae77733d6ee8cf4614f63756e',
           note='Lost in the Middle: 10 documents, retrieved distractors'),
    Source('mdqa-20docs', 'mdqa',
           f'{LITM}/qa_data/20_total_documents/nq-open-20_total_documents_gold_at_0.jsonl.gz',
           'nq-open-20_total_documents_gold_at_0.jsonl.gz',
           git_blob='19d062a7c970798aa44f47b708d449ee736c046a',
           note='the paper\'s MDQA setting: 20 documents, retrieved distractors'),
    Source('mdqa-30docs', 'mdqa',
           f'{LITM}/qa_data/30_total_documents/nq-open-30_total_documents_gold_at_0.jsonl.gz',
           'nq-open-30_total_documents_gold_at_0.jsonl.gz',
           git_blob='a99c95443cf161e1b2f5310bcb47256de1dbd403',
           note='30 documents, retrieved distractors'),
    Source('litm-kv-75', 'litm_kv', f'{LITM}/kv_retrieval_data/kv-retrieval-75_keys.jsonl.gz',
           'kv-retrieval-75_keys.jsonl.gz',
           sha256='eb6d61fc3473349f2b86df76757c6ab659cc929d907d24caf1c69928e03f6203',
           note='shipped in data/ (the default)'),
    Source('litm-kv-140', 'litm_kv', f'{LITM}/kv_retrieval_data/kv-retrieval-140_keys.jsonl.gz',
           'kv-retrieval-140_keys.jsonl.gz',
           sha256='66d54aae7e38779da482895ccd538faaf5309f144e54f30dc530a95091581fa1'),
    Source('litm-kv-300', 'litm_kv', f'{LITM}/kv_retrieval_data/kv-retrieval-300_keys.jsonl.gz',
           'kv-retrieval-300_keys.jsonl.gz',
           git_blob='c25c0d5a1c1fcc029996477aed1c68aecaa2a002'),
    Source('flenqa', 'flenqa', 'https://github.com/alonj/Same-Task-More-Tokens/raw/main/FLenQA.zip',
           'FLenQA.zip', git_blob='75a7b652eeeed429d4f212897519c9ea245b4a19', unpack='zip',
           note='the archive the FLenQA notebook downloads; point --data=flenqa= at the '
                'JSON-lines file it holds'),
    Source('gsm8k-test', 'gsm8k', f'{GSM8K}/test.jsonl', 'test.jsonl',
           sha256='3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14',
           note='shipped in data/gsm8k (the default)'),
    Source('gsm8k-train', 'gsm8k_train', f'{GSM8K}/train.jsonl', 'train.jsonl',
           sha256='17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465',
           note='the few-shot examples; shipped in data/gsm8k (the default)'),
    Source('nq-open-dev', 'nq_open',
           'https://raw.githubusercontent.com/google-research-datasets/natural-questions/'
           'master/nq_open/NQ-open.dev.jsonl', 'NQ-open.dev.jsonl',
           sha256='f15567f38099f3615f5b8a685c0aef449c11ad90d3da3735e8d1b98115b40616',
           note="3610 questions: lm-eval's nq_open validation split"),
    Source('hellaswag-val', 'hellaswag',
           'https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl',
           'hellaswag_val.jsonl', git_blob='0f5ee25d72216f12317d5d8a7b92deafa423d81e',
           note="10042 contexts: lm-eval's hellaswag validation split"),
    Source('mmlu', 'mmlu', 'https://people.eecs.berkeley.edu/~hendrycks/data.tar', 'data.tar',
           unpack='tar', note='the original CSV release; point --data=mmlu= at the unpacked '
                              'data/ directory (dev/ and test/)'),
    Source('triviaqa', 'triviaqa', 'https://nlp.cs.washington.edu/triviaqa/data/triviaqa-rc.tar.gz',
           'triviaqa-rc.tar.gz', unpack='tar',
           note="2.5 GB; lm-eval's rc.nocontext validation = qa/web-dev.json + "
                'qa/wikipedia-dev.json (17944 questions)'),
)
BY_NAME = {s.name: s for s in SOURCES}


class FetchError(RuntimeError):
  """A download that cannot be kept: unreachable, or not the file the digest names."""


def file_digests(path: str) -> dict[str, str]:
  """{'sha256': ..., 'git_blob': ...} of a file."""
  sha, blob = hashlib.sha256(), hashlib.sha1()
  blob.update(f'blob {os.path.getsize(path)}\0'.encode())
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      sha.update(chunk)
      blob.update(chunk)
  return {'sha256': sha.hexdigest(), 'git_blob': blob.hexdigest()}


def verify(source: Source, path: str) -> str:
  """The file's sha256, once it matches the source's digest (FetchError otherwise)."""
  got = file_digests(path)
  for kind in ('sha256', 'git_blob'):
    want = getattr(source, kind)
    if want and got[kind] != want:
      raise FetchError(f'{source.name}: {path} has {kind} {got[kind]}, expected {want}: not the '
                       'published file (a changed upstream, a proxy page or a broken download)')
  return got['sha256']


def _download(url: str, dest: str, log) -> None:
  t0, last = time.time(), 0.0
  try:
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, 'wb') as f:
      total = int(r.headers.get('Content-Length') or 0)
      done = 0
      for chunk in iter(lambda: r.read(1 << 20), b''):
        f.write(chunk)
        done += len(chunk)
        now = time.time()
        if now - last > 10:
          rate = done / max(now - t0, 1e-9)
          eta = f', ETA {(total - done) / rate:.0f} s' if total else ''
          log(f'[data] {done / 2**20:.1f}' + (f' / {total / 2**20:.1f}' if total else '')
              + f' MiB ({rate / 2**20:.1f} MiB/s{eta})')
          last = now
  except OSError as e:
    raise FetchError(f'cannot download {url}: {e}') from e


def fetch(source: Source, directory: str, *, url: str | None = None, unverified: bool = False,
          log=print) -> str:
  """Download `source` into `directory` (verified, then unpacked); returns the file's path.
  An existing file that verifies is kept without downloading again."""
  if not (source.sha256 or source.git_blob) and not unverified:
    raise FetchError(f'{source.name}: no published digest is known to this project; rerun with '
                     '--unverified to download it and print its sha256')
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(directory, source.file)
  if os.path.exists(path) and (source.sha256 or source.git_blob):
    try:
      verify(source, path)
      log(f'[data] {path} is already there and verified')
      return path
    except FetchError:
      pass   # re-download over a damaged copy
  tmp = path + '.part'
  try:
    _download(url or source.url, tmp, log)
    sha = verify(source, tmp)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  os.replace(tmp, path)
  log(f'[data] {source.name}: {path} (sha256 {sha}' + (
      ', unverified: pin it' if not (source.sha256 or source.git_blob) else ', verified') + ')')
  if source.unpack == 'tar':
    with tarfile.open(path) as t:   # the 'data' filter refuses paths outside `directory`
      t.extractall(directory, **({'filter': 'data'} if hasattr(tarfile, 'data_filter') else {}))
  elif source.unpack == 'zip':
    with zipfile.ZipFile(path) as z:
      z.extractall(directory)
  return path


def listing() -> str:
  lines = ['| name | suite (--data key) | file | digest | source | note |', '|---|---|---|---|---|---|']
  for s in SOURCES:
    lines.append(f'| {s.name} | {s.suite} | {s.file} | {s.digest} | {s.url} | {s.note} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python -m jaxlm.evaluate.data',
                              description=__doc__.split('\n')[0])
  p.add_argument('--list', action='store_true', help='print every source and exit')
  sub = p.add_subparsers(dest='command')
  f = sub.add_parser('fetch', help='download and verify one source')
  f.add_argument('name', help=f'one of {list(BY_NAME)}')
  f.add_argument('--dir', required=True, help='directory to save it in')
  f.add_argument('--url', default=None, help='download from this URL instead (a mirror)')
  f.add_argument('--unverified', action='store_true',
                 help='allow a source without a known digest (prints its sha256)')
  a = p.parse_args(argv)
  if a.list or a.command is None:
    print(listing())
    return 0
  if a.name not in BY_NAME:
    p.error(f'unknown source {a.name!r}; the sources are {list(BY_NAME)}')
  try:
    path = fetch(BY_NAME[a.name], a.dir, url=a.url, unverified=a.unverified)
  except FetchError as e:
    print(f'data error: {e}', file=sys.stderr)
    return 1
  print(f'--data={BY_NAME[a.name].suite}={path}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
