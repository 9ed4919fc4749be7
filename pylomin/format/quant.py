"""Quantized layers as the format records them: the schemes (small config objects), the manifest's record, the stored shapes.

The converter quantizes (`pylomin.converter.compress`), the manifest records what (`Quantization`),
and the runtime runs it (`pylomin.runtime.quant`); this module is what the two agree on, and knows
no modules.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeAlias

import torch

SCHEMES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128)
DEFAULT_GROUP_SIZE = 64
# torch's kernels take bf16 activations and bf16 scales on the CPU.
KERNEL_DTYPE = torch.bfloat16
# What a quantized conversion holds, by the converter that wrote it: 1, Linear layers rounded to the
# nearest of each group's [min, max]; 2, fused experts quantized too, and int4 groups rounded to the
# best of 16 ranges. Cached conversions are keyed by it, so an upgrade converts again.
REVISION = 2


@dataclass(frozen=True)
class Int8WeightOnly:
    """int8 weights, one bf16 scale per output channel: a quarter of fp32's bytes.

    Args:
        head: quantize the LM head too (when it is not tied to the embeddings).

    Example:
        >>> pylomin.quantize_(model, pylomin.Int8WeightOnly(head=True))  # "int8" is the same, head=False
    """

    head: bool = False
    name: ClassVar[str] = "int8"

    def __post_init__(self) -> None:
        _check_head(self)

    def __str__(self) -> str:
        return "int8"


@dataclass(frozen=True)
class Int4WeightOnly:
    """4-bit weights, a bf16 scale and zero per group of `group_size` inputs: an eighth of fp32's bytes.

    The packed layout is torch's CPU kernel's: an int4 model runs on the CPU only.

    Args:
        group_size: inputs per scale and zero: 32, 64 or 128.
        head: quantize the LM head too (when it is not tied to the embeddings).

    Example:
        >>> pylomin.convert("llama/", "llama-int4/", quantize=pylomin.Int4WeightOnly(group_size=128))  # "int4-g128"
    """

    group_size: int = DEFAULT_GROUP_SIZE
    head: bool = False
    name: ClassVar[str] = "int4"

    def __post_init__(self) -> None:
        if type(self.group_size) is not int or self.group_size not in GROUP_SIZES:
            raise ValueError(
                f"group_size={self.group_size!r}: int4 groups are {', '.join(map(str, GROUP_SIZES))} inputs wide"
            )
        _check_head(self)

    def __str__(self) -> str:
        return f"int4-g{self.group_size}"


# A scheme is one of the configs; its str() is the string that parses to it (the head aside).
Scheme: TypeAlias = Int8WeightOnly | Int4WeightOnly


def _check_head(scheme: Scheme) -> None:
    if not isinstance(scheme.head, bool):
        raise ValueError(f"head={scheme.head!r}: give True (quantize the LM head too) or False")


def parse_scheme(spec: str | Scheme) -> Scheme:
    """`"int8"`, `"int4"`, `"int4-g128"` (the head as stored) or a config -> the config, checked."""
    if isinstance(spec, (Int8WeightOnly, Int4WeightOnly)):
        return spec
    if not isinstance(spec, str):
        raise ValueError(
            f"quantize={spec!r}: give 'int8' or 'int4' (or 'int4-g32', 'int4-g64', 'int4-g128'), "
            "or pylomin.Int8WeightOnly() / pylomin.Int4WeightOnly()"
        )
    name, _, g = spec.strip().lower().partition("-g")
    if name not in SCHEMES:
        raise ValueError(f"quantize={spec!r}: pylomin quantizes to 'int8' or 'int4' (groups: 'int4-g128')")
    if name == "int8":
        if g:
            raise ValueError(f"quantize={spec!r}: int8 has one scale per output channel, no group size")
        return Int8WeightOnly()
    size = int(g) if g.isdigit() else DEFAULT_GROUP_SIZE
    if g and not g.isdigit() or size not in GROUP_SIZES:
        raise ValueError(f"quantize={spec!r}: int4 groups are {', '.join(map(str, GROUP_SIZES))} inputs wide")
    return Int4WeightOnly(size)


@dataclass
class Quantization:
    """What a converted folder holds quantized: the scheme (its `head`: the LM head too), the layers, how int4 was packed."""

    scheme: Scheme
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> in/out features, source dtype
    # Fused experts modules -> their quantized tensors: attribute -> experts, out and in features of one
    # expert, whether the source held each expert [in, out] (`transposed`), source dtype. Stored per
    # expert: `attr` the payloads [E, *payload], `attr_scales` their scales [E, *scales] (`stored_shapes`).
    experts: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # Linear layers left as stored, and why
    pack: str | None = None  # int4: a digest of torch's packed layout on the converting machine
    torch_version: str = torch.__version__

    def to_json(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme.name,
            "group_size": self.scheme.group_size if isinstance(self.scheme, Int4WeightOnly) else 0,
            "head": self.scheme.head,
            "pack": self.pack,
            "torch": self.torch_version,
            "modules": self.modules,
            "experts": self.experts,
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
        experts = doc.get("experts") or {}
        for module, tensors in experts.items():
            for attr, spec in tensors.items() if isinstance(tensors, dict) else [(None, None)]:
                keys = ("count", "out_features", "in_features")
                if not isinstance(spec, dict) or not all(type(spec.get(k)) is int for k in keys):
                    raise TypeError(f"quantized experts `{module}.{attr}` need integer {', '.join(keys)}")
        head = bool(doc.get("head"))
        skipped = {str(k): str(v) for k, v in (doc.get("skipped") or {}).items()}
        return cls(
            Int8WeightOnly(head) if name == "int8" else Int4WeightOnly(group, head),
            dict(doc["modules"]),
            {str(k): dict(v) for k, v in experts.items()},
            skipped,
            doc.get("pack"),
            str(doc["torch"]),
        )


def stored_shapes(out_features: int, in_features: int, scheme: Scheme) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The payload's and the scales' shapes for a [out, in] weight."""
    if isinstance(scheme, Int8WeightOnly):
        return (out_features, in_features), (out_features,)
    return (out_features, in_features // 2), (in_features // scheme.group_size, out_features, 2)


def scales_name(payload: str) -> str:
    """The stored name of a quantized experts tensor's scales (`...experts.down_proj` -> `...experts.down_proj_scales`)."""
    return f"{payload}_scales"


def payload_dtype(scheme: Scheme) -> torch.dtype:
    return torch.int8 if isinstance(scheme, Int8WeightOnly) else torch.uint8


def pack_digest() -> str:
    """A digest of how this machine's torch packs int4 (the layout depends on the CPU's vector width).

    The converter records it, the runtime compares it with its own: a folder packed elsewhere is refused.
    """
    q = (torch.arange(64 * 256, dtype=torch.int32).reshape(64, 256) * 7) % 16
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    return f"crc32:{zlib.crc32(packed.numpy().tobytes()):08x}"
