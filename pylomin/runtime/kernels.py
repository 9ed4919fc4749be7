"""The weight-only kernels quantized weights run with: torch's int8 and int4 products, and when a cast beats them."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pylomin.errors import PylominError
from pylomin.format.quant import KERNEL_DTYPE

# From this many rows of activations (a prompt) the int8 weight is cast to bf16 and run by bf16
# F.linear: the int8 kernel's time grows with the rows, the cast's does not. Measured (the machine of
# docs/benchmarks.md) on its 1.4 GiB Llama quantized in memory, one forward of 32 / 64 / 96 / 128 tokens: kernel
# 0.22 / 0.40 / 0.55 / 0.71 s, cast 0.35 / 0.42 / 0.45 / 0.54 s (fp32: 0.45 s at 128). (A lone
# 2816x1024 product crosses over at 32 rows, its weight hot in cache; in a model it comes from RAM.)
PROMPT_ROWS = 64


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [rows, in] @ the int8 weight [out, in] with its bf16 scales [out]: [rows, out]."""
    if x.device.type == "cpu" and x.shape[0] < PROMPT_ROWS:
        x = x.to(KERNEL_DTYPE).contiguous()
        # The kernel segfaults (torch 2.13, measured) on a bf16 input not 32-byte aligned with
        # AVX-512, not 16 with AVX2, even one row; and on an int8 weight not 16-byte aligned with
        # AVX-512, from 4 rows. Its result does not depend on the address, so what is not aligned
        # is copied: torch allocates at 64 bytes. (A weight lies unaligned in a unit file written
        # before pylomin aligned every tensor to 64 bytes.)
        if x.data_ptr() % 32:
            x = x.clone()
        if weight.data_ptr() % 16:
            weight = weight.clone()
        return torch.ops.aten._weight_int8pack_mm(x, weight, scales)
    # Prompts on the CPU, and CUDA: the int8 values cast (bf16 on the CPU) and the scales applied
    # to the output, [rows, out], not to the weight, [out, in]: one pass over the weight fewer,
    # and the weight's passes are what a prompt's time goes to here (memory-bound).
    dtype = KERNEL_DTYPE if x.device.type == "cpu" else x.dtype
    return F.linear(x.to(dtype), weight.to(dtype)).float() * scales.float()  # scaled in fp32


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [rows, in] @ the int4 weight packed by torch with its bf16 scales and zeros [in/group, out, 2]."""
    if x.device.type != "cpu":
        raise PylominError(
            f"int4 layers hold the packed layout of torch's CPU kernel, which {x.device} cannot run; "
            "run the model on the CPU, or quantize it with int8 for a GPU"
        )
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), weight, group_size, scales)
