"""Plain-torch reference of the FactGraSS op: the ground truth for the kernels and the fallback.

Same arguments as ``grass_callback::factgrass``; see :func:`factgrass_reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 inputs accumulate (and return) in float64; everything else in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def factgrass_reference(x: Tensor, grad_out: Tensor, in_idx: Tensor, out_idx: Tensor,
                        bucket: Tensor, weight: Tensor, k: int, scale: Tensor | None = None) -> Tensor:
    """FactGraSS of every example: mask, small outer product summed over tokens, SJLT.

    Args:
        x: ``[B, T, d_in]`` layer inputs.
        grad_out: ``[B, T, d_out]`` gradients of the layer outputs, same dtype as ``x``.
        in_idx: int64 ``[k_in]`` sorted input mask; the value ``d_in`` is the constant-1 bias column.
        out_idx: int64 ``[k_out]`` sorted output mask.
        bucket: int32 ``[c, k_in k_out]`` SJLT targets in ``[0, k)``; flat index ``a k_in + b``.
        weight: float32 ``[c, k_in k_out]`` SJLT values (``±1/sqrt(c)``).
        k: output size.
        scale: optional float32 ``[B]`` per-example factor.

    Returns:
        ``[B, k]`` in float32 (float64 for float64 inputs).

    Memory is ``O(B T (k_in + k_out) + B k_in k_out)``: the gathered factors and the small
    products, never ``d_in d_out``.
    """
    acc = accumulation_dtype(x.dtype)
    d_in = x.shape[-1]
    has_bias = in_idx.numel() > 0 and int(in_idx[-1]) == d_in
    cols = in_idx[:-1] if has_bias else in_idx
    xs = x.index_select(-1, cols.to(x.device)).to(acc)
    if has_bias:
        xs = torch.cat([xs, xs.new_ones(*xs.shape[:-1], 1)], dim=-1)
    ds = grad_out.index_select(-1, out_idx.to(x.device)).to(acc)
    small = torch.bmm(ds.transpose(1, 2), xs).flatten(1)  # [B, k_out * k_in], e = a k_in + b
    out = small.new_zeros(small.shape[0], k)
    weight = weight.to(device=x.device, dtype=acc)
    for j in range(bucket.shape[0]):
        out.index_add_(1, bucket[j].to(device=x.device, dtype=torch.int64), small * weight[j])
    if scale is not None:
        out = out * scale.to(device=out.device, dtype=acc).unsqueeze(1)
    return out
