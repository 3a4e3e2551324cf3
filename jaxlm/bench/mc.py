"""Multiple-choice log-likelihood with and without sharing the context (issue 19).

MMLU and HellaSwag score every choice of a question after the same context. `Runner.loglik`
prefills each context once and runs the choices against a copy of its KV cache;
`share_context=False` runs each (context, choice) pair as its own sequence (the reference).
This times both on the same pairs, one after the other in one process, and prints the
speed-up and the largest difference between their scores.

  python -m jaxlm.bench.mc --hf=embedded:smollm2-135m-instruct --shape=mmlu
  python -m jaxlm.bench.mc --hf=embedded:smollm2-135m-instruct --shape=hellaswag
  python -m jaxlm.bench.mc --preset=tiny --questions=4          # seconds, in the tests

Shapes (text of random words in the tokenizer's language, sized like the benchmark):
mmlu: 5-shot contexts of ~600 tokens, 4 one-token choices (" A".." D");
hellaswag: ~100-token contexts, 4 endings of ~25 tokens.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

SHAPES = {'mmlu': dict(context_words=450, choice_words=0, choices=4),
          'hellaswag': dict(context_words=75, choice_words=18, choices=4)}
WORDS = ('the river stone seven blue alpha garden city north answer question light water '
         'number table winter summer forest music paper market window').split()


def make_pairs(questions: int, context_words: int, choice_words: int, choices: int,
               seed: int = 0) -> list[tuple[str, str]]:
  rs = np.random.RandomState(seed)
  pairs = []
  for _ in range(questions):
    context = ' '.join(rs.choice(WORDS, context_words)) + '\nAnswer:'
    for c in range(choices):
      choice = ' ' + ('ABCD'[c % 4] if not choice_words else ' '.join(rs.choice(WORDS, choice_words)))
      pairs.append((context, choice))
  return pairs


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--hf', default=None, help='checkpoint (HF dir, GGUF, embedded:NAME)')
  p.add_argument('--preset', default='small', help='a jaxlm preset (random weights) without --hf')
  p.add_argument('--shape', default='mmlu', choices=sorted(SHAPES))
  p.add_argument('--questions', type=int, default=16)
  p.add_argument('--batch', type=int, default=8, help='Runner batch size')
  p.add_argument('--repeats', type=int, default=2, help='timed runs of each path (median)')
  a = p.parse_args(argv)
  import jax
  from jaxlm.evaluate.runner import Runner
  from jaxlm.tokenizer import Tokenizer, load_tokenizer
  if a.hf:
    from jaxlm import convert
    cfg, model = convert.load_checkpoint(a.hf)
    tokenizer = load_tokenizer(a.hf)
  else:
    from jaxlm.model import get_config, init_model
    tokenizer = Tokenizer()
    cfg = get_config(a.preset, vocab_size=tokenizer.vocab_size)
    model = init_model(cfg)
  runner = Runner(model, tokenizer, chat_format='plain', batch_size=a.batch, verbose=False)
  pairs = make_pairs(a.questions, **SHAPES[a.shape])
  ctx, cont = runner.split_pair(*pairs[0])
  print(f'machine: {platform.machine()}, jax {jax.__version__} on {jax.devices()[0].platform}; '
        f'model: {a.hf or a.preset} ({cfg.num_params() / 1e6:.1f}M params)')
  print(f'shape {a.shape}: {a.questions} questions x {SHAPES[a.shape]["choices"]} choices, '
        f'context {len(ctx)} tokens, choice {len(cont)} tokens, batch {a.batch}')
  times, scores = {}, {}
  for shared in (True, False):
    runner.loglik(pairs, share_context=shared)   # compile
    ts = []
    for _ in range(a.repeats):
      t0 = time.perf_counter()
      scores[shared] = runner.loglik(pairs, share_context=shared)
      ts.append(time.perf_counter() - t0)
    times[shared] = statistics.median(ts)
  diff = max(abs(x[0] - y[0]) for x, y in zip(scores[True], scores[False]))
  print('| path | median time (s) | pairs/s |')
  print('|---|---|---|')
  for shared, name in ((True, 'shared context (one prefill per question)'),
                       (False, 'one sequence per (context, choice)')):
    print(f'| {name} | {times[shared]:.3f} | {len(pairs) / times[shared]:.1f} |')
  print(f'speed-up {times[False] / times[True]:.2f}x; largest |loglik difference| {diff:.2e}')
  return {'shared_s': times[True], 'separate_s': times[False], 'max_abs_diff': diff}


if __name__ == '__main__':
  main()
