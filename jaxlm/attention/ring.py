"""Ring attention: the sequence is sharded over a mesh axis (`context`); each device
keeps its query chunk and passes key/value chunks around the ring with
`lax.ppermute`, combining partial results with the online-softmax algebra (Liu et al.
2023). Per device, attention memory is O(T / n) and the local work is the blockwise
kernel (`blockwise.py`), so memory never holds a [T, T] matrix anywhere.

Gradients: a custom VJP runs the ring again backwards. Key/value chunks travel with
their gradient accumulators, so after n steps each dK/dV arrives back on the device
that owns the chunk; nothing of size T is stored per device.

Load balancing (causal): with the sequence split in natural order, device 0 would
have almost nothing to do (its queries see only its own keys) and device n-1 almost
everything. We use the zigzag layout: cut the sequence into 2n chunks and give device
d chunks d and 2n-1-d, so every device holds one early and one late chunk and does
the same work. Masks use token positions, which travel with the keys, so any layout
is correct and the layout only affects speed. `attend(impl='ring')` takes natural
order (the interface contract) and moves the chunks into zigzag order inside the
shard_map with two ppermutes (no device ever holds the whole sequence), moving the
output back the same way. A trainer can instead permute each batch once with `to_zigzag`
(tokens, targets, positions and segment ids alike; the loss is order-invariant and
RoPE uses the explicit positions) and pass `ring_layout='zigzag'`, which skips the
two per-layer permutations.

Skipping: a ring step whose key chunk is invisible to every local query (causally in
the future, wholly outside the sliding window, disjoint segments) does no compute;
inside a step, the blockwise kernel skips invisible blocks the same way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from jaxlm.attention.blockwise import (DEFAULT_BLOCK, NEG_INF, blockwise_backward,
                                       blockwise_forward)


def zigzag_indices(length: int, n: int) -> np.ndarray:
  """Permutation that lays a sequence out in zigzag order for an n-device ring:
  x_zigzag = x[..., zigzag_indices(T, n), ...]."""
  if length % (2 * n):
    raise ValueError(f'mesh context={n} but seq_len={length} is not divisible by 2*{n} '
                     f'(the zigzag layout cuts the sequence into 2*context chunks)')
  chunks = np.arange(length).reshape(2 * n, length // (2 * n))
  return np.concatenate([np.concatenate([chunks[d], chunks[2 * n - 1 - d]]) for d in range(n)])


def to_zigzag(x, n: int, axis: int = 1):
  return jnp.take(x, jnp.asarray(zigzag_indices(x.shape[axis], n)), axis=axis)


def from_zigzag(x, n: int, axis: int = 1):
  return jnp.take(x, jnp.asarray(np.argsort(zigzag_indices(x.shape[axis], n))), axis=axis)


def _zigzag_moves(n: int):
  """ppermute pairs that move chunks between the natural and zigzag layouts.

  Natural: device d holds chunks 2d, 2d+1. Zigzag: device d holds chunks d, 2n-1-d.
  Chunk c's zigzag home is c if c < n else 2n-1-c. Moving all even chunks is one
  permutation of devices, moving all odd chunks another.
  """
  home = lambda c: c if c < n else 2 * n - 1 - c
  even = [(c // 2, home(c)) for c in range(0, 2 * n, 2)]
  odd = [(c // 2, home(c)) for c in range(1, 2 * n, 2)]
  return even, odd


def _local_to_zigzag(x, axis: str, n: int):
  """Inside shard_map: [B, T/n, ...] natural-order shard -> this device's zigzag shard,
  with two ppermutes and no gather of the full sequence."""
  even, odd = _zigzag_moves(n)
  first, second = jnp.split(x, 2, axis=1)          # chunks 2d (even) and 2d+1 (odd)
  got_even = jax.lax.ppermute(first, axis, even)
  got_odd = jax.lax.ppermute(second, axis, odd)
  d_even = jax.lax.axis_index(axis) % 2 == 0       # device d keeps chunk d first
  return jnp.where(d_even, jnp.concatenate([got_even, got_odd], 1),
                   jnp.concatenate([got_odd, got_even], 1))


def _local_from_zigzag(x, axis: str, n: int):
  """Inverse of `_local_to_zigzag`."""
  even, odd = _zigzag_moves(n)
  first, second = jnp.split(x, 2, axis=1)          # chunks d and 2n-1-d
  d_even = jax.lax.axis_index(axis) % 2 == 0
  mine_even = jnp.where(d_even, first, second)
  mine_odd = jnp.where(d_even, second, first)
  back = lambda pairs: [(dst, src) for src, dst in pairs]
  return jnp.concatenate([jax.lax.ppermute(mine_even, axis, back(even)),
                          jax.lax.ppermute(mine_odd, axis, back(odd))], axis=1)


def _visible(q_pos, kv_pos, q_seg, kv_seg, causal, window):
  """Can any query here see any key there? (min/max test, as in blockwise)."""
  vis = (q_seg.min() <= kv_seg.max()) & (kv_seg.min() <= q_seg.max())
  if causal:
    vis &= kv_pos.min() <= q_pos.max()
  if window is not None:
    vis &= kv_pos.max() > q_pos.min() - window
  return vis


def _make_ring(axis: str, n: int, causal, window, scale, block_q, block_kv):
  """The per-device ring function (to run under shard_map) with its custom VJP."""
  perm = [(i, (i + 1) % n) for i in range(n)]
  rotate = lambda xs: jax.tree.map(lambda x: jax.lax.ppermute(x, axis, perm), xs)
  kw = dict(causal=causal, sliding_window=window, scale=scale, block_q=block_q,
            block_kv=block_kv)

  def forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    B, T, H, E = q.shape

    def step(carry, kv):
      out, lse = carry
      k, v, kv_pos, kv_seg = kv
      o_s, lse_s = jax.lax.cond(
          _visible(q_pos, kv_pos, q_seg, kv_seg, causal, window),
          lambda: blockwise_forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, **kw),
          lambda: (jnp.zeros_like(q), jnp.full((B, T, H), NEG_INF, jnp.float32)))
      new = jnp.logaddexp(lse, lse_s)
      out = (out * jnp.exp(lse - new)[..., None] +
             o_s.astype(jnp.float32) * jnp.exp(lse_s - new)[..., None])
      return out, new

    carry = (jnp.zeros((B, T, H, E), jnp.float32), jnp.full((B, T, H), NEG_INF, jnp.float32))
    kv = (k, v, kv_pos, kv_seg)
    carry = step(carry, kv)

    def body(_, state):
      carry, kv = state
      kv = rotate(kv)
      return step(carry, kv), kv

    (out, lse), _ = jax.lax.fori_loop(1, n, body, (carry, kv))
    return out.astype(q.dtype), lse

  @functools.partial(jax.custom_vjp)
  def ring(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    return forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)[0]

  def ring_fwd(q, k, v, q_pos, kv_pos, q_seg, kv_seg):
    out, lse = forward(q, k, v, q_pos, kv_pos, q_seg, kv_seg)
    return out, (q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse)

  def ring_bwd(res, dout):
    q, k, v, q_pos, kv_pos, q_seg, kv_seg, out, lse = res
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)

    def step(dq, kv, acc):
      k, v, kv_pos, kv_seg = kv
      dq_s, dk_s, dv_s = jax.lax.cond(
          _visible(q_pos, kv_pos, q_seg, kv_seg, causal, window),
          lambda: blockwise_backward(q, k, v, q_pos, kv_pos, q_seg, kv_seg, lse, delta, dout,
                                     **kw),
          lambda: (jnp.zeros(q.shape, jnp.float32), jnp.zeros(k.shape, jnp.float32),
                   jnp.zeros(v.shape, jnp.float32)))
      return dq + dq_s, (acc[0] + dk_s, acc[1] + dv_s)

    kv = (k, v, kv_pos, kv_seg)
    acc = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dq, acc = step(jnp.zeros(q.shape, jnp.float32), kv, acc)

    def body(_, state):
      dq, kv, acc = state
      kv, acc = rotate((kv, acc))      # gradients travel with their key/value chunk
      dq, acc = step(dq, kv, acc)
      return dq, kv, acc

    dq, _, acc = jax.lax.fori_loop(1, n, body, (dq, kv, acc))
    dk, dv = rotate(acc)               # the n-th hop brings them home
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None)

  ring.defvjp(ring_fwd, ring_bwd)
  return ring


def batch_and_head_axes(mesh, B: int, K: int, skip: str | None = None):
  """How a kernel run per device under shard_map splits [B, T, heads, E] on `mesh`:
  (batch axes, head axis). Heads go over `tensor` when the K key/value heads divide over
  it; the batch over every other axis (but `skip`) whose size divides it."""
  head_axis = 'tensor' if 'tensor' in mesh.axis_names and mesh.shape['tensor'] > 1 and \
      K % mesh.shape['tensor'] == 0 and skip != 'tensor' else None
  batch_axes, size = [], 1
  for name in mesh.axis_names:
    if name not in (skip, head_axis) and B % (size * mesh.shape[name]) == 0:
      batch_axes.append(name)
      size *= mesh.shape[name]
  return tuple(batch_axes), head_axis


def ring_attention(q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, *, q_positions_BxT, kv_positions_BxS,
                   q_segment_ids_BxT, kv_segment_ids_BxS, causal=True, sliding_window=None,
                   scale=None, mesh=None, axis: str = 'context', layout: str = 'natural',
                   block_q: int = DEFAULT_BLOCK, block_kv: int = DEFAULT_BLOCK):
  """Self-attention with the sequence sharded over `mesh` axis `axis`.

  layout='natural': inputs in sequence order (permuted to zigzag and back inside);
  layout='zigzag': inputs already in `to_zigzag` order (output in the same order).
  Heads are sharded over a `tensor` axis when the key/value heads divide over it; the
  batch over every other mesh axis whose size divides it.
  """
  mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or axis not in mesh.axis_names:
    raise ValueError(f"attention impl='ring' needs a mesh with a {axis!r} axis: pass mesh= "
                     f'or set one with jax.set_mesh (got {mesh})')
  if layout not in ('natural', 'zigzag'):
    raise ValueError(f"ring layout={layout!r} must be 'natural' or 'zigzag'")
  n = mesh.shape[axis]
  B, T = q_BxTxHxE.shape[:2]
  if k_BxTxKxE.shape[1] != T:
    raise ValueError(f'ring attention is self-attention: {T} queries but '
                     f'{k_BxTxKxE.shape[1]} keys')
  if T % (2 * n):
    raise ValueError(f'mesh context={n} but seq_len={T} is not divisible by 2*{n} '
                     f'(the zigzag layout cuts the sequence into 2*context chunks)')
  batch_axes, head_axis = batch_and_head_axes(mesh, B, k_BxTxKxE.shape[2], skip=axis)
  spec_x = P(batch_axes or None, axis, head_axis)
  spec_pos = P(batch_axes or None, axis)
  args = (q_BxTxHxE, k_BxTxKxE, v_BxTxKxE, q_positions_BxT, kv_positions_BxS,
          q_segment_ids_BxT, kv_segment_ids_BxS)
  ring = _make_ring(axis, n, causal, sliding_window, scale, block_q, block_kv)
  if layout == 'natural' and n > 1:
    def per_device(*local):
      local = tuple(_local_to_zigzag(x, axis, n) for x in local)
      return _local_from_zigzag(ring(*local), axis, n)
  else:
    per_device = ring
  return jax.shard_map(per_device, mesh=mesh, in_specs=(spec_x,) * 3 + (spec_pos,) * 4,
                       out_specs=spec_x, check_vma=False)(*args)
