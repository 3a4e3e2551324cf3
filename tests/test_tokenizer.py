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


def test_tiny_demo_tokenizer_rebuilds_identically_and_keeps_numbers_whole(tmp_path):
  from jaxlm.data import make_task
  from jaxlm.data.tiny_tokenizer import build
  from jaxlm.tokenizer import REPO_ROOT
  shipped = f'{REPO_ROOT}/data/tokenizers/kv-tiny.model'
  build(str(tmp_path / 'kv.model'))
  assert open(tmp_path / 'kv.model', 'rb').read() == open(shipped, 'rb').read()
  tok = Tokenizer(shipped)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (382, 1, 2)
  for n in (0, 7, 42, 99):   # a number is one piece wherever the task prints it
    pieces = [tok.id_to_piece(i) for i in tok.encode(f'{{{n}: {n}, {n}: 5}} Report the value '
                                                     f'of key {n} and', bos=False)]
    assert pieces.count(str(n)) == 4, pieces
  ex = make_task('simple_kv', tok, num_dicts=4, keys_per_dict=(2, 3), key_digits=(1, 2),
                 value_digits=(1, 2), answer_template=True).example(5, 0)
  assert tok.decode(tok.encode(ex.prompt)) == ex.prompt
  assert ex.num_tokens < 100   # the task's fixed sentences are single pieces


def test_merged_demo_tokenizer_rebuilds_and_makes_each_lookup_start_from_the_current_token(tmp_path):
  from jaxlm.data.tiny_tokenizer import build
  from jaxlm.tokenizer import REPO_ROOT
  shipped = f'{REPO_ROOT}/data/tokenizers/kv-tiny-merged.model'
  build(str(tmp_path / 'kv.model'), 'merged')
  assert open(tmp_path / 'kv.model', 'rb').read() == open(shipped, 'rb').read()
  tok = Tokenizer(shipped)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (695, 1, 2)
  def pieces(text):
    ids = tok.encode(text, bos=False)
    assert tok.decode(ids) == text
    return [tok.id_to_piece(i).replace('\u2581', ' ') for i in ids]
  assert pieces('Dictionary [3] {12: 5, 7: 45}\nDictionary [4] {9: 1}\n\n') == [
      'Dictionary [3] {', '12: ', '5', ', ', '7: ', '45', '}\n', 'Dictionary [4] {', '9: ', '1',
      '}\n\n']
  assert pieces('The value of key 12 is 45 and it is in Dictionary [3].') == [
      'The value of key ', '12 is ', '45 and it is in Dictionary [', '3', '].']
  assert pieces('Report the value of key 12 and the dictionary it is in.') == [
      'Report the value of key ', '12', ' and the dictionary it is in.']
  with pytest.raises(ValueError, match="variant='big' must be one of"):
    build(str(tmp_path / 'x.model'), 'big')


def test_pairs_demo_tokenizer_makes_a_one_digit_pair_one_piece(tmp_path):
  from jaxlm.data.tiny_tokenizer import build
  from jaxlm.tokenizer import REPO_ROOT
  shipped = f'{REPO_ROOT}/data/tokenizers/kv-tiny-pairs.model'
  build(str(tmp_path / 'kv.model'), 'pairs')
  assert open(tmp_path / 'kv.model', 'rb').read() == open(shipped, 'rb').read()
  tok = Tokenizer(shipped)
  assert tok.vocab_size == 895
  text = 'Dictionary [1] {3: 7, 5: 12, 8: 1}\nDictionary [2] {4: 4}\n\nAbove'
  ids = tok.encode(text, bos=False)
  assert tok.decode(ids) == text
  assert [tok.id_to_piece(i).replace('\u2581', ' ') for i in ids][:8] == [
      'Dictionary [1] {', '3: 7, ', '5: ', '12', ', ', '8: 1}\n', 'Dictionary [2] {', '4: 4}\n']
