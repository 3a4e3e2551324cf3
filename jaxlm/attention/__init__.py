"""One attention entry point; kernels are selected by name.

Every implementation computes the same function as `dense.attend_dense` (the
oracle) and is tested against it. Later kernels (blockwise, ring, cuDNN, Pallas)
register here under their `impl` name.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.attention.dense import attend_dense, make_mask

IMPLEMENTATIONS = {
    'dense': attend_dense,
}

__all__ = ['attend', 'attend_dense', 'make_mask', 'IMPLEMENTATIONS']


def attend(
    q_BxTxHxD: jax.Array,
    k_BxSxKxD: jax.Array,
    v_BxSxKxD: jax.Array,
    *,
    impl: str = 'dense',
    q_positions_BxT: jax.Array | None = None,
    kv_positions_BxS: jax.Array | None = None,
    q_segment_ids_BxT: jax.Array | None = None,
    kv_segment_ids_BxS: jax.Array | None = None,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Multi-head attention with grouped-query heads: [B,T,H,D] x [B,S,K,D] -> [B,T,H,D].

  Positions default to 0..T-1 for queries and 0..S-1 for keys; pass them explicitly
  when decoding from a cache. Segment ids default to a single segment; tokens attend
  only within their own segment (packing, padding, empty cache slots).
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(
        f'attention impl={impl!r} is not available; choose one of {sorted(IMPLEMENTATIONS)}')
  B, T, H, _ = q_BxTxHxD.shape
  S, K = k_BxSxKxD.shape[1], k_BxSxKxD.shape[2]
  if H % K:
    raise ValueError(f'query heads ({H}) must be a multiple of key/value heads ({K})')
  if q_positions_BxT is None:
    q_positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  if kv_positions_BxS is None:
    kv_positions_BxS = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
  if q_segment_ids_BxT is None:
    q_segment_ids_BxT = jnp.zeros((B, T), jnp.int32)
  if kv_segment_ids_BxS is None:
    kv_segment_ids_BxS = jnp.zeros((B, S), jnp.int32)
  return IMPLEMENTATIONS[impl](
      q_BxTxHxD, k_BxSxKxD, v_BxSxKxD,
      q_positions_BxT=q_positions_BxT, kv_positions_BxS=kv_positions_BxS,
      q_segment_ids_BxT=q_segment_ids_BxT, kv_segment_ids_BxS=kv_segment_ids_BxS,
      causal=causal, sliding_window=sliding_window, scale=scale)
