"""Evaluate a model on one or more suites; write results.json, predictions and plots.

  python -m jaxlm.evaluate --hf=DIR --suite=mdqa --suite=general --out=evals/base
  python -m jaxlm.evaluate --config=configs/tiny_kv.py --checkpoint=runs/local \\
      --suite=kv --out=evals/tiny
  python -m jaxlm.evaluate --checkpoint=runs/local --suite=kv --out=evals/tiny   # config from
                                                                                # the run
Suites: kv, mdqa, flenqa, general (mmlu, hellaswag, gsm8k, triviaqa, nq_open), litm_kv.
`--data=FILE` replaces the default data file of the only suite given; `--data=NAME=FILE`
names the suite or general benchmark (repeatable). The model is placed on the configured
mesh (`--config.mesh.*`, or `--mesh=fsdp:-1` with --hf); generation is greedy with the KV
cache, batched by prompt length.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.chat import NAMES as CHAT_FORMATS
from jaxlm.evaluate.common import DataError, Options
from jaxlm.evaluate.harness import format_scores, run_suites

_CONFIG = config_flags.DEFINE_config_file('config', None, 'training config file', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'training run directory (or its checkpoints/)')
_STEP = flags.DEFINE_integer('step', None, 'checkpoint step (default: the newest)')
_HF = flags.DEFINE_string('hf', None, 'Hugging Face checkpoint directory, GGUF file or '
                          'embedded:NAME (e.g. embedded:smollm2-135m-instruct)')
_SUITE = flags.DEFINE_multi_enum('suite', None, ['kv', 'mdqa', 'flenqa', 'general', 'litm_kv'],
                                 'suite(s) to run')
_OUT = flags.DEFINE_string('out', None, 'output directory')
_DATA = flags.DEFINE_multi_string('data', [], 'FILE, or NAME=FILE (suite or general benchmark)')
_POSITIONS = flags.DEFINE_list('positions', None, 'gold positions (1-based), e.g. 1,5,10')
_NUM_DOCS = flags.DEFINE_list('num_docs', ['10', '20', '30'], 'mdqa haystack sizes')
_MDQA = flags.DEFINE_list('mdqa_variants', ['haystack', 'oracle', 'closedbook'], 'mdqa variants')
_BENCH = flags.DEFINE_list('benchmarks', ['mmlu', 'hellaswag', 'gsm8k', 'triviaqa', 'nq_open'],
                           'general benchmarks to run')
_KV_LENGTHS = flags.DEFINE_list('kv_lengths', None, 'kv: numbers of dictionaries (default: the '
                                "config's eval size, else 4,8,16)")
_COT = flags.DEFINE_enum('cot', 'both', ['both', 'yes', 'no'], 'flenqa chain-of-thought prompts')
_N = flags.DEFINE_integer('num_examples', None, 'examples per setting (default: all; kv: 50)')
_SHOTS = flags.DEFINE_integer('shots', None, "few-shot examples (default: each benchmark's)")
flags.DEFINE_alias('num_fewshot', 'shots')   # lm-evaluation-harness's name
_CHAT_TEMPLATE = flags.DEFINE_boolean(
    'chat_template', False, 'general benchmarks: wrap each prompt in the chat format (default: '
    "the raw prompt without bos, as lm-evaluation-harness does unless asked)")
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', None, "override each suite's generation length")
_BATCH = flags.DEFINE_integer('batch_size', 8, 'sequences per model call')
_CHAT = flags.DEFINE_enum('chat_format', None, list(CHAT_FORMATS),
                          "prompt format (jaxlm.chat): mistral | chatml | llama3 | none | auto "
                          "(the tokenizer's chat template); default: the config's, else mistral")
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'sentencepiece model (overrides the default)')
_DTYPE = flags.DEFINE_string('dtype', None, 'compute dtype with --hf (float32, bfloat16)')
_MESH = flags.DEFINE_string('mesh', 'fsdp:-1', 'mesh with --hf, e.g. data:2,fsdp:-1')
_ATTENTION = flags.DEFINE_string('attention', 'auto', 'attention_impl with --hf (auto: blockwise '
                                 'for long prompts on CPU, cuDNN / splash where they apply)')
_SEED = flags.DEFINE_integer('seed', 0, 'seed for built haystacks and held-out kv examples')
_NAME = flags.DEFINE_string('name', None, 'run name in results and comparisons (default: --out)')


def parse_data(items: list[str], suites: list[str]) -> dict[str, str]:
  out = {}
  for item in items:
    name, sep, path = item.partition('=')
    if not sep:
      if len(suites) != 1:
        raise app.UsageError(f'--data={item} without NAME= needs exactly one --suite '
                             f'(got {suites}); write --data=SUITE=FILE')
      name, path = suites[0], item
    out[name] = path
  return out


def load_model(mesh_spec: str):
  """(model, tokenizer, chat_format, source description, mesh)."""
  from jaxlm import sharding as shd
  from jaxlm.tokenizer import MISTRAL_V1, load_tokenizer
  if _HF.value and _CHECKPOINT.value:
    raise app.UsageError('give --hf or --checkpoint, not both')
  if _HF.value:
    from jaxlm import convert
    sizes = {k: 1 for k in shd.MESH_AXES}
    for part in mesh_spec.split(','):
      k, _, v = part.partition(':')
      if k not in sizes:
        raise app.UsageError(f'--mesh: unknown axis {k!r}; axes are {shd.MESH_AXES}')
      sizes[k] = int(v)
    mesh = shd.make_mesh(sizes)
    kwargs = {'dtype': _DTYPE.value} if _DTYPE.value else {}
    kwargs['attention_impl'] = _ATTENTION.value
    cfg, model = convert.load_checkpoint(_HF.value, mesh=mesh, **kwargs)
    path = convert.checkpoint_path(_HF.value)
    own = path.endswith('.gguf') or any(os.path.exists(os.path.join(path, f)) for f in (
        'tokenizer.json', 'tokenizer.model'))
    tok_path = _TOKENIZER.value or (_HF.value if own else MISTRAL_V1)
    chat = _CHAT.value or 'auto'
    source = {'hf': _HF.value if _HF.value.startswith('embedded:') else os.path.abspath(path)}
  elif _CHECKPOINT.value:
    from jaxlm import checkpoint, config as config_lib
    c = _CONFIG.value
    if c is None:
      path = os.path.join(_CHECKPOINT.value, 'config.json')
      if not os.path.exists(path):
        raise app.UsageError(f'--checkpoint={_CHECKPOINT.value} has no config.json; pass --config')
      import ml_collections
      with open(path) as f:
        c = ml_collections.ConfigDict(json.load(f))
    mesh, _ = config_lib.run_mesh(c, config_lib.model_config(c))
    cfg, model, step = checkpoint.restore_model(c, _CHECKPOINT.value, mesh, _STEP.value)
    tok_path = _TOKENIZER.value or c.tokenizer or c.init_from
    chat = _CHAT.value or c.data.chat_format
    source = {'checkpoint': os.path.abspath(_CHECKPOINT.value), 'step': step}
  else:
    raise app.UsageError('give --hf=DIR or --checkpoint=DIR')
  tokenizer = load_tokenizer(tok_path)
  tokenizer.check_model(cfg)
  source.update(tokenizer=tok_path if tok_path.startswith('embedded:') else
                os.path.abspath(tok_path), chat_format=chat,
                params=cfg.num_params(), dtype=cfg.dtype)
  return model, tokenizer, chat, source, mesh


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  if not _SUITE.value:
    raise app.UsageError('give at least one --suite')
  if not _OUT.value:
    raise app.UsageError('--out=DIR is required')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  from jaxlm.evaluate.runner import Runner
  model, tokenizer, chat, source, mesh = load_model(_MESH.value)
  c = _CONFIG.value
  kv_fields, kv_task, kv_lengths = {}, 'simple_kv', [4, 8, 16]
  if _CHECKPOINT.value:
    import ml_collections
    if c is None:
      with open(os.path.join(_CHECKPOINT.value, 'config.json')) as f:
        c = ml_collections.ConfigDict(json.load(f))
    from jaxlm.data.tasks import eval_task
    kv_task, kv_fields = eval_task(c)
    n = kv_fields.pop('num_dicts', None)
    kv_lengths = [n] if isinstance(n, int) else kv_lengths
  if _KV_LENGTHS.value:
    kv_lengths = [int(x) for x in _KV_LENGTHS.value]
  kv_fields.pop('num_dicts', None)
  kv_fields.pop('gold_position', None)
  opts = Options(data=parse_data(_DATA.value, _SUITE.value),
                 positions=[int(p) for p in _POSITIONS.value] if _POSITIONS.value else None,
                 num_examples=_N.value, num_docs=[int(x) for x in _NUM_DOCS.value],
                 kv_lengths=kv_lengths, kv_task=kv_task, kv_fields=kv_fields,
                 cot={'both': [False, True], 'yes': [True], 'no': [False]}[_COT.value],
                 shots=_SHOTS.value, max_new_tokens=_MAX_NEW.value, seed=_SEED.value,
                 chat_template=_CHAT_TEMPLATE.value)
  settings = {'suites': _SUITE.value, 'positions': opts.positions, 'num_examples': _N.value,
              'num_docs': opts.num_docs, 'kv_lengths': kv_lengths, 'kv_task': kv_task,
              'cot': _COT.value, 'shots': _SHOTS.value, 'max_new_tokens': _MAX_NEW.value,
              'chat_template': _CHAT_TEMPLATE.value,
              'batch_size': _BATCH.value, 'seed': _SEED.value, 'data': opts.data,
              'mesh': dict(mesh.shape), 'device_kind': jax.devices()[0].device_kind}
  name = _NAME.value or os.path.basename(os.path.normpath(_OUT.value))
  runner = Runner(model, tokenizer, chat_format=chat, batch_size=_BATCH.value)
  source['chat_format'] = runner.chat_format   # 'auto' resolved
  try:
    with jax.set_mesh(mesh):
      results = run_suites(runner, list(dict.fromkeys(_SUITE.value)), opts, _OUT.value, name,
                           source, settings, mdqa_variants=_MDQA.value, benchmarks=_BENCH.value)
  except DataError as e:
    sys.exit(f'data error: {e}')
  except ValueError as e:   # settings that do not fit the data or the model
    sys.exit(f'error: {e}')
  print(format_scores(results['scores']))
  for note in results['notes']:
    print(f'note: {note}')
  print(f'[eval] wrote {_OUT.value}/results.json, predictions_*.jsonl and plots')


if __name__ == '__main__':
  app.run(main)
