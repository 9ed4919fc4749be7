"""Quantized layers at run time: `Int8Linear` / `Int4Linear`, swapped in for the layers a folder holds quantized, and the check that torch's CPU kernels run them right here.

At load, the Linear layers the manifest names become quantized layers on meta (`prepare_`) whose
parameters are the payload and its scales, mapped and paged like any other parameters.
"""

from __future__ import annotations

import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin.errors import PylominError
from pylomin.format.quant import (
    KERNEL_DTYPE,
    Int4WeightOnly,
    Int8WeightOnly,
    Quantization,
    Scheme,
    pack_digest,
    payload_dtype,
    stored_shapes,
)
from pylomin.modeling import features, is_experts_module
from pylomin.runtime.kernels import int4_matmul, int8_matmul
from pylomin.runtime.quant_experts import swap_tensor_, use_quantized_experts


class QuantLinear(nn.Module):
    """A Linear layer with weight-only quantized weights; `weight` is the payload, `scales` its scales."""

    # These parameters keep their stored dtype whatever dtype the model is loaded in.
    exact_dtype = ("weight", "scales")
    scheme: Scheme

    def __init__(self, in_features: int, out_features: int, payload: torch.Tensor, scales: torch.Tensor, bias: Any):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(payload, requires_grad=False)
        self.scales = nn.Parameter(scales, requires_grad=False)
        self.bias = bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"

    def _apply(self, fn: Any, recurse: bool = True) -> QuantLinear:
        # `.half()`, `.to(float16)` cast floating tensors; the scales keep the dtype the kernel reads
        # (moved as raw 16-bit integers, so a device move still applies to them).
        self.scales = nn.Parameter(self.scales.detach().view(torch.int16), requires_grad=False)
        try:
            super()._apply(fn, recurse)
        finally:
            self.scales = nn.Parameter(self.scales.detach().view(KERNEL_DTYPE), requires_grad=False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # [rows, in]
        y = self._matmul(x2).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantLinear):
    """int8 weights [out, in], one bf16 scale per output channel: torch's `_weight_int8pack_mm` on the CPU."""

    scheme = Int8WeightOnly()

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scales)


class Int4Linear(QuantLinear):
    """4-bit weights in the layout of torch's CPU int4 kernel, bf16 scales and zeros per group of inputs."""

    scheme: Int4WeightOnly

    def __init__(self, *args: Any, group_size: int):
        super().__init__(*args)
        self.scheme = Int4WeightOnly(group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.weight, self.scales, self.scheme.group_size)


def make_module(layer: nn.Module, scheme: Scheme, payload: torch.Tensor, scales: torch.Tensor) -> QuantLinear:
    """The quantized layer replacing `layer` (a Linear or Conv1D; its bias kept as it is)."""
    out_in = features(layer)
    assert out_in is not None, f"{type(layer).__name__} is not quantizable"
    bias = layer.bias if isinstance(layer.bias, nn.Parameter) else None
    args = (out_in[1], out_in[0], payload, scales, bias)
    if isinstance(scheme, Int8WeightOnly):
        return Int8Linear(*args)
    return Int4Linear(*args, group_size=scheme.group_size)


def prepare_(model: nn.Module, quantization: Quantization, folder: Path, device: torch.device) -> None:
    """The folder's quantized Linear layers swapped in on meta, after checking this machine runs them right."""
    if isinstance(quantization.scheme, Int4WeightOnly) and device.type != "cpu":
        raise PylominError(
            f"`{folder}` holds int4 weights in the layout of torch's CPU kernel, which {device} cannot run; "
            "load it with device='cpu', or convert with --quantize int8 for a GPU"
        )
    check_kernels(quantization.scheme, quantization.pack, folder)
    swap_(model, quantization, folder)


def swap_(model: nn.Module, quantization: Quantization, folder: object) -> None:
    """Replace the Linear layers and fused experts tensors a folder holds quantized by quantized ones on meta."""
    scheme = quantization.scheme
    for name, spec in quantization.modules.items():
        parent, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(parent)
            layer = getattr(owner, attr)
        except AttributeError:
            layer = None
        out_in = features(layer) if isinstance(layer, nn.Module) else None
        if out_in != (spec["out_features"], spec["in_features"]):
            raise PylominError(
                f"`{folder}` holds `{name}` quantized as a {spec['out_features']}x{spec['in_features']} Linear layer, "
                f"which `{type(model).__name__}` does not have; load it with the class it was converted for"
            )
        assert layer is not None
        payload_shape, scales_shape = stored_shapes(spec["out_features"], spec["in_features"], scheme)
        payload = torch.empty(payload_shape, dtype=payload_dtype(scheme), device="meta")
        scales = torch.empty(scales_shape, dtype=KERNEL_DTYPE, device="meta")
        setattr(owner, attr, make_module(layer, scheme, payload, scales))
    swapped = []
    for name, tensors in quantization.experts.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        for attr, spec in tensors.items():
            count, out_features, in_features = spec["count"], spec["out_features"], spec["in_features"]
            transposed = bool(spec.get("transposed"))
            p = getattr(module, "_parameters", {}).get(attr)
            want = (count, in_features, out_features) if transposed else (count, out_features, in_features)
            if (
                module is None
                or not is_experts_module(module)
                or p is None
                or tuple(p.shape) != want
                or module.is_transposed != transposed
            ):
                raise PylominError(
                    f"`{folder}` holds `{name}.{attr}` quantized as {count} experts of {list(want[1:])}, which "
                    f"`{type(model).__name__}` does not have; load it with the class it was converted for"
                )
            payload_shape, scales_shape = stored_shapes(out_features, in_features, scheme)
            payload = torch.empty((count, *payload_shape), dtype=payload_dtype(scheme), device="meta")
            scales = torch.empty((count, *scales_shape), dtype=KERNEL_DTYPE, device="meta")
            swap_tensor_(module, attr, payload, scales)
        if module is not None:
            swapped.append(module)
    if swapped:
        use_quantized_experts(model, swapped)


_CHECKED: dict[str, str | None] = {}
# torch builds these kernels once per CPU capability and runs the best the CPU has, or the one
# ATEN_CPU_CAPABILITY names; on x86 its DEFAULT build is scalar code. On the AMD EPYC of docs/design.md,
# an 8192x2048 weight at 1 / 16 / 63 rows: int8 16 / 120 / 480 ms and int4 15 / 270 / 1080 ms there,
# against 0.4 / 3.5 / 14 ms (int8, AVX-512) and fp32 F.linear's 3.6 / 10.6 / 20 ms.
_SCALAR_CAPABILITY = "DEFAULT"
_SCALAR_SLOWDOWN = "4-55x"


def check_kernels(scheme: Scheme, pack: str | None = None, folder: object = None) -> None:
    """Refuse a scheme this torch and CPU cannot run correctly: the kernel is tried once per process
    on a small product against the dequantized reference; int4 must be packed as this machine packs.
    Warn where torch runs the kernel as scalar code (slower than the model unquantized)."""
    key = str(scheme)  # the kernel's scheme: whether the head is quantized too does not change it
    if key not in _CHECKED:
        # In this process: a fresh interpreter to contain a crash costs 1.3-1.5 s (import torch), the
        # probe 1-2 ms; the kernel crashes only on unaligned tensors, and `_matmul` never passes one.
        _CHECKED[key] = _try_kernel(scheme)
        capability = torch.backends.cpu.get_cpu_capability()
        if _CHECKED[key] is None and capability == _SCALAR_CAPABILITY and platform.machine() in ("x86_64", "AMD64"):
            asked = os.environ.get("ATEN_CPU_CAPABILITY")
            logging.getLogger(__name__).warning(
                "torch runs its %s kernel as scalar code here (CPU capability %s%s): measured %s slower than "
                "the model unquantized in fp32; %s, or convert the model without --quantize",
                scheme,
                capability,
                f", as ATEN_CPU_CAPABILITY={asked} asks" if asked else "",
                _SCALAR_SLOWDOWN,
                "unset ATEN_CPU_CAPABILITY" if asked else "run it on a CPU with AVX2",
            )
    if _CHECKED[key] is not None:
        raise PylominError(
            f"weights quantized as {scheme} cannot run with torch {torch.__version__} on this machine "
            f"({_CHECKED[key]}); convert the model without --quantize (or with another scheme)"
        )
    if isinstance(scheme, Int4WeightOnly) and pack is not None and pack != pack_digest():
        raise PylominError(
            f"`{folder}` holds int4 weights packed for another CPU or torch (packed layout {pack}, this machine's "
            f"{pack_digest()}): torch's int4 layout depends on the CPU's vector width. Convert the model again on "
            "this machine (pylomin-convert ... --quantize int4)"
        )


# The probe's product against the weight its payload stands for: only the activations' rounding to
# bf16 separates them (measured 0.0025 for either scheme, under every CPU capability; a wrong int4
# layout is off by 1.3).
_PROBE_BOUND = 0.02


def _try_kernel(scheme: Scheme) -> str | None:
    # A payload of random stored values, as the format defines them (not the converter's math, which
    # the runtime does not import), against the weight they stand for: int8 w = q * scale, int4
    # w = (q - 8) * scale + zero.
    out_features, in_features = 64, 256
    gen = torch.Generator().manual_seed(0)
    # 5 rows: the int8 kernel's path for 4+ rows (where an unaligned weight crashes it) and a 1-row rest.
    x = torch.randn(5, in_features, generator=gen)
    try:
        if isinstance(scheme, Int8WeightOnly):
            q = torch.randint(-127, 128, (out_features, in_features), generator=gen, dtype=torch.int8)
            scales = (torch.rand(out_features, generator=gen) * 0.01 + 0.005).to(KERNEL_DTYPE)  # [out]
            w = q.float() * scales.float()[:, None]
            payload = q
        else:
            g = scheme.group_size
            q = torch.randint(0, 16, (out_features, in_features), generator=gen, dtype=torch.int32)
            scale = torch.rand(in_features // g, out_features, generator=gen) * 0.01 + 0.005  # [groups, out]
            zero = torch.randn(in_features // g, out_features, generator=gen) * 0.01
            scales = torch.stack([scale, zero], dim=-1).to(KERNEL_DTYPE)  # [groups, out, 2]
            per_input = scales.float().repeat_interleave(g, dim=0).transpose(0, 1)  # [out, in, 2]
            w = (q.float() - 8) * per_input[..., 0] + per_input[..., 1]
            payload = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        layer = nn.Linear(in_features, out_features, bias=False, device="meta")  # its shape only
        module = make_module(layer, scheme, payload, scales)
        with torch.no_grad():
            y = module(x)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]
    reference = x @ w.t()
    error = ((y - reference).norm() / reference.norm()).item()
    return None if error < _PROBE_BOUND else f"its kernel is off by {error:.3f} (relative) on a test product"
