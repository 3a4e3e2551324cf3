"""Dense reference attention: the oracle every faster kernel is tested against.

Masking is expressed through token positions and segment ids rather than a fixed
causal triangle, so the same function serves training (packed sequences),
prefill and cached decoding (queries at the end of a longer key buffer), and
sequence layouts that are permuted for load balancing.
"""

from __future__ import annotations

import jax


def make_mask(
    q_positions_BxT: jax.Array,
    kv_positions_BxS: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    *,
    causal: bool,
    sliding_window: int | None,
) -> jax.Array:
  """Boolean mask [B, T, S]: True where query t may attend to key s.

  A key is visible when it is in the same segment as the query and, if causal, at
  a position not after the query's. With a sliding window W (Hugging Face's
  convention: the window includes the current token), only keys with
  q_pos - W < kv_pos are visible.
  """
  q_pos = q_positions_BxT[:, :, None]
  kv_pos = kv_positions_BxS[:, None, :]
  mask = q_segment_ids_BxT[:, :, None] == kv_segment_ids_BxS[:, None, :]
  if causal:
    mask &= kv_pos <= q_pos
  if sliding_window is not None:
    mask &= kv_pos > q_pos - sliding_window
  return mask


def attend_dense(
    q_BxTxHxE: jax.Array,
    k_BxSxKxE: jax.Array,
    v_BxSxKxE: jax.Array,
    *,
    q_positions_BxT: jax.Array,
    kv_positions_BxS: jax.Array,
    q_segment_ids_BxT: jax.Array,
    kv_segment_ids_BxS: jax.Array,
    causal: bool = True,
    sliding_window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Exact softmax attention with grouped-query heads (H a multiple of K).

  Materializes the [B, H, T, S] score matrix; use it as the reference and for short
  sequences. Returns [B, T, H, E] in the dtype of q.
  """
  mask_BxTxS = make_mask(
      q_positions_BxT, kv_positions_BxS, q_segment_ids_BxT, kv_segment_ids_BxS,
      causal=causal, sliding_window=sliding_window)
  return jax.nn.dot_product_attention(
      q_BxTxHxE, k_BxSxKxE, v_BxSxKxE,
      mask=mask_BxTxS[:, None, :, :], scale=scale, implementation='xla')
