"""How a float weight rounds to int8 or int4: the payload and the scales the kernels read."""

from __future__ import annotations

import torch

from pylomin.format.quant import KERNEL_DTYPE, Int8WeightOnly, Scheme, stored_shapes


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [out, in] -> (payload, scales) as stored: int8 [out, in] and bf16 [out]; or int4 packed by torch
    (uint8 [out, in/2]) and bf16 scales and zeros [in/group, out, 2] (w ~ (q - 8) * scale + zero)."""
    n, k = w.shape
    int8 = isinstance(scheme, Int8WeightOnly)
    group = 0 if isinstance(scheme, Int8WeightOnly) else scheme.group_size
    q = torch.empty((n, k), dtype=torch.int8 if int8 else torch.int32)
    scales = torch.empty(stored_shapes(n, k, scheme)[1], dtype=KERNEL_DTYPE)
    # Rows a block at a time, into the outputs: the float math never holds more than a few blocks.
    rows = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for i in range(0, n, rows):
        block = w[i : i + rows].detach().to(torch.float32)
        if int8:
            q[i : i + rows], scales[i : i + rows] = _int8_rows(block)
        else:
            q[i : i + rows], scales[:, i : i + rows] = _int4_rows(block, group)
    if int8:
        return q, scales
    # int4: torch packs the whole [N, in] matrix at once (its layout interleaves rows).
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), scales


_BLOCK_ELEMENTS = 2**20
_TINY = torch.finfo(KERNEL_DTYPE).tiny

# int4's search: each group's [min, max] with either end shrunk toward zero by each factor (4 x 4
# ranges, the full one first), then least-squares refits of scale and zero to the levels chosen: 20
# roundings of each block. On the stdlib-trained Llama's projections it cuts the squared weight
# error to 0.82x round-to-nearest min/max's at groups of 32 and 0.84x at 64, and the KL divergence
# from fp32's next token to 0.82x and 0.94x (benchmarks/quant_trained.py); HQQ's zero-point solver
# (20 steps, p = 0.7) reached 0.89x and 0.92x of the weight error, a clip search of 20 factors
# on both ends together 0.93x and 0.92x. int8 keeps its absmax scale per row: a clip search of 8
# factors gained 0.01 % there.
_SHRINK = (1.0, 0.9, 0.8, 0.7)
_REFITS = 4


def _int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [rows, in] fp32. The scale is rounded to bf16 first and the weights quantized against the
    # rounded value, so the kernel sees exactly what the rounding chose.
    scale = (w.abs().amax(dim=1) / 127).clamp(min=_TINY).to(KERNEL_DTYPE)  # [rows]
    return (w / scale.float()[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale


def _int4_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    # w: [rows, in] fp32 -> levels int32 [rows, in] and bf16 (scale, zero) [groups, rows, 2]. Every
    # candidate's scale and zero are rounded to bf16 before its levels and error are computed, and a
    # group moves to a candidate only on a strictly lower error: never worse than the full range.
    rows, k = w.shape
    wg = w.reshape(rows, k // group, group)  # [rows, groups, g]
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale, zero = _scale_zero(lo, hi)
    err = _error(wg, scale, zero)
    for a in _SHRINK:
        for b in _SHRINK:
            if a == b == 1.0:
                continue
            s, z = _scale_zero(lo * a, hi * b)
            scale, zero, err = _keep_better(wg, s, z, scale, zero, err)
    for _ in range(_REFITS):
        s, z = _refit(wg, _levels(wg, scale, zero), scale, zero)
        scale, zero, err = _keep_better(wg, s, z, scale, zero, err)
    q = _levels(wg, scale, zero).to(torch.int32).reshape(rows, k)
    return q, torch.stack([scale, zero], dim=-1).transpose(0, 1)  # [groups, rows, 2]


def _scale_zero(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # The bf16 scale and zero that map levels 0..15 onto [lo, hi] (zero is level 8's value).
    scale = ((hi - lo) / 15).clamp(min=_TINY).to(KERNEL_DTYPE)
    return scale, (lo + 8 * scale.float()).to(KERNEL_DTYPE)


def _levels(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # wg: [rows, groups, g]; scale, zero: bf16 [rows, groups] -> levels 0..15 as fp32 [rows, groups, g].
    return ((wg - zero.float()[..., None]) / scale.float()[..., None] + 8).round_().clamp_(0, 15)


def _error(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    # The squared error of the group rounded against (scale, zero), dequantized: [rows, groups]. With
    # t = (w - zero) / scale, the error is scale^2 * sum((round(t) - t)^2), levels clamped to -8..7:
    # half the passes over the block of dequantizing, the search's cost.
    s = scale.float()
    inv = s.reciprocal()[..., None]
    t = torch.addcmul(-zero.float()[..., None] * inv, wg, inv)
    d = t.round().clamp_(-8, 7).sub_(t)
    return torch.linalg.vecdot(d, d) * s.square()


def _keep_better(
    wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, err: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The candidate (s, z) where it rounds the group with a strictly lower error, else the current one.
    e = _error(wg, s, z)
    better = e < err
    return torch.where(better, s, scale), torch.where(better, z, zero), torch.where(better, e, err)


def _refit(
    wg: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # The least-squares scale and zero for fixed levels (w ~ (q - 8) * s + z), rounded to bf16; a
    # group whose levels are all equal keeps its own.
    x = q - 8
    n = wg.shape[-1]
    sx, sw = x.sum(-1), wg.sum(-1)
    sxx, sxw = x.square().sum(-1), (x * wg).sum(-1)
    det = n * sxx - sx * sx
    solvable = det > 0
    s = torch.where(solvable, (n * sxw - sx * sw) / det.clamp(min=1), scale.float())
    z = torch.where(solvable, (sw - s * sx) / n, zero.float())
    return s.clamp(min=_TINY).to(KERNEL_DTYPE), z.to(KERNEL_DTYPE)
