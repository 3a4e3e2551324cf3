"""Chat formats (jaxlm.chat): rendered prompts against transformers' apply_chat_template,
the answer-only loss mask under every format, detection from the checkpoint, the Runner."""
import types

import numpy as np
import pytest


from jaxlm import chat
from jaxlm.chat import ChatFormatError, detect_chat_format, render_prompt, resolve
from jaxlm.data import make_task
from jaxlm.data.features import conversation_features
from jaxlm.data.pipeline import format_prompt, prompt_ids
from jaxlm.tokenizer import Tokenizer, load_tokenizer

SMOLLM2 = 'embedded:smollm2-135m-instruct'
# Meta Llama 3 Instruct's chat template (no system block unless a system message is given)
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA3_SPECIALS = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']
PROMPTS = ['What is 12 + 30?', 'Line one\nline two\n\n  indented 7', 'héllo 日本 🤗']


@pytest.fixture(scope='module')
def mistral():
  return Tokenizer()


@pytest.fixture(scope='module')
def llama3(hf_smol, tmp_path_factory):
  """(ours, transformers') of a Llama-3-style tokenizer: SmolLM2's vocabulary plus Llama 3's
  special tokens and chat template, saved as a Hugging Face directory."""
  import transformers
  base = tmp_path_factory.mktemp('smol')
  hf_smol.save_pretrained(str(base))
  hf = transformers.AutoTokenizer.from_pretrained(str(base))
  hf.add_special_tokens({'additional_special_tokens': LLAMA3_SPECIALS})
  hf.bos_token, hf.eos_token = '<|begin_of_text|>', '<|eot_id|>'
  hf.chat_template = LLAMA3_TEMPLATE
  out = tmp_path_factory.mktemp('llama3')
  hf.save_pretrained(str(out))
  return load_tokenizer(str(out)), hf


def _task_examples(tok, n=3, **fields):
  task = make_task('demo_kv', tok, num_dicts=5, answer_template=True, extra_queries=2, **fields)
  return [task.example(5, i) for i in range(n)]


def _turns(ex):
  """An example with extra turns (jaxlm/demo/kv.py) as (question, answer) pairs."""
  return [(ex.prompt, ex.answer), *ex.turns]


def _hf_ids(hf, messages, **kw):
  out = hf.apply_chat_template(messages, tokenize=True, **kw)
  return list(out['input_ids'] if hasattr(out, 'keys') else out)


def test_chatml_prompt_ids_equal_smollm2_chat_template(smol, hf_smol):
  assert detect_chat_format(smol) == 'chatml'
  fmt = resolve('auto', smol)
  rendered = render_prompt(fmt, 'Hi there')
  assert rendered == hf_smol.apply_chat_template([{'role': 'user', 'content': 'Hi there'}],
                                                 add_generation_prompt=True, tokenize=False)
  assert rendered.startswith('<|im_start|>system\nYou are a helpful AI assistant named SmolLM, '
                             'trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi there')
  for p in PROMPTS + [ex.prompt for ex in _task_examples(smol, 2)]:
    user = [{'role': 'user', 'content': p}]
    assert chat.prompt_ids(fmt, smol, p) == _hf_ids(hf_smol, user, add_generation_prompt=True)
  system = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  assert chat.prompt_ids(fmt, smol, 'Hi', system='Be brief.') == _hf_ids(
      hf_smol, system, add_generation_prompt=True)


def test_chatml_training_sequence_is_the_templated_conversation(smol, hf_smol):
  for ex in _task_examples(smol, 2):
    assert ex.turns
    f = conversation_features(_turns(ex), smol, 'chatml')
    tokens = list(f['inputs']) + [int(f['targets'][-1])]
    messages = [{'role': 'user', 'content': ex.prompt}, {'role': 'assistant', 'content': ex.answer}]
    for q, a in ex.turns:
      messages += [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]
    # the template ends with '\n' after the last <|im_end|>: nothing is learned from it
    assert tokens + [smol.token_to_id('Ċ')] == _hf_ids(hf_smol, messages)


def test_llama3_prompt_ids_equal_llama3_chat_template(llama3):
  tok, hf = llama3
  assert detect_chat_format(tok) == 'llama3' and tok.bos_id == tok.token_to_id('<|begin_of_text|>')
  fmt = resolve('auto', tok)
  for p in PROMPTS:
    user = [{'role': 'user', 'content': p.strip()}]   # Llama 3's template trims messages
    assert render_prompt(fmt, p.strip()) == hf.apply_chat_template(
        user, add_generation_prompt=True, tokenize=False)
    assert chat.prompt_ids(fmt, tok, p.strip()) == _hf_ids(hf, user, add_generation_prompt=True)
  system = [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Hi'}]
  assert chat.prompt_ids(fmt, tok, 'Hi', system='Be brief.') == _hf_ids(
      hf, system, add_generation_prompt=True)


def test_mistral_rendering_keeps_the_previous_ids(mistral):
  assert detect_chat_format(mistral) == 'mistral' and format_prompt('q', 'mistral') == '[INST] q [/INST]'
  for ex in _task_examples(mistral, 2):
    ids = prompt_ids(ex, mistral, 'mistral')
    assert ids == mistral.encode(f'[INST] {ex.prompt} [/INST]', bos=True) and ids[0] == 1
    f = conversation_features(_turns(ex), mistral, 'mistral')
    answer = mistral.encode(ex.answer, bos=False, eos=True)
    assert list(f['targets'][len(ids) - 1:len(ids) - 1 + len(answer)]) == answer
  assert prompt_ids(ex, mistral, 'none') == mistral.encode(ex.prompt, bos=True)


@pytest.mark.parametrize('name', ['mistral', 'chatml', 'llama3', 'none'])
def test_loss_mask_covers_each_answer_and_its_end_of_turn_token(name, mistral, smol, llama3):
  tok = {'mistral': mistral, 'chatml': smol, 'llama3': llama3[0], 'none': smol}[name]
  fmt = resolve(name, tok)
  end = fmt.end_of_turn or tok.id_to_piece(tok.eos_id)
  header = fmt.turn.split('{prompt}')[1]   # what the answer follows
  for ex in _task_examples(tok, 2):
    f = conversation_features(_turns(ex), tok, name)
    targets, mask = f['targets'], f['loss_mask']
    assert len(f['inputs']) == len(targets) == len(mask)
    np.testing.assert_array_equal(f['inputs'][1:], targets[:-1])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    runs = list(zip(edges[::2], edges[1::2]))   # [start, stop) of each masked stretch
    answers = [ex.answer] + [a for _, a in ex.turns]
    assert len(runs) == len(answers) == 1 + len(ex.turns) > 1
    for (start, stop), answer in zip(runs, answers):
      assert tok.decode(targets[start:stop], skip_special=False) == answer + end
      assert targets[stop - 1] == chat.end_of_turn_id(fmt, tok)
      before = tok.decode(f['inputs'][:start + 1], skip_special=False)
      assert before.endswith(header.rstrip(' ')), (before[-40:], header)


def test_detection_and_errors(mistral, smol):
  fake = lambda template: types.SimpleNamespace(chat_template=template, path='fake')  # noqa: E731
  assert detect_chat_format(fake("{{ bos_token }}[INST] {{ m }} [/INST]")) == 'mistral'
  assert detect_chat_format(fake("<|start_header_id|>")) == 'llama3'
  with pytest.raises(ChatFormatError, match="cannot tell the chat format .*'fake'"):
    detect_chat_format(fake('{{ messages }}'))
  with pytest.raises(ChatFormatError, match="must be one of \\['mistral', 'chatml', 'llama3', "
                                            "'none', 'plain', 'auto'\\]"):
    resolve('alpaca', smol)
  with pytest.raises(ChatFormatError, match="chat_format='chatml' writes the special token "
                                            "'<\\|im_start\\|>'"):
    resolve('chatml', mistral)
  with pytest.raises(ChatFormatError, match="'llama3' writes the special token"):
    resolve('llama3', smol)
  with pytest.raises(ChatFormatError, match="resolve\\('auto', tokenizer\\)"):
    chat.get_format('auto')
  with pytest.raises(ChatFormatError, match="'mistral' has no system messages"):
    render_prompt(chat.FORMATS['mistral'], 'q', system='s')
  assert render_prompt(chat.FORMATS['chatml'], 'q', system='') == (
      '<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n')


def test_runner_renders_the_format_and_stops_at_the_end_of_turn(smol, monkeypatch):
  from jaxlm import generate
  from jaxlm.evaluate.runner import Runner
  runner = Runner(None, smol, chat_format='auto', max_len=2048, verbose=False)
  assert runner.chat_format == 'chatml' and runner.end_of_turn_id == 2
  seen = {}
  answer = smol.encode('The value is 42.')

  def fake_generate(model, prompts, *, max_new_tokens, eos_id, pad_id, multiple):
    seen.update(prompts=prompts, eos_id=eos_id)
    return np.array([answer + [eos_id, 5, 6]] * len(prompts))
  monkeypatch.setattr(generate, 'greedy_generate', fake_generate)
  assert runner.generate(['Hi', 'Yo'], max_new_tokens=12) == ['The value is 42.'] * 2
  assert seen['eos_id'] == 2 and seen['prompts'][0] == chat.prompt_ids(runner.format, smol, 'Hi')
  ctx, cont = runner.split_pair('Pick one:', ' B')
  assert ctx == chat.prompt_ids(runner.format, smol, 'Pick one:') and smol.decode(cont) == ' B'


@pytest.mark.parametrize('name', ['mistral', 'chatml', 'llama3', 'none'])
def test_counted_prompt_tokens_splice_into_the_whole_turn(name, mistral, smol, llama3):
  """A task under a token budget hands its counted prompt tokens on (Example.prompt_ids);
  prompt_ids splices them between the tokens around the prompt. The result must be the
  tokenization of the whole rendered turn, for every task that counts and every format, and
  the splice must really be used (not the fallback) where the tokenizer allows it."""
  tok = {'mistral': mistral, 'chatml': smol, 'llama3': llama3[0], 'none': mistral}[name]
  fmt = chat.get_format(name)
  examples = [make_task('simple_kv', tok, num_tokens=n, num_dicts=None, gold_position=0.5).example(1, i)
              for n, i in ((200, 0), (600, 1), (300, 2))]
  examples += [make_task('multisubkey_kv', tok, num_tokens=400, num_dicts=None).example(2, 0),
               make_task('niah', tok, num_tokens=500).example(3, 0)]
  for ex in examples:
    assert ex.prompt_ids is not None and len(ex.prompt_ids) == ex.num_tokens
    whole = tok.encode(render_prompt(fmt, ex.prompt), bos=fmt.bos)
    assert chat.prompt_ids(fmt, tok, ex.prompt, ids=ex.prompt_ids) == whole
    assert prompt_ids(ex, tok, fmt) == whole
  # spliced, not re-tokenized; except that the Llama-3-style tokenizer here (SmolLM2's
  # GPT-2 pre-tokenizer) reads '\n\n' alone as one token but '\n\nDo' as '\n' '\n' 'Do', so
  # its check fails and it falls back
  assert (chat._SPLICES[tok][(fmt, None)] is None) == (name == 'llama3')
  # the record of an example (export, predictions) does not carry the tokens
  assert 'prompt_ids' not in examples[0].to_dict()


def test_a_splice_that_would_change_the_tokens_falls_back(mistral):
  """Sentencepiece gives 'Extract' after ChatML's newline no leading-space piece, unlike the
  prompt tokenized on its own: the check sees it and the whole turn is tokenized."""
  chatml = chat.get_format('chatml')
  ex = make_task('simple_kv', mistral, num_tokens=200, num_dicts=None).example(0, 0)
  whole = mistral.encode(render_prompt(chatml, ex.prompt), bos=False)
  chat._SPLICES.pop(mistral, None)
  assert chat.prompt_ids(chatml, mistral, ex.prompt, ids=ex.prompt_ids) == whole
  assert chat._SPLICES[mistral][(chatml, None)] is None
  # and a prompt with edge whitespace never splices
  assert chat.prompt_ids(chatml, mistral, ex.prompt + ' ', ids=ex.prompt_ids) == \
      mistral.encode(render_prompt(chatml, ex.prompt + ' '), bos=False)
