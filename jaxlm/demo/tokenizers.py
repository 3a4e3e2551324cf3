"""Build the small sentencepiece models of the CPU demo (data/tokenizers/kv-tiny*.model).

With the Mistral tokenizer a 2-digit key is two tokens and the embedding table holds
32000 rows; a model this small then spends its few CPU minutes on the vocabulary and
on matching digit pairs. Here every number 0..99 is one token (user-defined pieces)
and the vocabulary has 380 pieces (256 of them byte fallbacks), so retrieval is a single
induction step: find the key's token, copy the token after it. The task's fixed sentences
(the instruction, the question, the answer template, the separators with their spaces)
are single pieces too, which cuts an example with 4 dictionaries from about 195 tokens to
about 75, so each training step supervises 2.5 times as many answers. bos=1, eos=2, unk=0 as in Mistral's models. Trained on generated simple_kv text (seed 123, disjoint from the
demo's training and evaluation seeds).

  python -m jaxlm.demo.tokenizers --out=data/tokenizers/kv-tiny.model

`--variant=merged` (data/tokenizers/kv-tiny-merged.model) also makes every lookup the
answer needs start from the *current* token, the layout a small
model learns in a few hundred steps (BENCHMARKS.md, "What stalls key matching"): a key and its
separator are one piece in the dictionaries (`12: `), the key and ` is ` one piece in the
answer (`12 is `, so the value is predicted from a token naming the key), the value and
` and it is in Dictionary [` one piece (the index is predicted from a token naming the
value), and each header `Dictionary [D] {` (D <= 16) one piece. Without the dummy-prefix
space, a turn's text starts with its first piece. `--variant=pairs`
(data/tokenizers/kv-tiny-pairs.model, the one configs/tiny_kv.py uses) adds a piece per
pair of 1-digit numbers (see PAIRS below).
"""

from __future__ import annotations

import argparse
import io

import sentencepiece as spm

from jaxlm.data import make_task

VOCAB_SIZE = 400   # an upper bound (hard_vocab_limit=False): the corpus is tiny
# The fixed text of simple_kv prompts and answers (jaxlm/data/kv.py), one piece each;
# '▁' is sentencepiece's space.
PHRASES = [p.replace(' ', '\u2581') for p in (
    'Do a task using the list of dictionaries below.',
    'Above is a list of dictionaries such that each key and value is an integer.',
    ' Report the value of key ', ' and the dictionary it is in.',
    ' Answer in the following template:', 'The value of key ', ' is ', '<fill-in-value>',
    ' and it is in Dictionary [', '<fill-in-dictionary-name>].', 'Dictionary [', '] {', ': ', ', ')]


# Extra pieces of the merged variant ('▁' for spaces as above).
MERGED = [p.replace(' ', '\u2581') for p in (
    [f'{n}: ' for n in range(100)] + [f'{n} is ' for n in range(100)]
    + [f'{n} and it is in Dictionary [' for n in range(100)]
    + [f'Dictionary [{d}] {{' for d in range(1, 17)]
    + ['}\n', '}\n\n', 'Report the value of key ', '].'])]
# ... and of the pairs variant: a whole pair of 1-digit numbers with what follows it is one
# piece (`3: 7, `, `3: 7}\n`), so finding the value is a single attention hop from the answer's
# `3 is ` to the pair, with no previous-token head; 2-digit numbers are left as in 'merged'
# (`3: 12, ` matches no pair piece).
PAIRS = [p.replace(' ', '\u2581') for k in range(10) for v in range(10)
         for p in (f'{k}: {v}, ', f'{k}: {v}}}\n')]
VARIANTS = {'plain': 'data/tokenizers/kv-tiny.model',
            'merged': 'data/tokenizers/kv-tiny-merged.model',
            'pairs': 'data/tokenizers/kv-tiny-pairs.model'}


def texts(num_examples: int = 3000):
  for fields in ({'answer_template': True}, {'answer_template': False}):
    task = make_task('simple_kv', None, num_dicts=4, keys_per_dict=(2, 3), gold_dict_size=2,
                     key_digits=(1, 2), value_digits=(1, 2), **fields)
    for i in range(num_examples // 2):
      ex = task.example(123, i)
      yield ex.prompt
      yield ex.answer


def build(path: str, variant: str = 'plain') -> None:
  if variant not in VARIANTS:
    raise ValueError(f'variant={variant!r} must be one of {sorted(VARIANTS)}')
  merged = variant != 'plain'
  extra = {'plain': [], 'merged': MERGED, 'pairs': MERGED + PAIRS}[variant]
  symbols = [str(i) for i in range(100)] + PHRASES + extra
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=texts(), model_writer=model, vocab_size=VOCAB_SIZE + len(extra), model_type='bpe',
      user_defined_symbols=symbols, split_digits=False,
      hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
      normalization_rule_name='identity', remove_extra_whitespaces=False, num_threads=1,
      max_sentence_length=100000, minloglevel=2,
      **({'add_dummy_prefix': False} if merged else {}))   # set only here: keeps 'plain' as shipped
  with open(path, 'wb') as f:
    f.write(model.getvalue())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--variant', default='plain', choices=sorted(VARIANTS))
  parser.add_argument('--out', default=None, help='default: data/tokenizers/ per variant')
  args = parser.parse_args(argv)
  build(args.out or VARIANTS[args.variant], args.variant)


if __name__ == '__main__':
  main()
