"""Compressed units: weight-only int8 / int4 Linear layers, their math, and torch's CPU kernels that run them.

The converter quantizes (`quantize_weight`), the manifest records what (`Quantization`), and at load
the Linear layers it names become `Int8Linear` / `Int4Linear` (`swap_`) whose parameters are the
payload and its scales, mapped and paged like any other parameters.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pylomin.errors import PylominError

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# Smaller weights are left as they are: a kernel call for a few KiB saves nothing worth its error.
MIN_WEIGHT_NUMEL = 4096
# From this many rows of activations (a prompt) the int8 weight is cast to bf16 and run by bf16
# F.linear: the int8 kernel's time grows with the rows, the cast's does not. Measured here on the
# benchmarks' 1.4 GiB Llama quantized in memory, one forward of 32 / 64 / 96 / 128 tokens: kernel
# 0.22 / 0.40 / 0.55 / 0.71 s, cast 0.35 / 0.42 / 0.45 / 0.54 s (fp32: 0.45 s at 128). (A lone
# 2816x1024 product crosses over at 32 rows, its weight hot in cache; in a model it comes from RAM.)
PROMPT_ROWS = 64
# torch's kernels take bf16 activations and bf16 scales on the CPU.
KERNEL_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Scheme:
    """A quantization scheme: `int8` (one scale per output channel) or `int4` (groups of `group_size` inputs)."""

    name: str
    group_size: int = 0  # int4 only

    def __str__(self) -> str:
        return self.name if self.name == "int8" else f"{self.name}-g{self.group_size}"

    @classmethod
    def parse(cls, spec: str | Scheme, group_size: int | None = None) -> Scheme:
        """`"int8"`, `"int4"`, `"int4-g128"` (or `"int4"` with `group_size=128`) -> a checked Scheme."""
        if isinstance(spec, Scheme):
            return spec
        if not isinstance(spec, str):
            raise ValueError(f"quantize={spec!r}: give 'int8' or 'int4' (or 'int4-g32', 'int4-g64', 'int4-g128')")
        name, _, g = spec.strip().lower().partition("-g")
        if name not in SCHEMES:
            raise ValueError(f"quantize={spec!r}: pylomin quantizes to 'int8' or 'int4' (groups: 'int4-g128')")
        if name == "int8":
            if g or group_size is not None:
                raise ValueError(f"quantize={spec!r}: int8 has one scale per output channel, no group size")
            return cls("int8")
        if g and group_size is not None and int(g) != group_size:
            raise ValueError(f"quantize={spec!r} and group_size={group_size}: give the group size once")
        size = int(g) if g.isdigit() else group_size if group_size is not None else DEFAULT_GROUP_SIZE
        if g and not g.isdigit() or size not in GROUP_SIZES:
            raise ValueError(f"quantize={spec!r}: int4 groups are {', '.join(map(str, GROUP_SIZES))} inputs wide")
        return cls("int4", size)


@dataclass
class Quantization:
    """What a converted folder holds quantized: the scheme, the layers, and how int4 was packed."""

    scheme: Scheme
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> in/out features, source dtype
    skipped: dict[str, str] = field(default_factory=dict)  # Linear layers left as stored, and why
    head: bool = False  # the LM head was quantized too
    pack: str | None = None  # int4: a digest of torch's packed layout on the converting machine
    torch_version: str = torch.__version__

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.name,
            "group_size": self.scheme.group_size,
            "head": self.head,
            "pack": self.pack,
            "torch": self.torch_version,
            "modules": self.modules,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, doc: object) -> Quantization | None:
        if doc is None:
            return None
        if not isinstance(doc, dict) or not isinstance(doc.get("modules"), dict):
            raise TypeError(f"`quantization` must be null or an object with `modules`, got {type(doc).__name__}")
        name, group = doc["scheme"], doc.get("group_size", 0)
        if name not in SCHEMES or not isinstance(group, int) or name == "int4" and group not in GROUP_SIZES:
            raise ValueError(f"unknown quantization scheme {name!r} (group size {group!r})")
        for module, spec in doc["modules"].items():
            if not isinstance(spec, dict) or not all(type(spec.get(k)) is int for k in ("in_features", "out_features")):
                raise TypeError(f"quantized module `{module}` needs integer `in_features` and `out_features`")
        skipped = {str(k): str(v) for k, v in (doc.get("skipped") or {}).items()}
        return cls(
            Scheme(name, group),
            dict(doc["modules"]),
            skipped,
            bool(doc.get("head")),
            doc.get("pack"),
            str(doc["torch"]),
        )


# --- the math (converter) --------------------------------------------------------------------------


def skip_reason(shape: tuple[int, ...], scheme: Scheme) -> str | None:
    """Why a Linear weight of `shape` [out, in] is not quantized with `scheme` (None: it is)."""
    if len(shape) != 2:
        return f"{len(shape)}-D weight"
    n, k = shape
    if n * k < MIN_WEIGHT_NUMEL:
        return f"small ({n}x{k} < {MIN_WEIGHT_NUMEL} weights)"
    # torch's CPU kernels read inputs in blocks: other widths give wrong results or crash (measured).
    if scheme.name == "int8" and k % 32:
        return f"in_features {k} is not a multiple of 32"
    if scheme.name == "int4" and k % scheme.group_size:
        return f"in_features {k} is not a multiple of the group size {scheme.group_size}"
    if scheme.name == "int4" and n % 16:
        return f"out_features {n} is not a multiple of 16"
    return None


def quantize_weight(w: torch.Tensor, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [out, in] -> (payload, scales) as stored: int8 [out, in] and bf16 [out]; or int4 packed by torch
    (uint8 [out, in/2]) and bf16 scales and zeros [in/group, out, 2] (w ~ (q - 8) * scale + zero)."""
    n, k = w.shape
    int8 = scheme.name == "int8"
    q = torch.empty((n, k), dtype=torch.int8 if int8 else torch.int32)
    scales = torch.empty((n,) if int8 else (k // scheme.group_size, n, 2), dtype=KERNEL_DTYPE)
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
    if scheme.name == "int8":
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


def pack_digest() -> str:
    """A digest of how this machine's torch packs int4 (the layout depends on the CPU's vector width)."""
    q = (torch.arange(64 * 256, dtype=torch.int32).reshape(64, 256) * 7) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return f"crc32:{zlib.crc32(packed.numpy().tobytes()):08x}"


# --- the modules (runtime) -------------------------------------------------------------------------


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

    scheme = Scheme("int8")

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] < PROMPT_ROWS:
            x = x.to(KERNEL_DTYPE).contiguous()
            weight: torch.Tensor = self.weight
            # The kernel segfaults (torch 2.13, measured) on a bf16 input not 32-byte aligned with
            # AVX-512, not 16 with AVX2, even one row; and on an int8 weight not 16-byte aligned with
            # AVX-512, from 4 rows. Its result does not depend on the address, so what is not aligned
            # is copied: torch allocates at 64 bytes. (A weight lies unaligned in a unit file written
            # before pylomin aligned every tensor to 64 bytes.)
            if x.data_ptr() % 32:
                x = x.clone()
            if weight.data_ptr() % 16:
                weight = weight.clone()
            return torch.ops.aten._weight_int8pack_mm(x, weight, self.scales)
        # Prompts on the CPU, and CUDA: the int8 values cast (bf16 on the CPU) and the scales applied
        # to the output, [rows, out], not to the weight, [out, in]: one pass over the weight fewer,
        # and the weight's passes are what a prompt's time goes to here (memory-bound).
        dtype = KERNEL_DTYPE if x.device.type == "cpu" else x.dtype
        return F.linear(x.to(dtype), self.weight.to(dtype)).float() * self.scales.float()  # scaled in fp32


class Int4Linear(QuantLinear):
    """4-bit weights in the layout of torch's CPU int4 kernel, bf16 scales and zeros per group of inputs."""

    def __init__(self, *args: Any, group_size: int):
        super().__init__(*args)
        self.scheme = Scheme("int4", group_size)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise PylominError(
                f"int4 layers hold the packed layout of torch's CPU kernel, which {x.device} cannot run; "
                "run the model on the CPU, or quantize it with int8 for a GPU"
            )
        g = self.scheme.group_size
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(KERNEL_DTYPE).contiguous(), self.weight, g, self.scales)


def features(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer pylomin can quantize: `nn.Linear` (weight [out, in]) or transformers' `Conv1D`
    (GPT-2's, weight [in, out]); None for any other module, or a subclass with its own forward."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return module.out_features, module.in_features
    conv1d = _conv1d_class()
    weight = getattr(module, "weight", None)
    if conv1d is not None and type(module) is conv1d and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def is_linear(module: nn.Module) -> bool:
    """Whether `module` stores its weight [out, in] (nn.Linear), not [in, out] (Conv1D)."""
    return isinstance(module, nn.Linear)


def as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` of `module` as [out, in] (a transposed view for Conv1D)."""
    return weight if is_linear(module) else weight.t()


@functools.cache
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D  # type: ignore[no-any-return]


def make_module(layer: nn.Module, scheme: Scheme, payload: torch.Tensor, scales: torch.Tensor) -> QuantLinear:
    """The quantized layer replacing `layer` (a Linear or Conv1D; its bias kept as it is)."""
    out_in = features(layer)
    assert out_in is not None, f"{type(layer).__name__} is not quantizable"
    bias = layer.bias if isinstance(layer.bias, nn.Parameter) else None
    args = (out_in[1], out_in[0], payload, scales, bias)
    if scheme.name == "int8":
        return Int8Linear(*args)
    return Int4Linear(*args, group_size=scheme.group_size)


def stored_shapes(out_features: int, in_features: int, scheme: Scheme) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The payload's and the scales' shapes for a [out, in] weight."""
    if scheme.name == "int8":
        return (out_features, in_features), (out_features,)
    return (out_features, in_features // 2), (in_features // scheme.group_size, out_features, 2)


def payload_dtype(scheme: Scheme) -> torch.dtype:
    return torch.int8 if scheme.name == "int8" else torch.uint8


def choose(model: nn.Module, scheme: Scheme, *, head: bool = False) -> tuple[list[str], dict[str, str]]:
    """The Linear layers of `model` to quantize, and the skipped ones with the reason."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if callable(get_head) else None
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        out_in = features(m)
        if out_in is None:
            continue
        reason = skip_reason(out_in, scheme)
        if counts.get(id(m.weight), 0) > 1:
            reason = "tied to another parameter"
        elif m is lm_head and not head:
            reason = "the LM head (quantize it with --quantize-head / head=True)"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def quantize_(model: nn.Module, quantize: str | Scheme, *, head: bool = False) -> dict[str, str]:
    """Quantize the Linear layers of an in-memory `model` in place (one layer at a time); returns the skipped ones.

    The same layers and modules a converted folder gets, so an in-memory model and a streamed one
    give identical outputs.

    Example:
        >>> skipped = pylomin.quantize_(model, "int8")
    """
    scheme = Scheme.parse(quantize)
    check_kernels(scheme)
    chosen, skipped = choose(model, scheme, head=head)
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, attr)
        payload, scales = quantize_weight(as_out_in(layer, layer.weight), scheme)  # on the CPU
        device = layer.weight.device
        setattr(owner, attr, make_module(layer, scheme, payload.to(device), scales.to(device)))
    return skipped


def swap_(model: nn.Module, quantization: Quantization, folder: object) -> None:
    """Replace the Linear layers a folder holds quantized by quantized layers on meta."""
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
    key = str(scheme)
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
    if scheme.name == "int4" and pack is not None and pack != pack_digest():
        raise PylominError(
            f"`{folder}` holds int4 weights packed for another CPU or torch (packed layout {pack}, this machine's "
            f"{pack_digest()}): torch's int4 layout depends on the CPU's vector width. Convert the model again on "
            "this machine (pylomin-convert ... --quantize int4)"
        )


def _try_kernel(scheme: Scheme) -> str | None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=gen)
    # 5 rows: the int8 kernel's path for 4+ rows (where an unaligned weight crashes it) and a 1-row rest.
    x = torch.randn(5, 256, generator=gen)
    try:
        linear = nn.Linear(256, 64, bias=False)
        linear.weight.data = w
        module = make_module(linear, scheme, *quantize_weight(w, scheme))
        with torch.no_grad():
            y = module(x)
    except (RuntimeError, NotImplementedError) as e:
        return str(e).splitlines()[0]
    reference = x @ w.t()
    error = ((y - reference).norm() / reference.norm()).item()
    bound = 0.02 if scheme.name == "int8" else 0.2
    return None if error < bound else f"its kernel is off by {error:.3f} (relative) on a test product"
