"""How a float weight rounds to int8 or int4: the payload and the scales the kernels read."""

from __future__ import annotations

import torch

from pylomin.format.quant import KERNEL_DTYPE, Int8WeightOnly, Scheme, stored_shapes


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [out, in] -> (payload, scales) as stored: int8 [out, in] and bf16 [out]; or int4 packed by torch
    (uint8 [out, in/2]) and bf16 scales and zeros [in/group, out, 2] (w ~ (q - 8) * scale + zero)."""
    n, k = w.shape
    int8 = isinstance(scheme, Int8WeightOnly)
    q = torch.empty((n, k), dtype=torch.int8 if int8 else torch.int32)
    scales = torch.empty(stored_shapes(n, k, scheme)[1], dtype=KERNEL_DTYPE)
    # Rows a block at a time, into the outputs: the float math never holds more than a block.
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for i in range(0, n, rows):
        q[i : i + rows], block_scales = _quantize_rows(w[i : i + rows].detach().to(torch.float32), scheme)
        if int8:
            scales[i : i + rows] = block_scales
        else:
            scales[:, i : i + rows] = block_scales
    if int8:
        return q, scales
    # int4: torch packs the whole [N, in] matrix at once (its layout interleaves rows).
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), scales


_BLOCK_ELEMENTS = 2**20


def _quantize_rows(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [rows, in] fp32. Scales (and zeros) are rounded to bf16 first and the weights quantized
    # against the rounded values, so the kernel sees exactly what the rounding chose.
    tiny = torch.finfo(KERNEL_DTYPE).tiny
    if isinstance(scheme, Int8WeightOnly):
        scale = (w.abs().amax(dim=1) / 127).clamp(min=tiny).to(KERNEL_DTYPE)  # [rows]
        return (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale
    rows, k = w.shape
    g = scheme.group_size
    wg = w.reshape(rows, k // g, g)  # [rows, groups, g]
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=tiny).to(KERNEL_DTYPE)
    zero = (lo + 8 * scale.float()).to(KERNEL_DTYPE)
    q = ((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)
    scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [groups, rows, 2]
    return q.to(torch.int32).reshape(rows, k), scales_zeros
