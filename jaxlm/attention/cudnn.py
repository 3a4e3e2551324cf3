"""cuDNN flash attention on NVIDIA GPUs, through `jax.nn.dot_product_attention`.

Thin by design: the kernel takes the causal and sliding-window structure statically, so
it serves sequences in natural order (positions 0..T-1) and cannot express segment ids
(packing) or permuted layouts; those raise and should use `blockwise` (or `dense`).
Checked against the dense oracle by `python -m jaxlm.bench.attention_check` on a GPU.
"""

from __future__ import annotations

import jax


def attend_cudnn(q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, *, causal=True, sliding_window=None,
                 scale=None, custom_mask: bool = False):
  platforms = {d.platform for d in jax.devices()}
  if 'gpu' not in platforms:
    raise ValueError(f"attention impl='cudnn' needs an NVIDIA GPU; this process has "
                     f'{sorted(platforms)} devices (use dense or blockwise)')
  if custom_mask:
    raise ValueError("attention impl='cudnn' supports natural positions without segment ids "
                     "only; packed or permuted sequences need impl='blockwise'")
  window = None if sliding_window is None else (sliding_window - 1, 0 if causal else -1)
  if window is not None and not causal:
    raise ValueError("attention impl='cudnn' supports a sliding window only with causal=True")
  return jax.nn.dot_product_attention(
      q_BxTxHxE, k_BxSxKxE, v_BxSxKxE, scale=scale, is_causal=causal,
      local_window_size=window, implementation='cudnn')
