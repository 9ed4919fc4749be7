"""Weight-only int8 / int4 matrix kernels of the installed torch against fp32 and bf16 `F.linear`, on this CPU.

    .venv/bin/python scripts/bench_kernels.py [--quick]

For the shapes of a Llama-shaped decoder (hidden 1024, intermediate 2816, vocab 32000) at batch 1
(decode) and 128 (a prompt): the time of one product (median of repeats after a warm-up), the bytes
of the weights, and the relative error of the output against fp32. The kernels:

- `F.linear` in fp32 and in bf16;
- `torch.ops.aten._weight_int8pack_mm`: int8 weights [N, K], one scale per output channel
  (symmetric), activations bf16 or fp32;
- `torch.ops.aten._weight_int4pack_mm_for_cpu`: 4-bit weights packed by
  `_convert_weight_to_int4pack_for_cpu`, group-wise scale and zero (w = (q - 8) * scale + zero),
  bf16 activations, groups of 32 / 64 / 128.

No model, no files: random weights. The figures choose the kernels of compressed units.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

MIB = 2**20


def timed(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    """Median seconds of `fn` over `repeats` calls, after three warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def int8_weights(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8, one scale per output channel."""
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8), scale


def int4_weights(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed 4-bit weights and their [K / group, N, 2] bf16 scales and zeros."""
    n, k = w.shape
    wg = w.reshape(n, k // group, group)
    lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-8) / 15
    q = ((wg - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)
    zero = lo + 8 * scale
    scales_zeros = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1).contiguous()
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2), scales_zeros.to(torch.bfloat16)


Kernel = tuple[str, int, Callable[[], torch.Tensor]]  # name, bytes of the weights, one product


def candidates(
    x: torch.Tensor,
    w: torch.Tensor,
    w8: torch.Tensor,
    s8: torch.Tensor,
    packed: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> list[Kernel]:
    """Every kernel computing `x @ w.T` from its own copy of the weights."""
    xb, wb, s8b = x.to(torch.bfloat16), w.to(torch.bfloat16), s8.to(torch.bfloat16)
    out: list[Kernel] = [
        ("fp32 F.linear", w.nbytes, lambda: F.linear(x, w)),
        ("bf16 F.linear", wb.nbytes, lambda: F.linear(xb, wb)),
        ("int8, bf16 activations", w8.nbytes + s8b.nbytes, lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, s8b)),
        ("int8, fp32 activations", w8.nbytes + s8.nbytes, lambda: torch.ops.aten._weight_int8pack_mm(x, w8, s8)),
    ]

    def int4(group: int, p: torch.Tensor, sz: torch.Tensor) -> Kernel:
        return (
            f"int4 g{group}, bf16 activations",
            p.nbytes + sz.nbytes,
            lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, p, group, sz),
        )

    return out + [int4(g, p, sz) for g, (p, sz) in packed.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two small shapes, fewer repeats")
    args = ap.parse_args()
    shapes = [(1024, 1024), (2816, 1024), (1024, 2816), (32000, 1024)]  # (out N, in K)
    if args.quick:
        shapes = shapes[:2]
    repeats = 5 if args.quick else 30
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| N x K | batch | kernel | weights MiB | ms | vs fp32 | rel. error |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for n, k in shapes:
        w = torch.randn(n, k) / k**0.5
        w8, s8 = int8_weights(w)
        packed = {g: int4_weights(w, g) for g in (32, 64, 128)}
        for m in (1, 128):
            x = torch.randn(m, k)
            ref = F.linear(x, w)
            kernels = candidates(x, w, w8, s8, packed)
            base = None
            for name, nbytes, fn in kernels:
                seconds = timed(fn, repeats)
                base = base or seconds
                err = float((fn().float() - ref).norm() / ref.norm())
                print(
                    f"| {n} x {k} | {m} | {name} | {nbytes / MIB:.1f} | {seconds * 1e3:.2f} | {base / seconds:.2f}x"
                    f" | {err:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
