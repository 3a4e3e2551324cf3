"""Start-up cost of a run on a GGUF checkpoint, part by part (medians of --repeats):

  header     the metadata and tensor table: the gguf package's GGUFReader (every field's
             contents) beside jaxlm.gguf.read_header, which the loader and tokenizer use
  tokenizer  jaxlm's byte-level BPE tokenizer built from the file's vocabulary and merges
  weights    jaxlm.convert.load_gguf: every tensor dequantized to float32 and placed

  python -m jaxlm.bench.load                      # the embedded SmolLM2-135M-Instruct
  python -m jaxlm.bench.load --gguf=model.gguf --repeats=5
"""

from __future__ import annotations

import argparse
import statistics
import time


def _median_seconds(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None) -> list[tuple[str, float]]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--gguf', default='embedded:smollm2-135m-instruct',
                 help='a GGUF file, or an embedded model id')
  p.add_argument('--repeats', type=int, default=3)
  a = p.parse_args(argv)
  import gguf
  import jax

  from jaxlm import convert, embedded
  from jaxlm import gguf as jaxlm_gguf
  from jaxlm.tokenizer import BPETokenizer
  path = embedded.resolve(a.gguf)
  rows = [
      ('header: gguf.GGUFReader (reference)',
       lambda: {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()}),
      ('header: jaxlm.gguf.read_header', lambda: jaxlm_gguf.read_header(path)),
      ('tokenizer: BPETokenizer from the file', lambda: BPETokenizer._read_gguf(path)),
      ('weights: convert.load_gguf (float32)',
       lambda: jax.block_until_ready(convert.load_gguf(path)[1])),
  ]
  out = [(name, _median_seconds(fn, a.repeats)) for name, fn in rows]
  print(f'{path} (median of {a.repeats})\n')
  print('| part | seconds |\n|---|---|')
  for name, s in out:
    print(f'| {name} | {s:.3f} |')
  print(f'\nheader: read_header is {out[0][1] / out[1][1]:.0f}x faster than GGUFReader')
  return out


if __name__ == '__main__':
  main()
