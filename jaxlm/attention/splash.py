"""Pallas splash attention on TPU (jax.experimental.pallas.ops.tpu.splash_attention).

Thin by design: causal, sliding-window and full masks are static block-sparse masks,
so sequences must be in natural order (positions 0..T-1); segment ids (packing) are
supported natively. Grouped-query heads use the MQA kernel per key/value head.
`interpret=True` runs the same kernel in the Pallas interpreter on any backend (slow;
the tests use it on CPU to check this wrapper against the dense oracle).
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp


@functools.lru_cache(maxsize=32)
def _kernel(T: int, S: int, G: int, causal: bool, window, block_q: int, block_kv: int,
            interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  if window is not None:
    mask = sa.LocalMask((T, S), (window - 1, 0 if causal else None), offset=0)
  elif causal:
    mask = sa.CausalMask((T, S))
  else:
    mask = sa.FullMask((T, S))
  bq, bk = min(block_q, T), min(block_kv, S)
  sizes = sa.BlockSizes(block_q=bq, block_kv=bk, block_kv_compute=bk, block_q_dkv=bq,
                        block_kv_dkv=bk, block_kv_dkv_compute=bk, block_q_dq=bq,
                        block_kv_dq=bk)
  return sa.make_splash_mqa_single_device(mask=sa.MultiHeadMask([mask] * G),
                                          block_sizes=sizes, interpret=interpret)


_TPU_TOPOLOGY = [False]   # set while compiling ahead of time for TPU devices elsewhere


@contextlib.contextmanager
def compiling_for_tpu():
  """Within: the kernel may be traced on a host without TPUs, for an ahead-of-time compile
  for a TPU topology (jaxlm.aot with libtpu)."""
  _TPU_TOPOLOGY[0] = True
  try:
    yield
  finally:
    _TPU_TOPOLOGY[0] = False


def _on_tpu() -> bool:
  return _TPU_TOPOLOGY[0] or 'tpu' in {d.platform for d in jax.devices()}


def attend_splash(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, *, segment_ids_BxT=None, causal=True,
                  sliding_window=None, scale=None, custom_positions: bool = False,
                  block_q: int = 512, block_kv: int = 512, interpret: bool = False):
  if not interpret and not _on_tpu():
    raise ValueError(f"attention impl='splash' needs a TPU; this process has "
                     f'{sorted({d.platform for d in jax.devices()})} devices '
                     f'(use dense or blockwise)')
  if custom_positions:
    raise ValueError("attention impl='splash' needs natural positions (0..T-1); permuted or "
                     "offset positions need impl='blockwise'")
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  B, T, H, E = q_BxTxHxE.shape
  S, K = k_BxSxKxE.shape[1], k_BxSxKxE.shape[2]
  G = H // K
  kernel = _kernel(T, S, G, causal, sliding_window, block_q, block_kv, interpret)
  scale = E ** -0.5 if scale is None else scale
  q = jnp.einsum('btkgd->bkgtd', (q_BxTxHxE * scale).reshape(B, T, K, G, E))
  k = jnp.einsum('bskd->bksd', k_BxSxKxE)
  v = jnp.einsum('bskd->bksd', v_BxSxKxE)
  seg = (jnp.zeros((B, T), jnp.int32) if segment_ids_BxT is None
         else segment_ids_BxT.astype(jnp.int32))

  def one(q_GxTxE, k_SxE, v_SxE, seg_T):
    return kernel(q_GxTxE, k_SxE, v_SxE, segment_ids=sa.SegmentIds(q=seg_T, kv=seg_T))

  per_head = jax.vmap(one, in_axes=(0, 0, 0, None))             # over key/value heads
  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0))          # over the batch
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or mesh.size == 1:
    out = per_batch(q, k, v, seg)
  else:   # a Mosaic kernel runs per device: the batch and the heads split over the mesh
    from jax.sharding import PartitionSpec as P
    from jaxlm.attention.ring import batch_and_head_axes
    batch, heads = batch_and_head_axes(mesh, B, K, skip='context')
    spec = P(batch or None, heads)   # [B, K, ...] after the einsums above
    out = jax.shard_map(per_batch, mesh=mesh, in_specs=(spec, spec, spec, P(batch or None)),
                        out_specs=spec, check_vma=False)(q, k, v, seg)
  return jnp.einsum('bkgtd->btkgd', out).reshape(B, T, H, E).astype(q_BxTxHxE.dtype)
