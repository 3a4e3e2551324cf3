"""The Grain pipeline: features, masks, packing, per-host slicing, bit-exact resume."""
import gc
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from flax import nnx

from jaxlm.data import TaskConfigError
from jaxlm.data.pipeline import DataConfig, make_dataset, to_features
from jaxlm.data.kv import PREFIX
from jaxlm.data.tasks import make_task
from jaxlm.model import get_config, init_model
from jaxlm.tokenizer import Tokenizer

SMALL = {'num_dicts': None, 'num_tokens': 160, 'keys_per_dict': (2, 3)}


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


def config(**kw):
  base = dict(task='simple_kv', task_fields=SMALL, seq_len=256, global_batch_size=2,
              num_examples=40, num_epochs=2, seed=3)
  return DataConfig(**{**base, **kw})


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize('packing', [False, True])
def test_loss_mask_covers_exactly_the_answers(tok, packing):
  task = make_task('simple_kv', tok, **SMALL)
  answers = {task.example(3, i).answer for i in range(40)}
  for batch in take(iter(make_dataset(config(packing=packing), tok)), 4):
    for row in range(2):
      seg, mask = batch['segment_ids'][row], batch['loss_mask'][row]
      assert mask[seg == 0].sum() == 0
      for s in set(seg[seg > 0].tolist()):
        sel = seg == s
        targets = batch['targets'][row][sel & (mask == 1)]
        assert targets[-1] == tok.eos_id
        assert tok.decode(targets) in answers
        # the masked targets are a contiguous tail of the example: the answer only
        assert (np.diff(np.flatnonzero(mask[sel])) == 1).all() and mask[sel][-1] == 1
        np.testing.assert_array_equal(batch['positions'][row][sel], np.arange(sel.sum()))
        np.testing.assert_array_equal(batch['inputs'][row][sel][1:], batch['targets'][row][sel][:-1])


def test_packing_keeps_examples_apart_in_the_model(tok):
  """A packed row gives each example the logits it gets alone: attention does not
  cross segment boundaries."""
  batch = next(iter(make_dataset(config(packing=True, num_packing_bins=1, seq_len=600), tok)))
  row = 0
  seg = batch['segment_ids'][row]
  assert seg.max() >= 2
  model = init_model(get_config('tiny', sliding_window=None))
  forward = nnx.jit(lambda m, t, p, s: m(t, p, segment_ids_BxT=s))
  tokens = jnp.asarray(batch['inputs'][row] % 512)   # ids folded into the tiny vocabulary
  packed = forward(model, tokens[None], jnp.asarray(batch['positions'][row:row + 1]),
                   jnp.asarray(seg[None]))
  for s in range(1, seg.max() + 1):
    sel = seg == s
    alone = model(tokens[sel][None])
    np.testing.assert_allclose(packed[0][sel], alone[0], atol=1e-5)


@pytest.mark.parametrize('kw', [dict(), dict(packing=True), dict(num_threads=2),
                                dict(num_examples=None), dict(num_workers=2)],
                         ids=['pad', 'pack', 'threads', 'endless', 'processes'])
def test_resume_is_bit_exact(tok, kw):
  if kw.get('num_workers'):
    flags.FLAGS.mark_as_parsed()
  cfg = config(**kw)
  it = iter(make_dataset(cfg, tok))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  del it
  resumed = iter(make_dataset(cfg, tok))
  resumed.set_state(state)
  assert_same(take(resumed, 4), expected)
  del resumed
  gc.collect()


def test_rebuilt_pipeline_is_deterministic_and_epochs_reshuffle(tok):
  a = take(iter(make_dataset(config(), tok)), 40)
  assert_same(a, take(iter(make_dataset(config(), tok)), 40))
  first = {tuple(b['inputs'][r]) for b in a[:20] for r in range(2)}
  second = {tuple(b['inputs'][r]) for b in a[20:] for r in range(2)}
  assert first == second and len(first) == 40       # epoch 2 = the same 40 examples...
  assert [tuple(b['inputs'][0]) for b in a[:20]] != [tuple(b['inputs'][0]) for b in a[20:]]  # ...reordered


def test_num_threads_0_generates_in_the_calling_thread(tok):
  # Grain's default (read options None) is 16 threads and a 500-example buffer.
  before = threading.active_count()
  it = iter(make_dataset(config(num_threads=0), tok))
  take(it, 3)
  assert threading.active_count() == before


@pytest.mark.parametrize('packing', [False, True])
def test_global_batches_do_not_depend_on_the_process_count(tok, packing):
  # Packing and skipped long examples included: each process takes its block of rows of
  # the same global batch, and its iterator state resumes the stream under any count.
  task = make_task('simple_kv', tok, **SMALL)
  cut = sorted(len(to_features(task.example(3, i), tok, 'mistral')['inputs'])
               for i in range(40))[30]
  cfg = config(global_batch_size=4, num_epochs=4, packing=packing, on_long='skip',
               seq_len=2 * cut if packing else cut)

  def global_batches(count, steps=4, state=None):
    its = [iter(make_dataset(cfg, tok, process_index=p, process_count=count))
           for p in range(count)]
    for it in its:
      if state is not None:
        it.set_state(state)
    out = [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
           for parts in (tuple(next(it) for it in its) for _ in range(steps))]
    return out, its[0].get_state()

  one, state = global_batches(1)
  for count in (2, 4):
    many, many_state = global_batches(count)
    assert_same(one, many)
    assert many_state == state
  if packing:
    assert (one[0]['segment_ids'].max(axis=1) > 1).any()   # rows hold several examples
  # resumed under another process count: the same next batches
  assert_same(global_batches(1, 6)[0][4:], global_batches(2, 2, state)[0])


def test_errors(tok):
  with pytest.raises(TaskConfigError, match='an example has .* tokens but seq_len=64'):
    next(iter(make_dataset(config(seq_len=64), tok)))
  task = make_task('simple_kv', tok, **SMALL)
  lengths = sorted(len(to_features(task.example(3, i), tok, 'mistral')['inputs']) for i in range(40))
  cut = lengths[20]
  kept = [b for b in make_dataset(config(seq_len=cut, on_long='skip', num_epochs=1), tok)]
  assert len(kept) == sum(n <= cut for n in lengths) // 2 and kept[0]['inputs'].shape == (2, cut)
  with pytest.raises(TaskConfigError, match='global_batch_size=3 is not divisible by process_count=2'):
    make_dataset(config(global_batch_size=3), tok, process_count=2)
  with pytest.raises(TaskConfigError, match="chat_format='chatml'"):
    make_dataset(config(chat_format='chatml'), tok)
  with pytest.raises(TaskConfigError, match=r"unknown field\(s\) \['seqlen'\] for DataConfig"):
    DataConfig.from_dict({'seqlen': 5})


def _features_digest(tok, chat_format, fields):
  import hashlib
  from jaxlm.data.pipeline import prompt_ids
  task = make_task('demo_kv', tok, **fields)   # extra turns: jaxlm/demo/kv.py
  h = hashlib.sha256()
  for i in range(20):
    ex = task.example(7, i)
    f = task.to_features(ex, tok, chat_format)
    for k in ('inputs', 'targets', 'loss_mask'):
      h.update(np.asarray(f[k], np.int32).tobytes())
    h.update(np.asarray(prompt_ids(ex, tok, chat_format), np.int32).tobytes())
  return h.hexdigest()[:16]


def test_mistral_and_none_features_keep_their_token_ids(tok):
  """Digests of the features (with extra turns) that pipeline.py produced before chat
  formats became data (commit 265a386): 'none' and 'mistral' are unchanged."""
  from jaxlm.tokenizer import REPO_ROOT
  pairs = Tokenizer(f'{REPO_ROOT}/data/tokenizers/kv-tiny-pairs.model')
  fields = dict(num_dicts=4, keys_per_dict=(2, 2), gold_dict_size=2, key_digits=(1, 1),
                value_digits=(1, 1), unique_keys='all', extra_unique_values=True,
                answer_template=True, extra_queries=3)
  assert _features_digest(pairs, 'none', fields) == 'a1a08d9d3718f119'
  assert _features_digest(pairs, 'mistral', fields) == 'bd767219bb988801'
  assert _features_digest(tok, 'mistral', {**fields, 'key_digits': (2, 3),
                                           'extra_question': 'short'}) == 'efe5da69806d5efe'
  assert _features_digest(tok, 'none', fields) == 'd49c3fad7ac74268'


def test_auto_chat_format_follows_the_checkpoint(tok):
  from jaxlm import embedded
  from jaxlm.tokenizer import load_tokenizer
  try:
    smol = load_tokenizer('embedded:smollm2-135m-instruct')
  except embedded.EmbeddedModelError as e:
    pytest.skip(f'the embedded SmolLM2 GGUF is not installed: {e}')
  fields = {'num_dicts': 3, 'keys_per_dict': (2, 3), 'extra_queries': 1}
  cfg = config(task='demo_kv', chat_format='auto', task_fields=fields, seq_len=320)
  assert DataConfig().chat_format == 'mistral'
  task = make_task('demo_kv', smol, **cfg.task_fields)
  answers = {a for i in range(40) for a in [task.example(3, i).answer]
             + [r for _, r in task.example(3, i).turns]}
  batch = next(iter(make_dataset(cfg, smol)))
  for row in range(2):
    targets, mask, inputs = batch['targets'][row], batch['loss_mask'][row], batch['inputs'][row]
    assert smol.decode(inputs[:3], skip_special=False).startswith('<|im_start|>system\n')
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    assert len(edges) == 4   # the answer and one extra turn's
    for start, stop in zip(edges[::2], edges[1::2]):
      text = smol.decode(targets[start:stop], skip_special=False)
      assert text.endswith('<|im_end|>') and text[:-len('<|im_end|>')] in answers
  # 'auto' on the Mistral tokenizer (no chat template) is Mistral's format
  auto = next(iter(make_dataset(config(chat_format='auto'), tok)))
  np.testing.assert_array_equal(auto['inputs'], next(iter(make_dataset(config(), tok)))['inputs'])


class Counting:
  """A tokenizer that records every text it encodes."""

  def __init__(self, inner):
    self.inner, self.texts = inner, []

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def encode(self, text, **kw):
    self.texts.append(text)
    return self.inner.encode(text, **kw)


def test_each_prompt_is_tokenized_once_without_a_budget(tok):
  counting = Counting(tok)
  cfg = config(task_fields={'num_dicts': 4, 'keys_per_dict': (2, 3)}, global_batch_size=2)
  it = iter(make_dataset(cfg, counting))
  take(it, 3)
  prompts = [t for t in counting.texts if 'Do a task' in t]   # (answers name dictionaries)
  assert len(prompts) == 6 == len(set(prompts))


def test_each_prompt_is_tokenized_once_under_a_budget(tok):
  """Under a token budget the task counts each prompt; the features reuse those tokens.
  Every candidate prompt text is encoded once; the whole chat-formatted turn is encoded once
  in all (the check that splicing reproduces it)."""
  counting = Counting(tok)
  cfg = config(task_fields={'num_tokens': 300, 'num_dicts': None}, seq_len=512)
  it = iter(make_dataset(cfg, counting))
  start = len(counting.texts)   # after the task's start-up budget checks
  batches = take(it, 3)
  texts = counting.texts[start:]
  prompts = [t for t in texts if t.startswith(PREFIX)]
  formatted = [t for t in texts if t.startswith('[INST] ' + PREFIX)]
  assert len(prompts) >= 6 and len(prompts) == len(set(prompts))
  assert len(formatted) == 1
  assert all(b['inputs'].shape == (2, 512) for b in batches)
  # (that the spliced tokens are the whole turn's: tests/test_chat.py)
