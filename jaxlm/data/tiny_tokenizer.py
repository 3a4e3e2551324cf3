"""Build the small sentencepiece model of the CPU demo (data/tokenizers/kv-tiny.model).

With the Mistral tokenizer a 2-digit key is two tokens and the embedding table holds
32000 rows; a model this small then spends its few CPU minutes on the vocabulary and
on matching digit pairs. Here every number 0..99 is one token (user-defined pieces)
and the vocabulary has 380 pieces (256 of them byte fallbacks), so retrieval is a single
induction step: find the key's token, copy the token after it. The task's fixed sentences
(the instruction, the question, the answer template, the separators with their spaces)
are single pieces too, which cuts an example with 4 dictionaries from about 195 tokens to
about 75, so each training step supervises 2.5 times as many answers. bos=1, eos=2, unk=0 as in Mistral's models. Trained on generated simple_kv text (seed 123, disjoint from the
demo's training and evaluation seeds).

  python -m jaxlm.data.tiny_tokenizer --out=data/tokenizers/kv-tiny.model
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


def texts(num_examples: int = 3000):
  for fields in ({'answer_template': True}, {'answer_template': False}):
    task = make_task('simple_kv', None, num_dicts=4, keys_per_dict=(2, 3), gold_dict_size=2,
                     key_digits=(1, 2), value_digits=(1, 2), **fields)
    for i in range(num_examples // 2):
      ex = task.example(123, i)
      yield ex.prompt
      yield ex.answer


def build(path: str) -> None:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=texts(), model_writer=model, vocab_size=VOCAB_SIZE, model_type='bpe',
      user_defined_symbols=[str(i) for i in range(100)] + PHRASES, split_digits=False,
      hard_vocab_limit=False, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
      normalization_rule_name='identity', remove_extra_whitespaces=False, num_threads=1,
      max_sentence_length=100000, minloglevel=2)
  with open(path, 'wb') as f:
    f.write(model.getvalue())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='data/tokenizers/kv-tiny.model')
  build(parser.parse_args(argv).out)


if __name__ == '__main__':
  main()
