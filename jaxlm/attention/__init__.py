"""One attention entry point; kernels are selected by name.

  dense      jax.nn.dot_product_attention with an explicit mask: the oracle (dense.py)
  blockwise  exact, O(T * block) memory, custom VJP, skips invisible blocks (blockwise.py)
  chunked    causal self-attention in query chunks that skip the keys after them: the
             CPU kernel for training lengths (chunked.py)
  ring       sequence sharded over the mesh's `context` axis, blockwise per device (ring.py)
  cudnn      cuDNN flash attention, NVIDIA GPUs only (cudnn.py)
  splash     Pallas splash attention, TPUs only (splash.py)
  auto       ring if the mesh has a context axis > 1; else cudnn on GPU and splash on TPU
             when the mask allows; else blockwise for long sequences; for short ones
             chunked on CPU when the positions allow, dense otherwise (`choose_impl` says
             which and why)

Training rows built by the data pipeline carry positions that run 0..n-1 within each
segment (packed examples, padding as segment 0): `segment_positions=True` says so, and the
kernels whose masks are static (splash: causal or local window plus segment ids) then
compute the oracle's function for every token of a non-zero segment (padding, which no
loss reads, may differ). The same property lets `chunked` skip every key at a later
index than the query.

Every implementation computes the oracle's function (tested against it on random
inputs, values and gradients). Masks come from positions and segment ids; Hugging
Face's sliding_window=W counts the current token (keys with q_pos - W < kv_pos).

Shape suffixes as in jaxlm/model.py: B batch, T query length, S key/value length, H query
heads, K key/value heads, G = H / K query heads per key/value head, E head width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.attention.blockwise import DEFAULT_BLOCK, attend_blockwise
from jaxlm.attention.chunked import attend_chunked
from jaxlm.attention.cudnn import attend_cudnn
from jaxlm.attention.dense import attend_dense, make_mask
from jaxlm.attention.ring import ring_attention
from jaxlm.attention.splash import attend_splash

IMPLEMENTATIONS = ('dense', 'blockwise', 'chunked', 'ring', 'cudnn', 'splash', 'auto')
AUTO_BLOCKWISE_MIN_SCORES = 2048 * 2048   # T * S above which auto picks blockwise on CPU

__all__ = ['attend', 'prefill_impl', 'attend_dense', 'attend_blockwise', 'attend_chunked', 'ring_attention',
           'make_mask',
           'IMPLEMENTATIONS']


def _context_mesh(mesh):
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or 'context' not in mesh.axis_names:
    return None
  return mesh


def choose_impl(impl: str, *, T: int, S: int, mesh=None, custom_positions: bool = False,
                segments: bool = False, segment_positions: bool = False,
                platform: str | None = None, causal: bool = True) -> tuple[str, str]:
  """(the concrete kernel `auto` stands for in this setting, why); other names are
  returned unchanged. `platform`: the devices' ('cpu', 'gpu', 'tpu'; default this
  process's)."""
  if impl != 'auto':
    return impl, 'chosen by name'
  ctx = _context_mesh(mesh)
  if ctx is not None and ctx.shape['context'] > 1 and T == S:
    return 'ring', f'the mesh shards the sequence over context={ctx.shape["context"]}'
  platform = platform or jax.devices()[0].platform
  permuted = custom_positions and not segment_positions   # not 0..n-1 per segment
  long = T * S > AUTO_BLOCKWISE_MIN_SCORES
  fallback = 'blockwise' if long else 'dense'
  if platform == 'gpu':
    if not custom_positions and not segments:
      return 'cudnn', 'natural positions, no segments'
    return fallback, ('cuDNN here takes no segment ids (packed or padded rows)' if segments
                      else 'cuDNN needs natural positions')
  if platform == 'tpu':
    if not permuted:
      return 'splash', ('positions run 0..n-1 within each segment: static causal/local '
                        'masks plus segment ids' if segments else 'natural positions')
    return fallback, 'positions are permuted or offset (splash masks are static)'
  if not long and causal and T == S and not permuted:
    return 'chunked', (f'no fused kernel on {platform}; causal self-attention in index order: '
                       'query chunks skip the keys after them')
  return fallback, f'no fused kernel on {platform}'


def resolve_impl(impl: str, *, T: int, S: int, mesh=None, custom_positions: bool = False,
                 segments: bool = False, segment_positions: bool = False,
                 causal: bool = True) -> str:
  """The concrete kernel `auto` stands for in this setting (others: unchanged)."""
  return choose_impl(impl, T=T, S=S, mesh=mesh, custom_positions=custom_positions,
                     segments=segments, segment_positions=segment_positions, causal=causal)[0]


def prefill_impl(impl: str, T: int, *, mesh=None, platform: str | None = None) -> str | None:
  """The kernel for a prefill from an empty KV cache run as self-attention over its T
  tokens (positions 0..n-1 within each segment, segment ids for the padding), or None
  where only attending over the whole cache buffer applies: ring (decoding shards no
  sequence), splash (its blocks must divide T) and cudnn (no segment ids)."""
  if impl not in ('auto', 'dense', 'blockwise', 'chunked'):
    return None
  kernel = choose_impl(impl, T=T, S=T, mesh=mesh, custom_positions=True, segments=True,
                       segment_positions=True, platform=platform)[0]
  return kernel if kernel in ('dense', 'blockwise', 'chunked') else None


def attend(
    q_BxTxHxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    *,
    impl: str = 'dense',
    causal: bool = True,
    sliding_window: int | None = None,
    segment_ids: jax.Array | None = None,
    mesh: jax.sharding.Mesh | None = None,
    q_positions_BxT: jax.Array | None = None,
    kv_positions_BxS: jax.Array | None = None,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    scale: float | None = None,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
    ring_layout: str = 'natural',
    segment_positions: bool = False,
) -> jax.Array:
  """Multi-head attention with grouped-query heads: [B,T,H,E] x [B,S,K,E] -> [B,T,H,E].

  segment_ids [B, T]: self-attention shorthand for q_ and kv_segment_ids; tokens attend
  only within their own segment (packing, padding, empty cache slots). Positions
  default to 0..T-1 and 0..S-1; pass them when decoding from a cache or when the
  sequence is permuted. mesh: for `ring` (its `context` axis carries the sequence, in
  natural order unless ring_layout='zigzag'); defaults to the mesh set by jax.set_mesh.
  segment_positions: the positions given run 0..n-1 within each segment, segments in row
  order (see the module docstring): splash may then take the segment ids alone.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f'attention impl={impl!r} is not available; choose one of {IMPLEMENTATIONS}')
  B, T, H, _ = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if H % K:
    raise ValueError(f'query heads ({H}) must be a multiple of key/value heads ({K})')
  if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
    raise ValueError(f'sliding_window={sliding_window!r} must be None or a positive int')
  if segment_ids is not None:
    if q_segment_ids_BxT is not None or kv_segment_ids_BxS is not None or T != S:
      raise ValueError('segment_ids is the self-attention shorthand: give either it or '
                       'q_segment_ids_BxT/kv_segment_ids_BxS, and only when T == S')
    q_segment_ids_BxT = kv_segment_ids_BxS = segment_ids
  custom_positions = q_positions_BxT is not None or kv_positions_BxS is not None
  segments = q_segment_ids_BxT is not None or kv_segment_ids_BxS is not None
  impl = resolve_impl(impl, T=T, S=S, mesh=mesh, custom_positions=custom_positions,
                      segments=segments, segment_positions=segment_positions, causal=causal)
  if impl == 'chunked' and (not causal or T != S or (custom_positions and not segment_positions)):
    raise ValueError("attention impl='chunked' needs causal self-attention in index order "
                     f'(causal={causal}, T={T}, S={S}, positions '
                     f"{'given without segment_positions=True' if custom_positions else 'natural'})"
                     ": use 'dense' or 'blockwise'")

  if impl == 'cudnn':
    return attend_cudnn(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, causal=causal,
                        sliding_window=sliding_window, scale=scale,
                        custom_mask=custom_positions or segments)
  if impl == 'splash':
    if q_segment_ids_BxT is not None and kv_segment_ids_BxS is not q_segment_ids_BxT:
      raise ValueError("attention impl='splash' takes self-attention segment_ids only")
    return attend_splash(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, segment_ids_BxT=q_segment_ids_BxT,
                         causal=causal, sliding_window=sliding_window, scale=scale,
                         custom_positions=custom_positions and not segment_positions,
                         block_q=block_q,
                         block_kv=block_kv)

  if q_positions_BxT is None:
    q_positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if kv_positions_BxS is None:
    kv_positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  if q_segment_ids_BxT is None:
    q_segment_ids_BxT = jnp.zeros((B, T), jnp.int32)
  if kv_segment_ids_BxS is None:
    kv_segment_ids_BxS = jnp.zeros((B, S), jnp.int32)
  masks = dict(q_positions_BxT=q_positions_BxT, kv_positions_BxS=kv_positions_BxS,
               q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS,
               causal=causal, sliding_window=sliding_window, scale=scale)
  if impl == 'dense':
    return attend_dense(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, **masks)
  if impl == 'chunked':
    return attend_chunked(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, **masks)
  if impl == 'blockwise':
    return attend_blockwise(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, block_q=block_q,
                            block_kv=block_kv, **masks)
  return ring_attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, mesh=_context_mesh(mesh) or mesh,
                        layout=ring_layout, block_q=block_q, block_kv=block_kv, **masks)
