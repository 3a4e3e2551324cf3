"""The Mistral/Llama family in flax.nnx: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

One implementation covers Mistral (sliding window), Llama (tied embeddings, explicit
head_dim, Llama 3.1/3.2 'llama3' RoPE scaling) and Qwen2 (q/k/v projection biases);
`MistralConfig.architecture` records which Hugging Face class a model is saved as.

Every parameter carries logical axis names (metadata key `out_sharding`) drawn from
`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`, `mlp`; `jaxlm.sharding` maps them
to mesh axes.

Shape suffixes, one meaning per letter here and in jaxlm/attention: B batch, T query
length, S key/value length, D model width, H query heads, K key/value heads, G query heads
per key/value head (H / K), N heads of either kind, E head width (E2 = E / 2), F MLP width,
V vocabulary, P picked logit positions.

Weights follow Hugging Face's layout after a transpose and a reshape (see
`jaxlm.convert`), including its rotate-half RoPE convention, so logits match
`transformers` (MistralForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM) to float32
rounding.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlm.attention import IMPLEMENTATIONS, attend, prefill_impl
from jaxlm.sharding import constrain

ARCHITECTURES = ('mistral', 'llama', 'qwen2')
ROPE_TYPES = ('default', 'llama3')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# Rematerialization of each block in the backward pass: what is saved from the forward.
REMAT_POLICIES = {
    'none': None,                                                    # save everything
    'full': jax.checkpoint_policies.nothing_saveable,                # save only block inputs
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # save weight matmuls
}


@dataclasses.dataclass(frozen=True)
class MistralConfig:
  """Architecture and numerics of a Mistral/Llama/Qwen2 model. Defaults are Mistral 7B v0.1."""
  architecture: str = 'mistral'        # Hugging Face class saved as: 'mistral' | 'llama' | 'qwen2'
  vocab_size: int = 32000
  hidden_size: int = 4096
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  intermediate_size: int = 14336
  rope_theta: float = 10000.0
  # RoPE scaling: 'default' (none) or 'llama3' (Llama 3.1/3.2) with the four fields below.
  rope_type: str = 'default'
  rope_factor: float = 8.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_position: int = 8192
  sliding_window: int | None = 4096    # None: full causal attention
  max_position_embeddings: int = 32768
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = False    # True: no lm_head; logits = x @ embed.T
  attention_bias: bool = False         # q/k/v projection biases (Qwen2); with 'llama' also o_proj's
  initializer_range: float = 0.02
  bos_token_id: int = 1
  eos_token_id: int = 2
  param_dtype: str = 'float32'         # storage dtype of the parameters
  dtype: str = 'float32'               # compute dtype of activations; logits are float32
  attention_impl: str = 'dense'        # a name in jaxlm.attention.IMPLEMENTATIONS
  attention_block_q: int = 512         # blockwise / ring / splash query block
  attention_block_kv: int = 512        # ... and key/value block
  ring_layout: str = 'natural'         # 'zigzag' when the trainer feeds zigzag-ordered batches
  remat: str = 'none'                  # recompute each block in the backward: 'none' | 'full' | 'dots'
  scan_layers: bool = False            # layers stacked on a leading 'layers' axis and run by
                                       # one scan (compile time independent of depth)

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'num_kv_heads',
                 'head_dim', 'intermediate_size', 'max_position_embeddings'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'MistralConfig.{name} must be a positive int, got {value!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f'MistralConfig.num_heads={self.num_heads} must be a multiple of '
          f'num_kv_heads={self.num_kv_heads}')
    if self.head_dim % 2:
      raise ValueError(f'MistralConfig.head_dim={self.head_dim} must be even for RoPE')
    if self.sliding_window is not None and self.sliding_window <= 0:
      raise ValueError(f'MistralConfig.sliding_window must be None or positive, '
                       f'got {self.sliding_window!r}')
    if self.attention_impl not in IMPLEMENTATIONS:
      raise ValueError(f'MistralConfig.attention_impl={self.attention_impl!r} is not one of '
                       f'{IMPLEMENTATIONS}')
    for name in ('attention_block_q', 'attention_block_kv'):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0 or value % 8:
        raise ValueError(f'MistralConfig.{name}={value!r} must be a positive multiple of 8')
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'MistralConfig.remat={self.remat!r} is not one of {sorted(REMAT_POLICIES)}')
    if self.ring_layout not in ('natural', 'zigzag'):
      raise ValueError(f"MistralConfig.ring_layout={self.ring_layout!r} must be 'natural' or "
                       "'zigzag'")
    for name in ('param_dtype', 'dtype'):
      if getattr(self, name) not in DTYPES:
        raise ValueError(f'MistralConfig.{name}={getattr(self, name)!r} is not one of '
                         f'{sorted(DTYPES)}')
    if self.architecture not in ARCHITECTURES:
      raise ValueError(f'MistralConfig.architecture={self.architecture!r} is not one of '
                       f'{ARCHITECTURES}')
    if self.architecture == 'llama' and self.sliding_window is not None:
      raise ValueError(f'MistralConfig.sliding_window={self.sliding_window!r} with '
                       f"architecture='llama': Llama has no sliding window (set it to None)")
    if self.architecture == 'mistral' and self.attention_bias:
      raise ValueError("MistralConfig.attention_bias=True with architecture='mistral': "
                       "Mistral has no q/k/v biases (use architecture 'qwen2' or 'llama')")
    if self.architecture == 'qwen2' and not self.attention_bias:
      raise ValueError("MistralConfig.attention_bias=False with architecture='qwen2': Qwen2 "
                       'always has q/k/v biases (set attention_bias=True)')
    for name in ('tie_word_embeddings', 'attention_bias'):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f'MistralConfig.{name} must be a bool, got {getattr(self, name)!r}')
    if not isinstance(self.rope_theta, (int, float)) or self.rope_theta <= 0:
      raise ValueError(f'MistralConfig.rope_theta must be positive, got {self.rope_theta!r}')
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f'MistralConfig.rope_type={self.rope_type!r} is not one of {ROPE_TYPES}')
    if self.rope_type == 'llama3':
      for name in ('rope_factor', 'rope_low_freq_factor', 'rope_high_freq_factor'):
        value = getattr(self, name)
        if not isinstance(value, (int, float)) or value <= 0:
          raise ValueError(f'MistralConfig.{name} must be positive, got {value!r}')
      if self.rope_high_freq_factor <= self.rope_low_freq_factor:
        raise ValueError(
            f'MistralConfig.rope_high_freq_factor={self.rope_high_freq_factor!r} must be greater '
            f'than rope_low_freq_factor={self.rope_low_freq_factor!r}')
      value = self.rope_original_max_position
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f'MistralConfig.rope_original_max_position must be a positive int, '
                         f'got {value!r}')

  def replace(self, **overrides: Any) -> 'MistralConfig':
    fields = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise ValueError(f'unknown MistralConfig field(s) {unknown}; valid fields: {sorted(fields)}')
    return dataclasses.replace(self, **overrides)

  def num_params(self) -> int:
    d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
    attn = d * self.head_dim * (2 * self.num_heads + 2 * self.num_kv_heads)
    if self.attention_bias:
      attn += self.head_dim * (self.num_heads + 2 * self.num_kv_heads)
      attn += d if self.architecture == 'llama' else 0
    block = attn + 3 * d * f + 2 * d
    embeddings = (1 if self.tie_word_embeddings else 2) * v * d
    return self.num_layers * block + embeddings + d


PRESETS: dict[str, MistralConfig] = {
    'mistral-7b-v0.1': MistralConfig(),
    'mistral-7b-v0.2': MistralConfig(rope_theta=1e6, sliding_window=None),
    # A ~20M-parameter model with the real 32000-token vocabulary: CPU demos.
    'small': MistralConfig(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2,
                           head_dim=32, intermediate_size=768, sliding_window=None,
                           max_position_embeddings=8192),
    # Tests: every feature on (GQA, sliding window shorter than test sequences).
    'tiny': MistralConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                          num_kv_heads=2, head_dim=16, intermediate_size=128,
                          sliding_window=16, max_position_embeddings=1024),
}
PRESETS['mistral-7b-instruct-v0.1'] = PRESETS['mistral-7b-v0.1']
PRESETS['mistral-7b-instruct-v0.2'] = PRESETS['mistral-7b-v0.2']


def get_config(name: str, **overrides: Any) -> MistralConfig:
  """A preset by name, with optional field overrides."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; choose one of {sorted(PRESETS)}')
  return PRESETS[name].replace(**overrides)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...],
           cfg: MistralConfig, init=None) -> nnx.Param:
  init = init or nnx.initializers.normal(cfg.initializer_range)
  value = init(rngs.params(), shape, DTYPES[cfg.param_dtype])
  # eager_sharding=False: names are placed by jaxlm.sharding, not at creation.
  return nnx.Param(value, out_sharding=axes, eager_sharding=False)


# Logical names of activations (jaxlm.sharding maps them to mesh axes under a mesh).
EMBED_ACT = ('act_batch', 'act_length', 'act_embed')
HEADS_ACT = ('act_batch', 'act_length', 'act_heads', None)
KV_HEADS_ACT = ('act_batch', 'act_length', 'act_kv_heads', None)
MLP_ACT = ('act_batch', 'act_length', 'act_mlp')
VOCAB_ACT = ('act_batch', 'act_length', 'act_vocab')
GATHERED_VOCAB_ACT = ('act_batch', None, 'act_vocab')   # logits at a few gathered positions


def _act(x: jax.Array, names=EMBED_ACT) -> jax.Array:
  return constrain(x, names)


def _matmul(x: jax.Array, w: jax.Array, n_in: int = 1, **kwargs) -> jax.Array:
  """Contract the last `n_in` dims of x with the first `n_in` dims of w, as one 2-D matmul.

  Flattening the batch and sequence dims first matters on CPU: XLA otherwise
  materializes large transposes in the backward pass (1.4x slower LM-head step).
  """
  lead, k = x.shape[:x.ndim - n_in], w.shape[:n_in]
  out = w.shape[n_in:]
  y = jnp.dot(x.reshape(-1, int(np.prod(k))), w.reshape(int(np.prod(k)), -1), **kwargs)
  return y.reshape(*lead, *out)


def _project(module: nnx.Module, name: str, x: jax.Array, n_in: int = 1) -> jax.Array:
  """x times the weight `module.<name>` in x's dtype, plus its LoRA adapter's output when
  one is attached (`module.<name>_lora`, see jaxlm.lora)."""
  y = _matmul(x, getattr(module, name)[...].astype(x.dtype), n_in)
  adapter = getattr(module, name + '_lora', None)
  return y if adapter is None else y + adapter(x)


class RMSNorm(nnx.Module):

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    self.eps = cfg.rms_norm_eps
    self.scale = _param(rngs, (cfg.hidden_size,), ('embed',), cfg, nnx.initializers.ones)

  def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
    x32 = x_BxTxD.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return self.scale[...].astype(x_BxTxD.dtype) * x32.astype(x_BxTxD.dtype)


def rope_inv_freq(cfg: MistralConfig) -> jax.Array:
  """Float32 inverse frequencies [E/2] of the rotary embedding, scaled as cfg.rope_type says.

  'llama3' (Llama 3.1/3.2): frequencies whose wavelength exceeds original_max /
  low_freq_factor are divided by `factor`, those with a wavelength below original_max /
  high_freq_factor are kept, and the band between is interpolated smoothly (the formula of
  transformers' `_compute_llama3_parameters`)."""
  dh = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  if cfg.rope_type == 'default':
    return inv_freq
  factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
  old_len = cfg.rope_original_max_position
  low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
  wavelen = 2 * np.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
  smooth = (old_len / wavelen - low) / (high - low)
  smoothed = (1 - smooth) * scaled / factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled).astype(jnp.float32)


def rope(x_BxTxNxE: jax.Array, positions_BxT: jax.Array, inv_freq: jax.Array) -> jax.Array:
  """Rotary embedding, rotate-half convention (first and second halves of E paired).

  inv_freq: float32 [E/2] from `rope_inv_freq`."""
  angles_BxTxE2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
  angles_BxTxE = jnp.concatenate([angles_BxTxE2, angles_BxTxE2], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(angles_BxTxE), jnp.sin(angles_BxTxE)
  x1, x2 = jnp.split(x_BxTxNxE.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x_BxTxNxE * cos + rotated * sin).astype(x_BxTxNxE.dtype)


class Attention(nnx.Module):

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = _param(rngs, (d, h, dh), ('embed', 'heads', 'head_dim'), cfg)
    self.k_proj = _param(rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.v_proj = _param(rngs, (d, k, dh), ('embed', 'kv_heads', 'head_dim'), cfg)
    self.o_proj = _param(rngs, (h, dh, d), ('heads', 'head_dim', 'embed'), cfg)
    if cfg.attention_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = _param(rngs, (h, dh), ('heads', 'head_dim'), cfg, zeros)
      self.k_bias = _param(rngs, (k, dh), ('kv_heads', 'head_dim'), cfg, zeros)
      self.v_bias = _param(rngs, (k, dh), ('kv_heads', 'head_dim'), cfg, zeros)
    if cfg.attention_bias and cfg.architecture == 'llama':   # transformers' Llama: o_proj too
      self.o_bias = _param(rngs, (d,), ('embed',), cfg, nnx.initializers.zeros)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None, natural=False,
               segment_positions=False):
    """cache: None, or (k_BxSxKxE, v_BxSxKxE, kv_positions_BxS, kv_segment_ids_BxS, index,
    prefill) with the buffers already holding this step's positions and segment ids at
    `index`; prefill (a Python bool): the cache was empty and the positions run 0..n-1
    within each segment, so the new tokens attend among themselves only (self-attention:
    the same result, with jaxlm.attention.prefill_impl's kernel where it names one).
    natural: positions are 0..T-1 and segment_ids_BxT is None, so kernels with static
    masks (cudnn, splash) apply. segment_positions: positions run 0..n-1 within each
    segment (jaxlm.attention: splash applies with the segment ids)."""
    cfg, dt = self.cfg, x_BxTxD.dtype
    q = _project(self, 'q_proj', x_BxTxD)
    k = _project(self, 'k_proj', x_BxTxD)
    v = _project(self, 'v_proj', x_BxTxD)
    if cfg.attention_bias:
      q = q + self.q_bias[...].astype(dt)
      k = k + self.k_bias[...].astype(dt)
      v = v + self.v_bias[...].astype(dt)
    q, k, v = _act(q, HEADS_ACT), _act(k, KV_HEADS_ACT), _act(v, KV_HEADS_ACT)
    inv_freq = rope_inv_freq(cfg)
    q = rope(q, positions_BxT, inv_freq)
    k = rope(k, positions_BxT, inv_freq)
    impl, block = cfg.attention_impl, dict(block_q=cfg.attention_block_q,
                                           block_kv=cfg.attention_block_kv)
    if cache is None:
      new_kv = None
      if natural:
        masks = {}
      else:
        masks = dict(q_positions_BxT=positions_BxT, kv_positions_BxS=positions_BxT,
                     segment_ids=segment_ids_BxT,
                     segment_positions=segment_positions and cfg.ring_layout == 'natural')
    else:
      k_cache, v_cache, kv_positions, kv_segments, index, prefill = cache
      new_kv = (jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0)),
                jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0)))
      kernel = prefill_impl(impl, positions_BxT.shape[1]) if prefill else None
      if kernel:   # every other slot is empty: self-attention over the new tokens
        impl = kernel
        k, v = k.astype(k_cache.dtype), v.astype(v_cache.dtype)
        masks = dict(q_positions_BxT=positions_BxT, kv_positions_BxS=positions_BxT,
                     segment_ids=segment_ids_BxT, segment_positions=True)
      else:
        k, v = new_kv
        masks = dict(q_positions_BxT=positions_BxT, kv_positions_BxS=kv_positions,
                     q_segment_ids_BxT=segment_ids_BxT, kv_segment_ids_BxS=kv_segments)
        if impl not in ('dense', 'blockwise'):
          impl = 'auto'   # decoding: queries and cache differ in length; ring etc. do not apply
    out = attend(q, k.astype(dt), v.astype(dt), impl=impl, causal=True,
                 sliding_window=cfg.sliding_window, ring_layout=cfg.ring_layout, **block,
                 **masks)
    out = _project(self, 'o_proj', out, n_in=2)
    if cfg.attention_bias and cfg.architecture == 'llama':
      out = out + self.o_bias[...].astype(dt)
    return out, new_kv


class MLP(nnx.Module):

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.intermediate_size
    self.gate_proj = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.up_proj = _param(rngs, (d, f), ('embed', 'mlp'), cfg)
    self.down_proj = _param(rngs, (f, d), ('mlp', 'embed'), cfg)

  def __call__(self, x_BxTxD):
    gate_BxTxF = jax.nn.silu(_act(_project(self, 'gate_proj', x_BxTxD), MLP_ACT))
    up_BxTxF = _act(_project(self, 'up_proj', x_BxTxD), MLP_ACT)
    return _project(self, 'down_proj', gate_BxTxF * up_BxTxF)


class Block(nnx.Module):

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    self.input_norm = RMSNorm(cfg, rngs=rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.post_attn_norm = RMSNorm(cfg, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT, cache=None, natural=False,
               segment_positions=False):
    h, new_kv = self.attn(self.input_norm(x_BxTxD), positions_BxT, segment_ids_BxT, cache,
                          natural, segment_positions)
    x_BxTxD = _act(x_BxTxD + h)
    return _act(x_BxTxD + self.mlp(self.post_attn_norm(x_BxTxD))), new_kv


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  """Keys and values of every layer for a fixed-size buffer of S slots.

  Slots are filled left to right at `index`; empty slots have segment id -1, which
  no query matches. The whole buffer is kept (no rolling window): with a sliding
  window, old slots are masked rather than overwritten.
  """
  k: list[jax.Array] | jax.Array   # per layer [B, S, K, E]; scan_layers: [L, B, S, K, E]
  v: list[jax.Array] | jax.Array
  positions_BxS: jax.Array      # int32
  segment_ids_BxS: jax.Array    # int32, -1 for empty slots
  index: jax.Array              # int32 scalar: next slot to write

  @classmethod
  def init(cls, cfg: MistralConfig, batch: int, length: int, dtype=None) -> 'KVCache':
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
      stacked = lambda: jnp.zeros((cfg.num_layers, *shape), dtype)
      k, v = stacked(), stacked()
    else:
      k = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
      v = [jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)]
    return cls(k=k, v=v,
               positions_BxS=jnp.zeros((batch, length), jnp.int32),
               segment_ids_BxS=jnp.full((batch, length), -1, jnp.int32),
               index=jnp.zeros((), jnp.int32))


class Mistral(nnx.Module):
  """Decoder-only Mistral/Llama/Qwen2: an LM head of its own, or tied to the embedding."""

  def __init__(self, cfg: MistralConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ('vocab', 'embed'), cfg)
    if cfg.scan_layers:   # one Block whose parameters have a leading [num_layers] axis
      @nnx.split_rngs(splits=cfg.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def stacked(rngs):
        return Block(cfg, rngs=rngs)
      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.final_norm = RMSNorm(cfg, rngs=rngs)
    if not cfg.tie_word_embeddings:
      self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ('embed', 'vocab'), cfg)

  def __call__(self, tokens_BxT: jax.Array, positions_BxT: jax.Array | None = None,
               *, segment_ids_BxT: jax.Array | None = None,
               logit_positions_BxP: jax.Array | None = None,
               segment_positions: bool = False) -> jax.Array:
    """Float32 logits [B, T, V]. Positions default to 0..T-1; tokens attend only to
    earlier tokens of the same segment (segment ids default to all zeros).

    logit_positions_BxP: int32 indices into T; when given, only those positions go
    through the final norm and the output projection and the result is [B, K, V]
    (answer-only training needs logits at a few positions of a long sequence).
    segment_positions: positions run 0..n-1 within each segment, as the data pipeline
    builds them; lets `auto` attention use splash on TPUs (jaxlm.attention)."""
    B, T = tokens_BxT.shape
    natural = positions_BxT is None and segment_ids_BxT is None
    if positions_BxT is None:
      positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.zeros((B, T), jnp.int32)
    x = _act(self._embed(tokens_BxT))
    run = lambda blk, x: (blk(x, positions_BxT, segment_ids_BxT, natural=natural,
                              segment_positions=segment_positions)[0], ())
    if self.cfg.scan_layers:
      x, _ = self._scan(run, x, remat=self.cfg.remat)
    else:
      if self.cfg.remat != 'none':
        run = _checkpointed(run, REMAT_POLICIES[self.cfg.remat])
      for block in self.layers:
        x, _ = run(block, x)
    if logit_positions_BxP is not None:
      x = jnp.take_along_axis(x, logit_positions_BxP.astype(jnp.int32)[..., None], axis=1)
      return self._logits(x, names=GATHERED_VOCAB_ACT)
    return self._logits(x)

  def decode(self, tokens_BxT: jax.Array, positions_BxT: jax.Array,
             segment_ids_BxT: jax.Array, cache: KVCache, *,
             last_only: bool = False, prefill: bool = False) -> tuple[jax.Array, KVCache]:
    """Run T new tokens against a KV cache (prefill when T > 1, one step when T = 1).

    Returns float32 logits [B, T, V] ([B, 1, V], the last position's, with last_only)
    and the cache with the new keys written at slots index..index+T-1. Segment ids must be
    >= 0 (padding gets its own id). prefill=True promises a fresh cache (KVCache.init:
    every slot empty) and positions that run 0..n-1 within each segment, segments in row
    order (left padding with jaxlm.generate.prompt_positions): the tokens then attend among
    themselves (jaxlm.attention.prefill_impl: chunked on CPU) instead of over the whole
    buffer; the result is the same.
    """
    T = tokens_BxT.shape[1]
    kv_positions = jax.lax.dynamic_update_slice(
        cache.positions_BxS, positions_BxT.astype(jnp.int32), (0, cache.index))
    kv_segments = jax.lax.dynamic_update_slice(
        cache.segment_ids_BxS, segment_ids_BxT.astype(jnp.int32), (0, cache.index))
    x = self._embed(tokens_BxT)

    def run(block, x, k, v):
      return block(x, positions_BxT, segment_ids_BxT,
                   (k, v, kv_positions, kv_segments, cache.index, prefill))
    if self.cfg.scan_layers:   # the cache is stacked like the layers
      x, new_k, new_v = self._scan_cached(run, x, cache.k, cache.v, cache.index, T)
    else:
      new_k, new_v = [], []
      for i, block in enumerate(self.layers):
        x, (k, v) = run(block, x, cache.k[i], cache.v[i])
        new_k.append(k)
        new_v.append(v)
    new_cache = KVCache(k=new_k, v=new_v, positions_BxS=kv_positions,
                        segment_ids_BxS=kv_segments, index=cache.index + T)
    if last_only:   # a prefill needs only the next token's logits: skip the head elsewhere
      x = x[:, -1:]
    return self._logits(x), new_cache

  def _scan(self, step, x, *per_layer, remat: str = 'none'):
    """Stacked layers as one jax.lax.scan: step(block, x, *that layer's slices of
    per_layer) -> (x, outputs); returns (x, outputs stacked over layers). The body is
    traced once, so compile time does not grow with depth; `remat` checkpoints it.

    The stacked parameters enter the scan already in the compute dtype (every use in a
    block casts to it anyway): the scan's backward then stacks the layers' gradients in
    that dtype, and the cast to the parameters' dtype happens outside the loop, where
    XLA fuses it into the optimizer instead of keeping a float32 copy of the whole
    stack's gradient (the unrolled layers never had one)."""
    graphdef, stacked = self._stacked_layers()

    def body(x, xs):
      return step(nnx.merge(graphdef, xs[0]), x, *xs[1:])
    if remat != 'none':
      body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    return jax.lax.scan(body, x, (stacked, *per_layer))

  def _stacked_layers(self):
    """(graphdef, the stacked layer state with floating-point arrays in the compute dtype)."""
    graphdef, stacked = nnx.split(self.layers)
    dt = DTYPES[self.cfg.dtype]
    return graphdef, jax.tree.map(
        lambda a: a.astype(dt) if jnp.issubdtype(a.dtype, jnp.floating) else a, stacked)

  def _scan_cached(self, run, x, k_LxBxSxKxE, v_LxBxSxKxE, index, T):
    """The scanned layers against a stacked KV cache that the scan carries: each layer
    writes only its T new slots back into the stack (in place), instead of the scan
    stacking every layer's whole updated cache as a new output at every decoding step
    (which made decoding ~0.35 s per token slower than the unrolled layers for SmolLM2 at
    batch 100 on CPU)."""
    graphdef, stacked = self._stacked_layers()

    def body(carry, xs):
      x, k_all, v_all = carry
      params, i = xs
      x, (k, v) = run(nnx.merge(graphdef, params), x, k_all[i], v_all[i])
      new = lambda a: jax.lax.dynamic_slice_in_dim(a, index, T, axis=1)[None]
      k_all = jax.lax.dynamic_update_slice(k_all, new(k), (i, 0, index, 0, 0))
      v_all = jax.lax.dynamic_update_slice(v_all, new(v), (i, 0, index, 0, 0))
      return (x, k_all, v_all), None
    layers = jnp.arange(self.cfg.num_layers, dtype=jnp.int32)
    (x, k, v), _ = jax.lax.scan(body, (x, k_LxBxSxKxE, v_LxBxSxKxE), (stacked, layers))
    return x, k, v

  def _embed(self, tokens_BxT):
    return jnp.take(self.embed[...], tokens_BxT, axis=0).astype(DTYPES[self.cfg.dtype])

  def _logits(self, x_BxTxD, names=VOCAB_ACT):
    x_BxTxD = self.final_norm(x_BxTxD)
    if self.cfg.tie_word_embeddings:
      head_DxV = self.embed[...].astype(x_BxTxD.dtype).T
    else:
      head_DxV = self.lm_head[...].astype(x_BxTxD.dtype)
    return _act(_matmul(x_BxTxD, head_DxV, preferred_element_type=jnp.float32), names)


def _checkpointed(run, policy):
  """run(block, x) rematerialized in the backward pass: jax.checkpoint of a pure function
  of the block's state (nnx.remat would write the state back into the block, which fails
  for variables of an outer trace, e.g. LoRA's frozen base inside a gradient of the
  adapters only)."""
  def checkpointed(block, x):
    graphdef, state = nnx.split(block)
    return jax.checkpoint(lambda state, x: run(nnx.merge(graphdef, state), x),
                          policy=policy)(state, x)
  return checkpointed


def init_model(cfg: MistralConfig, seed: int = 0) -> Mistral:
  return Mistral(cfg, rngs=nnx.Rngs(seed))


def abstract_model(cfg: MistralConfig) -> Mistral:
  """The model with ShapeDtypeStruct leaves: shapes and axis names, no memory."""
  return nnx.eval_shape(lambda: Mistral(cfg, rngs=nnx.Rngs(0)))
