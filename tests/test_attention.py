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
