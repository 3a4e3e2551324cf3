"""Causal attention in query chunks: the CPU kernel for training-length sequences.

The dense oracle computes the whole [T, S] score matrix and masks the upper triangle;
on a CPU that matrix lives in memory, not cache, and every softmax pass streams it.
Here each chunk of queries attends densely to the keys from the first one its mask can
reach up to the last query of the chunk: the keys after it are never visible (causal),
nor, with a sliding window W, the keys W or more before the chunk's first query. Within
that range the mask is the oracle's (`dense.make_mask`: positions and segment ids), so
the result is the oracle's function; the work is about (T + chunk) / 2T of it for causal
attention, and each chunk's scores are small enough to stay in cache.

Skipping by index is exact only when a key at a later index than a query can never be
visible to it, and a key W indices before it never is: natural positions (0..T-1), or
positions that run 0..n-1 within each segment with the segments in row order (the data
pipeline's rows, `segment_positions=True` in `jaxlm.attention.attend`), where a
position difference within a segment equals the index difference. `attend` uses this
kernel only then.

Each chunk is one custom-VJP function whose backward is FlashAttention's algebra on the
saved probabilities (dS = P * (dO V^T - rowsum(dO * O)) * scale): fewer passes over the
chunk's scores than autodiff of the softmax. The probabilities are kept for the backward
pass (O(T^2 / 2) memory per head, as the oracle's O(T^2)): long sequences belong to
blockwise attention. Heads are laid out [B, K, G, T, E] once, so every chunk's products
are plain batched matrix products. Fully masked rows (padding only) give zeros, as in
blockwise.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.attention.dense import make_mask

DEFAULT_CHUNK = 64   # queries per chunk; the fastest of 32/64/128/256 on a 2-core AVX2 CPU


def _forward(q, k, v, mask, scale):
  """q [B,K,G,c,E], k/v [B,K,S,E], mask [B,1,1,c,S] -> (out f32, probabilities f32)."""
  s = jnp.einsum('bkgqd,bksd->bkgqs', q, k, preferred_element_type=jnp.float32) * scale
  s = jnp.where(mask, s, -jnp.inf)
  m = s.max(-1, keepdims=True)
  p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))     # fully masked rows: all zeros
  l = p.sum(-1, keepdims=True)
  p = p / jnp.where(l > 0, l, 1.0)
  out = jnp.einsum('bkgqs,bksd->bkgqd', p, v, preferred_element_type=jnp.float32)
  return out, p


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _chunk(q, k, v, mask, scale):
  return _forward(q, k, v, mask, scale)[0].astype(q.dtype)


def _chunk_fwd(q, k, v, mask, scale):
  out, p = _forward(q, k, v, mask, scale)
  return out.astype(q.dtype), (q, k, v, mask, p, out)


def _chunk_bwd(scale, residuals, dout):
  q, k, v, mask, p, out = residuals
  f32 = lambda x: x.astype(jnp.float32)
  do = f32(dout)
  dv = jnp.einsum('bkgqs,bkgqd->bksd', p, do)
  dp = jnp.einsum('bkgqd,bksd->bkgqs', do, f32(v))
  ds = p * (dp - jnp.sum(do * out, -1, keepdims=True)) * scale
  dq = jnp.einsum('bkgqs,bksd->bkgqd', ds, f32(k))
  dk = jnp.einsum('bkgqs,bkgqd->bksd', ds, f32(q))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_chunk.defvjp(_chunk_fwd, _chunk_bwd)


def attend_chunked(
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
    chunk: int = DEFAULT_CHUNK,
) -> jax.Array:
  """Self-attention (T == S, causal) in query chunks; the oracle's contract otherwise.

  The caller guarantees the index-order property of the module docstring."""
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  if not causal or T != S:
    raise ValueError(f"attention impl='chunked' is causal self-attention only (causal={causal},"
                     f' T={T}, S={S})')
  if chunk < 1:
    raise ValueError(f'chunk must be a positive number of queries, got {chunk}')
  G = H // K
  scale = E ** -0.5 if scale is None else float(scale)
  q = jnp.einsum('btkgd->bkgtd', q_BxTxHxE.reshape(B, T, K, G, E))
  k = jnp.einsum('bskd->bksd', k_BxSxKxE)
  v = jnp.einsum('bskd->bksd', v_BxSxKxE)
  outs = []
  for start in range(0, T, chunk):
    end = min(start + chunk, T)
    first = 0 if sliding_window is None else max(0, start - sliding_window + 1)
    mask = make_mask(q_positions_BxT[:, start:end], kv_positions_BxS[:, first:end],
                     q_segment_ids_BxT[:, start:end], kv_segment_ids_BxS[:, first:end],
                     causal=True, sliding_window=sliding_window)[:, None, None]
    outs.append(_chunk(q[:, :, :, start:end], k[:, :, first:end], v[:, :, first:end], mask,
                       scale))
  out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
  return jnp.einsum('bkgtd->btkgd', out).reshape(B, T, H, E)
