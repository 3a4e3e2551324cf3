"""The vendored Mistral v1 sentencepiece model."""
import hashlib

import pytest


from jaxlm.model import get_config
from jaxlm.tokenizer import MISTRAL_V1, Tokenizer, TokenizerMismatchError

TASK_TEXT = (
    'Do a task using the list of dictionaries below.\n\n'
    'Dictionary [1] {2031: 681, 922: 2494, 2786: 5769}\n'
    'Dictionary [2] {5561: 7320, 348: 9015, 1007: 66}\n\n'
    'Above is a list of dictionaries such that each key and value is an integer. '
    'Report the value of key 922 and the dictionary it is in. Answer in the following template:\n'
    'The value of key 922 is <fill-in-value> and it is in Dictionary [<fill-in-dictionary-name>].')


@pytest.fixture(scope='module')
def tok():
  return Tokenizer()


def test_vendored_file_is_the_mistral_v1_model():
  digest = hashlib.sha256(open(MISTRAL_V1, 'rb').read()).hexdigest()
  assert digest == 'dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055'


def test_roundtrip_on_retrieval_text(tok):
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
  ids = tok.encode(TASK_TEXT, bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
  assert tok.decode(ids) == TASK_TEXT
  assert tok.encode_batch([TASK_TEXT, 'x'], bos=False) == [ids[1:-1], tok.encode('x', bos=False)]


def test_digits_are_one_token_each(tok):
  pieces = [tok.id_to_piece(i) for i in tok.encode('key 2031: 681', bos=False)]
  assert pieces == ['▁key', '▁', '2', '0', '3', '1', ':', '▁', '6', '8', '1']


def test_vocab_mismatch_is_an_error(tok):
  tok.check_model(get_config('small'))  # same 32000 vocabulary: fine
  tok.check_model(get_config('small', vocab_size=32768))  # padded embedding: fine
  with pytest.raises(TokenizerMismatchError, match='has 32000 pieces but the model has vocab_size=512'):
    tok.check_model(get_config('tiny'))
  with pytest.raises(TokenizerMismatchError, match='eos=2 but the model config has .*eos_token_id=7'):
    tok.check_model(get_config('small', eos_token_id=7))


def test_not_a_tokenizer(tmp_path):
  bad = tmp_path / 'bad.model'
  bad.write_text('not a model')
  with pytest.raises(ValueError, match='is not a sentencepiece model'):
    Tokenizer(str(bad))
  with pytest.raises(FileNotFoundError, match='does not exist'):
    Tokenizer(str(tmp_path / 'missing.model'))


# ---------------------------------------------------------------------------------------
# Byte-level BPE (SmolLM2's GGUF) against transformers' own GGUF tokenizer

import json  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import types  # noqa: E402

from jaxlm.tokenizer import BPETokenizer, load_tokenizer  # noqa: E402

SMOLLM2 = 'embedded:smollm2-135m-instruct'
MIXED = ('Digits 0 1 2 10 99 2024 3.14159 -7 1e-5 x2y 1,234,567 (555) 123-4567\n'
         'line two\n\nline  three\ttab\n  indented 42 and\r\nwindows 7\n\n\nend ')
UNICODE = 'héllo wörld — “quotes” 日本語テキスト 🤗🚀 naïve café Ωμέγα ñ Ǆ \u00a0nbsp'
SPECIAL = ('<|im_start|>system\nYou are 12 years<|im_end|>\n<|endoftext|><repo_name>x'
           '<|im_end|>7<|im_start|>assistant\n')
# SmolLM2 splits every digit off before the byte-level split (llama.cpp's 'smollm', the
# Digits pre-tokenizer of its tokenizer.json); transformers 5.24's GGUF reader does not,
# which differs only where 2+ whitespace characters precede a digit.
DIGIT_AFTER_SPACES = {'a  1': (['a', 'ĠĠ', '1'], ['a', 'Ġ', 'Ġ', '1']),
                      '\n\n12': (['ĊĊ', '1', '2'], ['Ċ', 'Ċ', '1', '2'])}


def _task_texts(tok):
  from jaxlm import chat
  from jaxlm.data import make_task
  out = []
  for template in (True, False):
    task = make_task('simple_kv', tok, num_dicts=5, answer_template=template)
    for i in range(4):
      ex = task.example(11, i)
      out += [ex.prompt, ex.answer, ex.prompt + ex.answer,
              chat.render_prompt(chat.FORMATS['chatml'], ex.prompt) + ex.answer + '<|im_end|>\n']
  return out


def test_gguf_bpe_matches_transformers_gguf_tokenizer(smol, hf_smol):
  assert isinstance(smol, BPETokenizer)
  assert (smol.vocab_size, smol.bos_id, smol.eos_id, smol.pad_id) == (49152, 1, 2, 2)
  assert smol.add_bos is False and smol.chat_template == hf_smol.chat_template
  texts = _task_texts(smol) + [TASK_TEXT, MIXED, UNICODE, SPECIAL, '', ' ', '7']
  ours = smol.encode_batch(texts, bos=True)   # bos=True: SmolLM2 adds none
  assert ours == [hf_smol.encode(t, add_special_tokens=False) for t in texts]
  for text, ids in zip(texts, ours):
    assert smol.encode(text) == ids
    assert smol.decode(ids, skip_special=False) == text
    assert smol.decode(ids) == hf_smol.decode(ids, skip_special_tokens=True)
  assert smol.encode('<|im_start|>user<|im_end|>') == [1, 4093, 2]   # special tokens whole
  assert smol.encode('12 345') == [smol.token_to_id(c) for c in '12'] + [
      smol.token_to_id('Ġ')] + [smol.token_to_id(c) for c in '345']   # one digit per token
  for text, (ours_pieces, theirs_pieces) in DIGIT_AFTER_SPACES.items():
    assert [smol.id_to_piece(i) for i in smol.encode(text)] == ours_pieces
    assert hf_smol.convert_ids_to_tokens(hf_smol.encode(text)) == theirs_pieces


def test_hf_directory_tokenizer_matches_transformers(hf_smol, tmp_path):
  hf_smol.save_pretrained(str(tmp_path))
  tok = load_tokenizer(str(tmp_path))
  assert isinstance(tok, BPETokenizer) and tok.chat_template == hf_smol.chat_template
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (
      49152, 1, 2, 2, False)
  texts = [TASK_TEXT, MIXED, UNICODE, SPECIAL, *DIGIT_AFTER_SPACES]
  assert [tok.encode(t) for t in texts] == [hf_smol.encode(t, add_special_tokens=False)
                                            for t in texts]
  assert load_tokenizer(str(tmp_path / 'tokenizer.json')).encode(MIXED) == tok.encode(MIXED)


def test_bpe_interface_pickles_and_checks_the_model(smol):
  clone = pickle.loads(pickle.dumps(smol))
  assert clone.encode(SPECIAL + MIXED) == smol.encode(SPECIAL + MIXED)
  assert (clone.bos_id, clone.eos_id, clone.pad_id, clone.add_bos, clone.chat_template) == (
      smol.bos_id, smol.eos_id, smol.pad_id, smol.add_bos, smol.chat_template)
  assert smol.encode('hi', bos=True, eos=True) == smol.encode('hi') + [2]
  assert smol.id_to_piece(2) == '<|im_end|>' and smol.token_to_id('nope, not a token') is None
  pieces = smol.text_pieces()
  assert '<|im_start|>' not in pieces and pieces['Ġkey'] == smol.token_to_id('Ġkey')
  cfg = types.SimpleNamespace(vocab_size=49152, bos_token_id=1, eos_token_id=2)
  smol.check_model(cfg)
  with pytest.raises(TokenizerMismatchError, match='has 49152 pieces but the model has '
                                                   'vocab_size=32000'):
    smol.check_model(types.SimpleNamespace(vocab_size=32000, bos_token_id=1, eos_token_id=2))
  with pytest.raises(TokenizerMismatchError, match='bos=1, eos=2 but the model config has '
                                                   'bos_token_id=0'):
    smol.check_model(types.SimpleNamespace(vocab_size=49152, bos_token_id=0, eos_token_id=2))


def test_bos_follows_each_tokenizer_convention(tok, smol):
  assert tok.add_bos and tok.encode('x', bos=True)[0] == tok.bos_id
  assert not smol.add_bos and smol.encode('x', bos=True) == smol.encode('x', bos=False)
  assert tok.token_to_id('</s>') == 2 and tok.token_to_id('no such piece') is None
  assert tok.decode([1, *tok.encode('Hi there', bos=False), 2], skip_special=False) == (
      '<s>Hi there</s>')


def _write_gguf(path, tokens, types_, merges, *, model='gpt2', pre='llama-bpe', add_bos=True):
  import gguf
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_tokenizer_model(model)
  w.add_tokenizer_pre(pre)
  w.add_token_list(tokens)
  w.add_token_types(types_)
  if merges is not None:
    w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_add_bos_token(add_bos)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


@pytest.fixture(scope='module')
def small_vocab(smol):
  """SmolLM2's first 1500 tokens and the merges among them (a small GGUF vocabulary)."""
  n = 1500
  tokens = [smol.id_to_piece(i) for i in range(n)]
  keep = set(tokens)
  merges = [m if isinstance(m, str) else ' '.join(m)
            for m in json.loads(smol._tok.to_str())['model']['merges']]
  merges = [m for m in merges if (lambda a, b: a in keep and b in keep and a + b in keep)(
      *m.split(' ', 1))]
  types_ = [3 if smol.token_to_id(t) in smol._special_ids else 1 for t in tokens]
  return tokens, types_, merges


@pytest.mark.parametrize('pre', ['llama-bpe', 'qwen2'])
def test_gguf_pre_tokenizers_match_transformers(small_vocab, tmp_path, pre):
  transformers = pytest.importorskip('transformers')
  _write_gguf(tmp_path / 'tok.gguf', *small_vocab, pre=pre)
  ours = load_tokenizer(str(tmp_path / 'tok.gguf'))
  theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file='tok.gguf')
  assert ours.add_bos and ours.encode('hi') == theirs.encode('hi') and ours.encode('hi')[0] == 1
  texts = [TASK_TEXT, MIXED, UNICODE, SPECIAL, *DIGIT_AFTER_SPACES, "it's   1234567 they'LL"]
  assert [ours.encode(t, bos=False) for t in texts] == [
      theirs.encode(t, add_special_tokens=False) for t in texts]


def test_load_tokenizer_dispatch_and_errors(small_vocab, tmp_path):
  assert isinstance(load_tokenizer(MISTRAL_V1), Tokenizer)
  (tmp_path / 'hf').mkdir()
  os.symlink(MISTRAL_V1, tmp_path / 'hf' / 'tokenizer.model')
  assert load_tokenizer(str(tmp_path / 'hf')).encode('key 12') == Tokenizer().encode('key 12')
  with pytest.raises(FileNotFoundError, match="tokenizer 'nowhere/x.model' does not exist"):
    load_tokenizer('nowhere/x.model')
  with pytest.raises(FileNotFoundError, match='has neither tokenizer.json nor tokenizer.model'):
    load_tokenizer(str(tmp_path))
  (tmp_path / 'notes.txt').write_text('hello')
  with pytest.raises(ValueError, match='cannot tell which tokenizer .*notes.txt'):
    load_tokenizer(str(tmp_path / 'notes.txt'))
  with pytest.raises(FileNotFoundError, match="unknown embedded model 'nope'"):
    load_tokenizer('embedded:nope')
  with pytest.raises(ValueError, match='must be a path or embedded:NAME'):
    load_tokenizer('')
  tokens, types_, merges = small_vocab
  _write_gguf(tmp_path / 'spm.gguf', tokens, types_, None, model='llama')
  with pytest.raises(ValueError, match=r"tokenizer.ggml.model='llama' is not supported"):
    load_tokenizer(str(tmp_path / 'spm.gguf'))
  _write_gguf(tmp_path / 'pre.gguf', tokens, types_, merges, pre='falcon')
  with pytest.raises(ValueError, match=r"tokenizer.ggml.pre='falcon' is not supported"):
    load_tokenizer(str(tmp_path / 'pre.gguf'))
  (tmp_path / 'bad.gguf').write_bytes(b'not a gguf file at all')
  with pytest.raises(ValueError, match='bad.gguf: not a readable GGUF file'):
    load_tokenizer(str(tmp_path / 'bad.gguf'))
