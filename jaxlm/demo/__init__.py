"""The from-scratch CPU demo (configs/tiny_kv.py): a 0.2M-parameter Mistral learns the
paper's simple_kv task from nothing in minutes on 2 cores. Everything only that demo needs
lives here, outside the path a pretrained-model run takes:

  kv.py          task 'demo_kv': simple_kv plus extra question turns per prompt and a
                 num_dicts curriculum (training density for a model that starts from zero)
  tokenizers.py  the demo's sentencepiece model (data/tokenizers/kv-tiny-pairs.model) and
                 its builder: numbers and the task's fixed sentences as single pieces
  embed_init.py  init_hook: merged pieces start from the sum of their parts' embeddings
  recall.py      the associative-recall bench that isolated what the demo has to learn

BENCHMARKS.md ("The CPU demo") has the runs behind each choice.
"""
