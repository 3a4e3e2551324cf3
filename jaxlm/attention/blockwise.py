"""Memory-efficient exact attention: blocks of queries against blocks of keys with an
online softmax (Milakov & Gimelshein 2018; Rabe & Staats 2021; FlashAttention).

Never materializes the [T, S] score matrix: the forward keeps a running max `m`, sum
`l` and output accumulator per query; the backward (a custom VJP) recomputes each
block's probabilities from the saved log-sum-exp, so memory is O(T * block) per head
instead of O(T * S).

Masking is the oracle's (`dense.make_mask`): positions and segment ids. A (query
block, key block) pair is skipped, not just masked, when no pair in it can be
visible: causally in the future, wholly outside the sliding window, or in disjoint
segment-id ranges. The test runs on per-block min/max positions and segment ids,
so it also holds for permuted layouts (ring attention's zigzag order).

Rows with no visible key at all (only padding can produce them) give zeros here,
where the dense oracle gives the mean of the values; real tokens always see
themselves.

`blockwise_forward` / `blockwise_backward` are exposed for ring attention, which
combines partial results across devices with the same log-sum-exp algebra.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxlm.attention.dense import make_mask

NEG_INF = -1e30   # finite: masked scores must not make exp(-inf - -inf) = nan
DEFAULT_BLOCK = 512


def _ceil_to(n: int, b: int) -> int:
  return -(-n // b) * b


def _blocks(x, n, block, pad_value=0):
  """[B, T, ...] -> [n, B, block, ...] with padding at the end of T."""
  pad = n * block - x.shape[1]
  if pad:
    widths = [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, widths, constant_values=pad_value) if pad_value != 'edge' else \
        jnp.pad(x, widths, mode='edge')
  x = x.reshape(x.shape[0], n, block, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _unblock(x, length):
  """[n, B, block, ...] -> [B, length, ...]."""
  x = jnp.moveaxis(x, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


class _Problem:
  """Blocked operands and the static block-visibility inputs of one attention call."""

  def __init__(self, q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale,
               block_q, block_kv):
    B, T, H, E = q.shape
    S, K = k.shape[1], k.shape[2]
    self.T, self.S, self.H, self.K, self.G, self.E = T, S, H, K, H // K, E
    self.causal, self.window = causal, window
    self.scale = E ** -0.5 if scale is None else scale
    self.bq, self.bk = min(block_q, _ceil_to(T, 8)), min(block_kv, _ceil_to(S, 8))
    self.nq, self.nk = -(-T // self.bq), -(-S // self.bk)
    q = q.reshape(B, T, K, self.G, E)
    self.q = _blocks(q, self.nq, self.bq)                      # [nq, B, bq, K, G, E]
    self.k = _blocks(k, self.nk, self.bk)                      # [nk, B, bk, K, E]
    self.v = _blocks(v, self.nk, self.bk)
    # Padding: positions repeat the edge (ranges stay tight), segment ids never match.
    self.q_pos = _blocks(q_pos, self.nq, self.bq, 'edge')      # [nq, B, bq]
    self.kv_pos = _blocks(kv_pos, self.nk, self.bk, 'edge')
    self.q_seg = _blocks(q_seg, self.nq, self.bq, -1)
    self.kv_seg = _blocks(kv_seg, self.nk, self.bk, -2)
    self.visible = self._visibility()                          # [nq, nk] bool

  def _visibility(self):
    qp_min, qp_max = self.q_pos.min((1, 2)), self.q_pos.max((1, 2))
    kp_min, kp_max = self.kv_pos.min((1, 2)), self.kv_pos.max((1, 2))
    qs_min, qs_max = self.q_seg.min((1, 2)), self.q_seg.max((1, 2))
    ks_min, ks_max = self.kv_seg.min((1, 2)), self.kv_seg.max((1, 2))
    vis = (qs_min[:, None] <= ks_max[None]) & (ks_min[None] <= qs_max[:, None])
    if self.causal:
      vis &= kp_min[None] <= qp_max[:, None]
    if self.window is not None:
      vis &= kp_max[None] > qp_min[:, None] - self.window
    return vis

  def scores(self, i, j):
    """Masked, scaled scores of q block i against kv block j: [B, K, G, bq, bk] f32."""
    s = jnp.einsum('bqkgd,bskd->bkgqs', self.q[i], self.k[j],
                   preferred_element_type=jnp.float32) * self.scale
    mask = make_mask(self.q_pos[i], self.kv_pos[j], self.q_seg[i], self.kv_seg[j],
                     causal=self.causal, sliding_window=self.window)[:, None, None]
    return jnp.where(mask, s, NEG_INF), mask


def _forward(p: _Problem):
  """Output blocks [nq, B, bq, K, G, E] (q dtype) and lse blocks [nq, B, K, G, bq] (f32)."""
  B = p.q.shape[1]

  def q_block(i):
    def kv_step(j, carry):
      def compute(carry):
        m, l, acc = carry
        s, mask = p.scores(i, j)
        m_new = jnp.maximum(m, s.max(-1))
        prob = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum('bkgqs,bskd->bkgqd', prob.astype(p.v.dtype), p.v[j],
                        preferred_element_type=jnp.float32)
        return m_new, l * corr + prob.sum(-1), acc * corr[..., None] + pv
      return jax.lax.cond(p.visible[i, j], compute, lambda c: c, carry)

    shape = (B, p.K, p.G, p.bq)
    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape + (p.E,), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, p.nk, kv_step, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    out = jnp.where((l > 0)[..., None], acc / safe_l[..., None], 0.0)
    lse = jnp.where(l > 0, m + jnp.log(safe_l), NEG_INF)
    return jnp.einsum('bkgqd->bqkgd', out).astype(p.q.dtype), lse

  return jax.lax.map(q_block, jnp.arange(p.nq))


def _backward(p: _Problem, lse, delta, dout):
  """Gradients from saved lse [nq,B,K,G,bq], delta = rowsum(dout*out) (same shape) and
  dout blocks [nq, B, bq, K, G, E]. Returns blocked (dq, dk, dv) in f32."""

  def kv_block(dq, j):
    def q_step(i, carry):
      def compute(carry):
        dq, dk, dv = carry
        s, mask = p.scores(i, j)
        prob = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)   # [B,K,G,bq,bk]
        do = dout[i].astype(jnp.float32)
        dv = dv + jnp.einsum('bkgqs,bqkgd->bskd', prob, do)
        dp = jnp.einsum('bqkgd,bskd->bkgqs', do, p.v[j].astype(jnp.float32))
        ds = prob * (dp - delta[i][..., None]) * p.scale
        dq = dq.at[i].add(jnp.einsum('bkgqs,bskd->bqkgd', ds, p.k[j].astype(jnp.float32)))
        dk = dk + jnp.einsum('bkgqs,bqkgd->bskd', ds, p.q[i].astype(jnp.float32))
        return dq, dk, dv
      return jax.lax.cond(p.visible[i, j], compute, lambda c: c, carry)

    zeros = jnp.zeros(p.k.shape[1:], jnp.float32)
    dq, dk, dv = jax.lax.fori_loop(0, p.nq, q_step, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(p.q.shape, jnp.float32), jnp.arange(p.nk))
  return dq, dk, dv


def blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, *, causal, sliding_window, scale,
                      block_q=DEFAULT_BLOCK, block_kv=DEFAULT_BLOCK):
  """(out [B, T, H, E] in q's dtype, lse [B, T, H] f32) without autodiff support."""
  p = _Problem(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window, scale,
               block_q, block_kv)
  out, lse = _forward(p)
  B = q.shape[0]
  out = _unblock(out, p.T).reshape(B, p.T, p.H, p.E)
  lse = _unblock(jnp.einsum('nbkgq->nbqkg', lse), p.T).reshape(B, p.T, p.H)
  return out, lse


def blockwise_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, delta, dout, *, causal,
                       sliding_window, scale, block_q=DEFAULT_BLOCK, block_kv=DEFAULT_BLOCK):
  """(dq, dk, dv) in f32 given lse and delta = sum(dout * out, -1), both [B, T, H] f32.

  lse may come from a larger computation (ring attention's global log-sum-exp): the
  result is then this key block's contribution to the full gradient.
  """
  p = _Problem(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, sliding_window, scale,
               block_q, block_kv)
  B = q.shape[0]
  to_blocks = lambda x, pad: jnp.einsum('nbqkg->nbkgq', _blocks(
      x.reshape(B, p.T, p.K, p.G), p.nq, p.bq, pad))
  lse_b = to_blocks(lse, NEG_INF)
  delta_b = to_blocks(delta, 0.0)
  dout_b = _blocks(dout.reshape(B, p.T, p.K, p.G, p.E), p.nq, p.bq)
  dq, dk, dv = _backward(p, lse_b, delta_b, dout_b)
  return (_unblock(dq, p.T).reshape(B, p.T, p.H, p.E), _unblock(dk, p.S), _unblock(dv, p.S))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10, 11))
def _attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q, block_kv):
  return blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                           sliding_window=window, scale=scale, block_q=block_q,
                           block_kv=block_kv)[0]


def _attention_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal, window, scale, block_q,
                   block_kv):
  out, lse = blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, causal=causal,
                               sliding_window=window, scale=scale, block_q=block_q,
                               block_kv=block_kv)
  return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)


def _attention_bwd(causal, window, scale, block_q, block_kv, residuals, dout):
  q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = residuals
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
  dq, dk, dv = blockwise_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, delta, dout,
                                  causal=causal, sliding_window=window, scale=scale,
                                  block_q=block_q, block_kv=block_kv)
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def attend_blockwise(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, *, q_positions_BxT, kv_positions_BxS,
                     q_segment_ids_BxT, kv_segment_ids_BxS, causal=True, sliding_window=None,
                     scale=None, block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK):
  """Exact attention in O(T * block) memory; same contract as `dense.attend_dense`."""
  if block_q <= 0 or block_kv <= 0 or block_q % 8 or block_kv % 8:
    raise ValueError(f'block sizes must be positive multiples of 8, got block_q={block_q}, '
                     f'block_kv={block_kv}')
  return _attention(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, q_positions_BxT, kv_positions_BxS,
                    q_segment_ids_BxT, kv_segment_ids_BxS, causal, sliding_window, scale,
                    block_q, block_kv)
