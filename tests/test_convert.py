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
    (dict(model_type='llama', architectures=['LlamaForCausalLM']),
     "unsupported architecture: model_type='llama'"),
    (dict(tie_word_embeddings=True), 'tie_word_embeddings=True'),
    (dict(rope_parameters={'rope_type': 'yarn', 'factor': 4.0, 'rope_theta': 1e4}),
     'unsupported RoPE scaling'),
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
