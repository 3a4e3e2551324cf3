"""The dense attention oracle against a plain numpy loop."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.attention import attend


def numpy_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window):
  B, T, H, D = q.shape
  K = k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      for h in range(H):
        kh = h // (H // K)
        ok = (kv_seg[b] == q_seg[b, t]) & (kv_pos[b] <= q_pos[b, t])
        if window is not None:
          ok &= kv_pos[b] > q_pos[b, t] - window
        s = (k[b, :, kh] @ q[b, t, h]) / np.sqrt(D)
        s = np.where(ok, s, -np.inf)
        p = np.exp(s - s.max())
        out[b, t, h] = (p / p.sum()) @ v[b, :, kh]
  return out


@pytest.mark.parametrize('window', [None, 5])
def test_dense_matches_numpy_with_gqa_segments_and_offsets(window):
  rs = np.random.RandomState(0)
  B, T, S, H, K, D = 2, 6, 11, 4, 2, 8
  q = rs.randn(B, T, H, D).astype(np.float32)
  k, v = rs.randn(2, B, S, K, D).astype(np.float32)
  # Keys 0..10; queries are the last 6 (decoding against a cache), with a packed
  # second segment starting at key 7 in row 1.
  kv_pos = np.tile(np.arange(S), (B, 1))
  kv_seg = np.zeros((B, S), np.int32)
  kv_seg[1, 7:] = 1
  kv_pos[1, 7:] = np.arange(4)
  q_pos, q_seg = kv_pos[:, -T:], kv_seg[:, -T:]
  got = attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), q_positions_BxT=jnp.asarray(q_pos),
               kv_positions_BxS=jnp.asarray(kv_pos), q_segment_ids_BxT=jnp.asarray(q_seg),
               kv_segment_ids_BxS=jnp.asarray(kv_seg), sliding_window=window)
  want = numpy_attention(q, k, v, q_pos, kv_pos, q_seg, kv_seg, window)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_errors():
  x = jnp.zeros((1, 4, 3, 8))
  with pytest.raises(ValueError, match="impl='flash' is not available"):
    attend(x, x, x, impl='flash')
  with pytest.raises(ValueError, match=r'query heads \(3\) must be a multiple of key/value heads \(2\)'):
    attend(x, jnp.zeros((1, 4, 2, 8)), jnp.zeros((1, 4, 2, 8)))


# ----------------------------------------------------------------------------- kernels vs oracle

import jax  # noqa: E402
from jax.sharding import AxisType  # noqa: E402

from jaxlm.attention import attend_dense as dense_oracle  # noqa: E402
from jaxlm.attention.blockwise import _Problem  # noqa: E402
from jaxlm.attention.ring import from_zigzag, to_zigzag, zigzag_indices  # noqa: E402


def _inputs(B, T, H, K, D, dtype=jnp.float32, seed=0, packed=False):
  rs = np.random.RandomState(seed)
  q, k, v, ct = (jnp.asarray(rs.randn(B, T, n, D), dtype) for n in (H, K, K, H))
  pos = np.tile(np.arange(T), (B, 1))
  seg = np.ones((B, T), np.int32)
  if packed:  # three packed documents per row, positions restart in each
    cuts = [T // 3, T // 3 + T // 4]
    seg[:, cuts[0]:] = 2
    seg[:, cuts[1]:] = 3
    for c in cuts:
      pos[:, c:] -= pos[:, c:c + 1]
  return q, k, v, ct, jnp.asarray(pos), jnp.asarray(seg)


def _vjp(fn, q, k, v, ct):
  out, pullback = jax.vjp(fn, q, k, v)
  return (out,) + pullback(ct)


def _check(got, want, atol):
  for name, a, b in zip(('out', 'dq', 'dk', 'dv'), got, want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=atol,
                               rtol=0, err_msg=name)


@pytest.mark.parametrize('T', [64, 100])                 # a multiple of the block and not
@pytest.mark.parametrize('causal, window', [(True, None), (False, None), (True, 5), (True, 40),
                                            (False, 24)])
@pytest.mark.parametrize('packed', [False, True])
def test_blockwise_matches_dense(T, causal, window, packed):
  q, k, v, ct, pos, seg = _inputs(2, T, 4, 2, 16, packed=packed)
  kw = dict(q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg,
            kv_segment_ids_BxS=seg, causal=causal, sliding_window=window)
  want = _vjp(lambda q, k, v: dense_oracle(q, k, v, **kw), q, k, v, ct)
  got = _vjp(lambda q, k, v: attend(q, k, v, impl='blockwise', block_q=16, block_kv=24, **kw),
             q, k, v, ct)
  _check(got, want, 2e-5)


@pytest.mark.parametrize('T, chunk', [(64, 16), (100, 16), (100, 128)])   # even, ragged, one
@pytest.mark.parametrize('window', [None, 5, 40])
@pytest.mark.parametrize('packed', [False, True])
def test_chunked_matches_dense(T, chunk, window, packed):
  """Natural rows, and pipeline rows (positions 0..n-1 per segment, padding as segment 0
  with position 0 at the end): the oracle's values on every real token and its gradients
  of a loss on them (padding, which no loss reads, may differ: it sees only earlier pads)."""
  from jaxlm.attention.chunked import attend_chunked
  q, k, v, ct, pos, seg = _inputs(2, T, 4, 2, 16, packed=packed)
  if packed:
    seg = seg.at[:, T - 9:].set(0)
    pos = pos.at[:, T - 9:].set(0)
  real = (seg > 0)[..., None, None].astype(jnp.float32)
  kw = dict(q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg,
            kv_segment_ids_BxS=seg, sliding_window=window)
  want = _vjp(lambda q, k, v: dense_oracle(q, k, v, **kw) * real, q, k, v, ct)
  got = _vjp(lambda q, k, v: attend_chunked(q, k, v, chunk=chunk, **kw) * real, q, k, v, ct)
  _check(got, want, 2e-5)
  # through attend, as the model calls it
  got = _vjp(lambda q, k, v: attend(q, k, v, impl='chunked', q_positions_BxT=pos,
                                    kv_positions_BxS=pos, segment_ids=seg, sliding_window=window,
                                    segment_positions=True) * real, q, k, v, ct)
  _check(got, want, 2e-5)


def test_chunked_bfloat16_stays_close():
  q, k, v, ct, pos, seg = _inputs(2, 96, 4, 1, 32, dtype=jnp.bfloat16, packed=True)
  kw = dict(segment_ids=seg, sliding_window=33)
  want = _vjp(lambda *a: attend(*(x.astype(jnp.float32) for x in a), impl='dense', **kw),
              q, k, v, ct.astype(jnp.float32))
  got = _vjp(lambda *a: attend(*a, impl='chunked', **kw), q, k, v, ct)
  assert all(g.dtype == jnp.bfloat16 for g in got)
  _check(got, want, 6e-2)


def test_chunked_computes_only_the_keys_up_to_each_chunk():
  """The skipping is real: the compiled program's score matrices cover the causal band of
  chunks (T=256, chunks of 64: 64 x (64 + 128 + 192 + 256) scores per head), not T x T."""
  from jaxlm.attention.chunked import attend_chunked
  q, k, v, _, pos, seg = _inputs(1, 256, 2, 2, 8)
  kw = dict(q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg,
            kv_segment_ids_BxS=seg)
  hlo = jax.jit(lambda q, k, v: attend_chunked(q, k, v, chunk=64, **kw)).lower(q, k, v).as_text()
  for S in (64, 128, 192, 256):
    assert f'64x{S}xf32' in hlo, S   # StableHLO tensor<...x64x{S}xf32>
  flops = lambda f: jax.jit(f).lower(q, k, v).compile().cost_analysis()['flops']
  dense = flops(lambda q, k, v: dense_oracle(q, k, v, causal=True, **kw))
  chunked = flops(lambda q, k, v: attend_chunked(q, k, v, chunk=64, **kw))
  assert chunked < 0.7 * dense, (chunked, dense)


def test_blockwise_bfloat16_stays_close():
  q, k, v, ct, pos, seg = _inputs(2, 96, 4, 1, 32, dtype=jnp.bfloat16, packed=True)
  kw = dict(segment_ids=seg, sliding_window=33)
  want = _vjp(lambda *a: attend(*(x.astype(jnp.float32) for x in a), impl='dense', **kw),
              q, k, v, ct.astype(jnp.float32))
  got = _vjp(lambda *a: attend(*a, impl='blockwise', block_q=32, block_kv=32, **kw), q, k, v, ct)
  assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.bfloat16
  _check(got, want, 6e-2)


def test_blockwise_skips_invisible_blocks():
  """Causal: the upper triangle of blocks is skipped; with a window of 8 and blocks of 16
  only the diagonal and the block below it remain."""
  q, k, v, _, pos, seg = _inputs(1, 64, 2, 2, 8)
  causal = _Problem(q, k, v, pos, pos, seg, seg, True, None, None, 16, 16).visible
  np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
  window = _Problem(q, k, v, pos, pos, seg, seg, True, 8, None, 16, 16).visible
  np.testing.assert_array_equal(window, np.tril(np.ones((4, 4), bool)) & ~np.tril(np.ones((4, 4), bool), -2))
  assert _Problem(q, k, v, pos, pos, seg, seg, False, None, None, 16, 16).visible.all()


def _mesh(data, context):
  return jax.make_mesh((data, context), ('data', 'context'), axis_types=(AxisType.Auto,) * 2)


@pytest.mark.parametrize('data, context', [(4, 2), (2, 4), (1, 8)])
@pytest.mark.parametrize('causal, window', [(True, None), (True, 6), (False, None)])
def test_ring_matches_dense(data, context, causal, window):
  q, k, v, ct, pos, seg = _inputs(4, 64, 4, 2, 16, packed=True)
  kw = dict(q_positions_BxT=pos, kv_positions_BxS=pos, q_segment_ids_BxT=seg,
            kv_segment_ids_BxS=seg, causal=causal, sliding_window=window)
  want = _vjp(lambda q, k, v: dense_oracle(q, k, v, **kw), q, k, v, ct)
  mesh = _mesh(data, context)
  ring = jax.jit(lambda q, k, v: attend(q, k, v, impl='ring', mesh=mesh, block_q=8,
                                        block_kv=8, **kw))
  _check(_vjp(ring, q, k, v, ct), want, 2e-5)


def test_ring_zigzag_layout():
  x = jnp.arange(2 * 16).reshape(2, 16)
  np.testing.assert_array_equal(zigzag_indices(16, 4), [0, 1, 14, 15, 2, 3, 12, 13, 4, 5, 10,
                                                        11, 6, 7, 8, 9])
  np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 4), 4), x)
  # Pre-permuted inputs (what a trainer feeds) give the permuted natural-order result.
  q, k, v, _, pos, seg = _inputs(2, 32, 2, 2, 8)
  mesh = _mesh(2, 4)
  natural = attend(q, k, v, impl='ring', mesh=mesh, block_q=8, block_kv=8)
  z = lambda t: to_zigzag(t, 4)
  zig = attend(z(q), z(k), z(v), impl='ring', mesh=mesh, ring_layout='zigzag', block_q=8,
               block_kv=8, q_positions_BxT=z(pos), kv_positions_BxS=z(pos))
  np.testing.assert_allclose(from_zigzag(zig, 4), natural, atol=1e-6)


def test_ring_uses_the_context_mesh():
  q, k, v, _, _, _ = _inputs(2, 32, 2, 2, 8)
  with jax.set_mesh(_mesh(2, 4)):
    out = jax.jit(lambda q, k, v: attend(q, k, v, impl='ring', block_q=8, block_kv=8))(q, k, v)
  np.testing.assert_allclose(out, attend(q, k, v), atol=1e-5)


def test_splash_wrapper_in_interpret_mode_matches_dense():
  """The TPU kernel's wrapper, run by the Pallas interpreter on CPU."""
  from jaxlm.attention.splash import attend_splash
  q, k, v, _, pos, seg = _inputs(1, 256, 4, 2, 128, packed=True)
  for window in (None, 40):
    got = attend_splash(q, k, v, segment_ids_BxT=seg, sliding_window=window, block_q=128,
                        block_kv=128, interpret=True)
    # Natural positions across the packed row: splash's masks are static.
    nat = jnp.broadcast_to(jnp.arange(256), (1, 256))
    want = dense_oracle(q, k, v, q_positions_BxT=nat, kv_positions_BxS=nat,
                        q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg, causal=True,
                        sliding_window=window)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_kernel_errors():
  q, k, v, _, pos, seg = _inputs(2, 36, 2, 2, 8)
  with pytest.raises(ValueError, match='mesh context=4 but seq_len=36 is not divisible by 2\\*4'):
    attend(q, k, v, impl='ring', mesh=_mesh(2, 4))
  with pytest.raises(ValueError, match="impl='ring' needs a mesh with a 'context' axis"):
    attend(q, k, v, impl='ring')
  with pytest.raises(ValueError, match='block sizes must be positive multiples of 8, got block_q=12'):
    attend(q, k, v, impl='blockwise', block_q=12)
  with pytest.raises(ValueError, match='sliding_window=0 must be None or a positive int'):
    attend(q, k, v, sliding_window=0)
  with pytest.raises(ValueError, match="impl='cudnn' needs an NVIDIA GPU; this process has \\['cpu'\\]"):
    attend(q, k, v, impl='cudnn')
  with pytest.raises(ValueError, match="impl='splash' needs a TPU"):
    attend(q, k, v, impl='splash')
  assert attend(q, k, v, impl='auto').shape == q.shape   # CPU, short: chunked
  with pytest.raises(ValueError, match="impl='chunked' needs causal self-attention in index order "
                     r"\(causal=True, T=36, S=36, positions given without segment_positions"):
    attend(q, k, v, impl='chunked', q_positions_BxT=pos, kv_positions_BxS=pos)
  with pytest.raises(ValueError, match=r"impl='chunked' needs causal .*causal=False"):
    attend(q, k, v, impl='chunked', causal=False)


def test_ring_bfloat16_stays_close():
  q, k, v, ct, pos, seg = _inputs(2, 64, 4, 2, 32, dtype=jnp.bfloat16, packed=True)
  f32 = lambda *a: tuple(x.astype(jnp.float32) for x in a)
  want = _vjp(lambda q, k, v: attend(q, k, v, segment_ids=seg.astype(jnp.int32)),
              *f32(q, k, v, ct))
  ring = jax.jit(lambda q, k, v: attend(q, k, v, impl='ring', mesh=_mesh(2, 4),
                                        segment_ids=seg, block_q=8, block_kv=8))
  got = _vjp(ring, q, k, v, ct)
  assert got[0].dtype == jnp.bfloat16
  _check(got, want, 6e-2)


def test_splash_on_packed_rows_with_segment_positions_equals_the_oracle():
  """Pipeline rows (positions 0..n-1 per segment, padding as segment 0 at the end): splash
  with static masks and the segment ids computes the oracle's values on every real token
  and the oracle's gradients of a loss on them (Pallas interpreter on CPU)."""
  q, k, v, ct, pos, seg = _inputs(1, 256, 4, 2, 128, packed=True)
  seg = seg.at[:, 230:].set(0)               # padding: segment 0, positions 0
  pos = pos.at[:, 230:].set(0)
  real = (seg > 0)[..., None, None].astype(jnp.float32)
  for window in (None, 40):
    splash = lambda q, k, v: attend(q, k, v, impl='splash', q_positions_BxT=pos,
                                    kv_positions_BxS=pos, segment_ids=seg,
                                    segment_positions=True, sliding_window=window)
    oracle = lambda q, k, v: dense_oracle(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos,
                                          q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
                                          causal=True, sliding_window=window)
    import jaxlm.attention.splash as sp
    with pytest.MonkeyPatch.context() as m:   # the TPU kernel, interpreted
      m.setattr(sp, '_on_tpu', lambda: True)
      real_kernel = sp._kernel
      m.setattr(sp, '_kernel', lambda *a: real_kernel(*a[:-1], True))
      got = _vjp(lambda q, k, v: splash(q, k, v) * real, q, k, v, ct)
    want = _vjp(lambda q, k, v: oracle(q, k, v) * real, q, k, v, ct)
    _check(got, want, atol=2e-5)


def test_auto_says_which_kernel_and_why():
  from jaxlm.attention import choose_impl
  train = dict(T=4096, S=4096, custom_positions=True, segments=True)
  assert choose_impl('auto', **train, segment_positions=True, platform='tpu')[0] == 'splash'
  impl, why = choose_impl('auto', **train, platform='tpu')   # positions not per segment
  assert impl == 'blockwise' and 'permuted' in why
  impl, why = choose_impl('auto', **train, segment_positions=True, platform='gpu')
  assert impl == 'blockwise' and 'segment ids' in why
  assert choose_impl('auto', T=4096, S=4096, platform='gpu')[0] == 'cudnn'
  assert choose_impl('auto', **train, segment_positions=True, platform='cpu') == (
      'blockwise', 'no fused kernel on cpu')
  short = dict(T=512, S=512, custom_positions=True, segments=True)
  impl, why = choose_impl('auto', **short, segment_positions=True, platform='cpu')
  assert impl == 'chunked' and 'skip the keys after them' in why
  assert choose_impl('auto', T=512, S=512, platform='cpu')[0] == 'chunked'
  assert choose_impl('auto', **short, platform='cpu')[0] == 'dense'           # permuted
  assert choose_impl('auto', T=1, S=512, custom_positions=True, platform='cpu')[0] == 'dense'
  assert choose_impl('auto', T=512, S=512, causal=False, platform='cpu')[0] == 'dense'
  assert choose_impl('auto', **train, segment_positions=True, platform='tpu',
                     mesh=_mesh(2, 4))[0] == 'ring'


def test_splash_runs_per_device_on_a_mesh():
  """A Mosaic kernel cannot be partitioned by XLA: on a mesh, splash runs under shard_map
  (batch over data/fsdp, heads over tensor) and still equals the oracle."""
  import jaxlm.attention.splash as sp
  from jaxlm import sharding as shd
  q, k, v, ct, pos, seg = _inputs(2, 128, 4, 2, 128, packed=True)
  mesh = shd.make_mesh({'data': 1, 'fsdp': 2, 'tensor': 2, 'context': 1}, jax.devices()[:4])
  with pytest.MonkeyPatch.context() as m, jax.set_mesh(mesh):
    m.setattr(sp, '_on_tpu', lambda: True)
    real_kernel = sp._kernel
    m.setattr(sp, '_kernel', lambda *a: real_kernel(*a[:-1], True))
    fn = jax.jit(lambda q, k, v: attend(q, k, v, impl='splash', q_positions_BxT=pos,
                                        kv_positions_BxS=pos, segment_ids=seg,
                                        segment_positions=True, block_q=128, block_kv=128))
    got = _vjp(fn, q, k, v, ct)
  want = _vjp(lambda q, k, v: dense_oracle(q, k, v, q_positions_BxT=pos, kv_positions_BxS=pos,
                                           q_segment_ids_BxT=seg, kv_segment_ids_BxS=seg,
                                           causal=True), q, k, v, ct)
  _check(got, want, atol=2e-5)
