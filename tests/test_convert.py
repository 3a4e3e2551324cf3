"""Hugging Face checkpoint import/export: round trips, sharded placement, bad input."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conftest import hf_logits
from jaxlm import convert
from jaxlm.convert import CheckpointError

TOKENS = np.random.RandomState(0).randint(0, 128, (2, 20))


def _copy(src, dst):
  shutil.copytree(src, dst)
  return str(dst)


def test_export_roundtrip_loads_in_transformers(hf_checkpoint, tmp_path):
  import transformers
  path, hf = hf_checkpoint
  cfg, model = convert.load_hf(str(path))
  convert.save_hf(cfg, model, str(tmp_path / 'out'))
  assert sorted(os.listdir(tmp_path / 'out')) == [
      'config.json', 'generation_config.json', 'model.safetensors']
  back = transformers.MistralForCausalLM.from_pretrained(str(tmp_path / 'out')).eval()
  assert back.config.sliding_window == 8 and back.config.num_key_value_heads == 2
  np.testing.assert_array_equal(hf_logits(back, TOKENS), hf_logits(hf, TOKENS))
  # ... and it reloads here to the same parameters, bit for bit.
  _, again = convert.load_hf(str(tmp_path / 'out'))
  for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                            nnx.to_flat_state(nnx.state(again, nnx.Param))):
    np.testing.assert_array_equal(a[...], b[...], err_msg=str(p))


def test_sharded_checkpoint_with_index(hf_checkpoint, tmp_path):
  import transformers
  path, hf = hf_checkpoint
  cfg, model = convert.load_hf(str(path))
  out = tmp_path / 'sharded'
  convert.save_hf(cfg, model, str(out), dtype='bfloat16', max_shard_bytes=40_000)
  index = json.load(open(out / 'model.safetensors.index.json'))
  files = sorted(set(index['weight_map'].values()))
  assert len(files) > 2 and files[0] == f'model-00001-of-{len(files):05d}.safetensors'
  back = transformers.MistralForCausalLM.from_pretrained(str(out)).eval()
  assert str(back.dtype) == 'torch.bfloat16'
  loaded_cfg, ours = convert.load_hf(str(out))
  assert loaded_cfg.param_dtype == 'bfloat16'
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(TOKENS))), hf_logits(back, TOKENS),
                             atol=0.05 * np.abs(hf_logits(hf, TOKENS)).max())


def test_load_onto_mesh_places_shards_and_matches(hf_checkpoint, tmp_path):
  path, _ = hf_checkpoint
  _, ref = convert.load_hf(str(path))
  mesh = jax.make_mesh((2, 4), ('fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  cfg, model = convert.load_hf(str(path), mesh=mesh)
  q = model.layers[0].attn.q_proj[...]
  assert q.sharding.spec == P('fsdp', 'tensor', None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 1, 16)
  kv = model.layers[0].attn.k_proj[...]   # 2 kv heads do not divide over 4: replicated there
  assert kv.sharding.spec == P('fsdp', None, None)
  np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(TOKENS))),
                             np.asarray(ref(jnp.asarray(TOKENS))), atol=1e-5)
  convert.save_hf(cfg, model, str(tmp_path / 'from_mesh'))
  _, back = convert.load_hf(str(tmp_path / 'from_mesh'))
  np.testing.assert_array_equal(back.lm_head[...], ref.lm_head[...])


def test_truncated_file_is_named(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / 'ckpt')
  file = os.path.join(path, 'model.safetensors')
  data = open(file, 'rb').read()
  open(file, 'wb').write(data[:len(data) // 2])
  with pytest.raises(CheckpointError, match='model.safetensors.*truncated or corrupt'):
    convert.load_hf(path)


def test_wrong_shape_names_tensor_and_shapes(hf_checkpoint, tmp_path):
  path = _copy(hf_checkpoint[0], tmp_path / 'ckpt')
  config = json.load(open(os.path.join(path, 'config.json')))
  config['intermediate_size'] = 80
  json.dump(config, open(os.path.join(path, 'config.json'), 'w'))
  with pytest.raises(CheckpointError,
                     match=r'tensor model\.layers\.0\.mlp\.down_proj\.weight has shape '
                           r'\(64, 96\).*expects \(64, 80\)'):
    convert.load_hf(path)


def test_missing_and_extra_tensors_are_named(hf_checkpoint, tmp_path):
  from safetensors.numpy import load_file, save_file
  path = _copy(hf_checkpoint[0], tmp_path / 'ckpt')
  file = os.path.join(path, 'model.safetensors')
  tensors = load_file(file)
  tensors['model.layers.0.self_attn.q_norm.weight'] = np.ones(4, np.float32)
  del tensors['model.layers.1.mlp.up_proj.weight']
  save_file(tensors, file, metadata={'format': 'pt'})
  with pytest.raises(CheckpointError, match=r"missing tensors \['model\.layers\.1\.mlp\.up_proj"
                                            r"\.weight'\].*unexpected tensors \['model\.layers\.0"
                                            r"\.self_attn\.q_norm\.weight'\]"):
    convert.load_hf(path)


@pytest.mark.parametrize('edit, match', [
    (dict(model_type='gemma', architectures=['GemmaForCausalLM']),
     r"unsupported architecture: model_type='gemma'.*\(LlamaForCausalLM\)"),
    (dict(model_type='llama', architectures=['MistralForCausalLM']),
     r"unsupported architecture: model_type='llama', architectures=\['MistralForCausalLM'\]"),
    # the checkpoint's lm_head.weight is not its embedding
    (dict(tie_word_embeddings=True), 'tie_word_embeddings=True, but tensor lm_head.weight differs'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}),
     "unsupported RoPE scaling rope_type='yarn'"),
    (dict(rope_parameters=None, rope_scaling={'type': 'dynamic', 'factor': 2.0}),
     "unsupported RoPE scaling rope_type='dynamic'"),
    (dict(rope_parameters={'rope_type': 'llama3', 'factor': 8.0, 'rope_theta': 1e4}),
     r"RoPE scaling 'llama3' lacks \['low_freq_factor', 'high_freq_factor', "
     r"'original_max_position_embeddings'\]"),
    (dict(model_type='llama', architectures=['LlamaForCausalLM'], mlp_bias=True), 'mlp_bias=True'),
    (dict(hidden_act='gelu'), "unsupported hidden_act='gelu'"),
])
def test_unsupported_configs(hf_checkpoint, tmp_path, edit, match):
  path = _copy(hf_checkpoint[0], tmp_path / 'ckpt')
  config = json.load(open(os.path.join(path, 'config.json')))
  config.update(edit)
  json.dump(config, open(os.path.join(path, 'config.json'), 'w'))
  with pytest.raises(CheckpointError, match=match):
    convert.load_hf(path)


def test_legacy_rope_theta_field():
  cfg = convert.config_from_hf(dict(
      model_type='mistral', vocab_size=32000, hidden_size=4096, num_hidden_layers=32,
      num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
      rope_theta=1e6, sliding_window=None, torch_dtype='bfloat16'))
  assert cfg == convert.config_from_hf(convert.config_to_hf(cfg, 'bfloat16'))
  assert (cfg.rope_theta, cfg.head_dim, cfg.param_dtype) == (1e6, 128, 'bfloat16')


# Llama 3.2 1B's config.json as published (transformers 4 names: rope_scaling, rope_theta).
LLAMA32 = dict(
    architectures=['LlamaForCausalLM'], model_type='llama', vocab_size=128256,
    hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, hidden_act='silu', max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, attention_bias=False,
    mlp_bias=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009],
    rope_scaling={'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
                  'original_max_position_embeddings': 8192, 'rope_type': 'llama3'},
    torch_dtype='bfloat16')


def test_llama3_config_and_params():
  cfg = convert.config_from_hf(LLAMA32)
  assert (cfg.architecture, cfg.tie_word_embeddings, cfg.attention_bias, cfg.sliding_window) == (
      'llama', True, False, None)
  assert (cfg.rope_type, cfg.rope_theta, cfg.rope_factor, cfg.rope_low_freq_factor,
          cfg.rope_high_freq_factor, cfg.rope_original_max_position) == (
              'llama3', 5e5, 32.0, 1.0, 4.0, 8192)
  assert (cfg.bos_token_id, cfg.eos_token_id) == (128000, 128001)
  assert cfg.num_params() == 1_235_814_400   # Llama 3.2 1B, tied: one 128256 x 2048 table
  old = dict(LLAMA32, rope_scaling=dict(LLAMA32['rope_scaling'], type='llama3'))
  del old['rope_scaling']['rope_type']
  assert convert.config_from_hf(old) == cfg


def _qwen2(**edit):
  return dict(dict(model_type='qwen2', architectures=['Qwen2ForCausalLM'], vocab_size=256,
                   hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=2, use_sliding_window=False,
                   sliding_window=32768, max_window_layers=28, tie_word_embeddings=True,
                   rope_theta=1e6), **edit)


def test_qwen2_config_biases_and_windows():
  cfg = convert.config_from_hf(_qwen2())
  assert (cfg.architecture, cfg.attention_bias, cfg.sliding_window) == ('qwen2', True, None)
  assert convert.config_from_hf(_qwen2(use_sliding_window=True)).sliding_window is None  # 28 >= 4
  assert convert.config_from_hf(
      _qwen2(use_sliding_window=True, max_window_layers=0)).sliding_window == 32768
  with pytest.raises(CheckpointError, match=r'qwen2 use_sliding_window=True with '
                                            r'max_window_layers=2 < num_hidden_layers=4'):
    convert.config_from_hf(_qwen2(use_sliding_window=True, max_window_layers=2))


@pytest.mark.parametrize('fields', [
    dict(),
    dict(architecture='llama', sliding_window=None, tie_word_embeddings=True),
    dict(architecture='llama', sliding_window=None, attention_bias=True, rope_type='llama3',
         rope_factor=2.0, rope_original_max_position=64),
    dict(architecture='qwen2', attention_bias=True, sliding_window=None),
    dict(architecture='qwen2', attention_bias=True, sliding_window=16, tie_word_embeddings=True),
], ids=['mistral', 'llama-tied', 'llama-bias-llama3', 'qwen2', 'qwen2-window-tied'])
def test_config_to_hf_and_back(fields):
  from jaxlm.model import get_config
  cfg = get_config('tiny', **fields)
  hf = convert.config_to_hf(cfg, 'float32')
  assert hf['model_type'] == cfg.architecture
  assert convert.config_from_hf(hf) == cfg
