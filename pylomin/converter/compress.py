"""The converter's side of compressed units: the quantization math, and a checkpoint's Linear weights replaced by payloads and scales."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pylomin.converter.checkpoint import Checkpoint, SourceTensor, byte_range
from pylomin.converter.layout import read_tensor
from pylomin.converter.rounding import quantize_weight
from pylomin.format.quant import (
    KERNEL_DTYPE,
    Int8WeightOnly,
    Quantization,
    Scheme,
    pack_digest,
    payload_dtype,
    scales_name,
    stored_shapes,
)
from pylomin.modeling import (
    EXPERTS_TENSORS,
    as_out_in,
    experts_count,
    experts_routers,
    features,
    is_experts_module,
    is_linear,
)

logger = logging.getLogger(__name__)

# Smaller weights are left as they are: a kernel call for a few KiB saves nothing worth its error.
MIN_WEIGHT_NUMEL = 4096


def skip_reason(shape: tuple[int, ...], scheme: Scheme, *, count: int = 1) -> str | None:
    """Why a Linear weight of `shape` [out, in] (`count` of them: fused experts) is not quantized with `scheme`
    (None: it is)."""
    if len(shape) != 2:
        return f"{len(shape)}-D weight"
    n, k = shape
    if count * n * k < MIN_WEIGHT_NUMEL:
        return f"small ({f'{count}x' if count > 1 else ''}{n}x{k} < {MIN_WEIGHT_NUMEL} weights)"
    # torch's CPU kernels read inputs in blocks: other widths give wrong results or crash (measured).
    if isinstance(scheme, Int8WeightOnly):
        return f"in_features {k} is not a multiple of 32" if k % 32 else None
    if k % scheme.group_size:
        return f"in_features {k} is not a multiple of the group size {scheme.group_size}"
    if n % 16:
        return f"out_features {n} is not a multiple of 16"
    return None


def choose(model: nn.Module, scheme: Scheme) -> tuple[list[str], dict[str, str]]:
    """The Linear layers of `model` to quantize, and the skipped ones with the reason (the head: as `scheme.head` says)."""
    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    get_head = getattr(model, "get_output_embeddings", None)
    lm_head = get_head() if callable(get_head) else None
    # A router stays as stored: small, and a rounding that flips a choice changes the whole layer's output.
    routers = set(experts_routers(model).values())
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        out_in = features(m)
        if out_in is None:
            continue
        reason = skip_reason(out_in, scheme)
        if m in routers:
            reason = "an experts router"
        elif counts.get(id(m.weight), 0) > 1:
            reason = "tied to another parameter"
        elif m is lm_head and not scheme.head:
            reason = "the LM head (quantize it with --quantize-head / head=True)"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


@dataclass(frozen=True)
class FusedExperts:
    """A fused experts tensor to quantize per expert: `count` weights of [out, in] (stored [in, out] when `transposed`)."""

    module: str
    attr: str
    count: int
    out_features: int
    in_features: int
    transposed: bool

    @property
    def name(self) -> str:
        return f"{self.module}.{self.attr}"

    @property
    def shape(self) -> tuple[int, int, int]:
        """As the source holds it."""
        out_in = (self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)
        return (self.count, *out_in)


def choose_experts(model: nn.Module, scheme: Scheme) -> tuple[list[FusedExperts], dict[str, str]]:
    """The fused experts tensors of `model` to quantize per expert, and the skipped ones (or modules) with the reason.

    Only transformers' experts modules (`@use_experts_implementation`), whose forward pylomin's own
    stands in for, and only the tensors it multiplies by (`EXPERTS_TENSORS`).
    """
    chosen: list[FusedExperts] = []
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        count = experts_count(m)
        if count is None:
            continue
        others = [a for a, p in m._parameters.items() if p is not None and p.dim() == 3 and a not in EXPERTS_TENSORS]
        if not is_experts_module(m):
            skipped[name] = "experts whose forward is not transformers' experts implementation"
            continue
        if others:
            skipped[name] = f"experts with other per-expert tensors ({', '.join(others)})"
            continue
        for attr in EXPERTS_TENSORS:
            p = m._parameters.get(attr)
            if p is None or not p.is_floating_point() or scales_name(attr) in m._parameters:
                continue  # absent, or quantized already
            if p.dim() != 3 or p.shape[0] != count:
                skipped[f"{name}.{attr}"] = f"{list(p.shape)} is not [{count} experts, out, in]"
                continue
            a, b = int(p.shape[1]), int(p.shape[2])
            fused = FusedExperts(name, attr, count, *((b, a) if m.is_transposed else (a, b)), bool(m.is_transposed))
            reason = skip_reason((fused.out_features, fused.in_features), scheme, count=count)
            if reason is None:
                chosen.append(fused)
            else:
                skipped[fused.name] = reason
    return chosen, skipped


def quantize_experts(w: torch.Tensor, scheme: Scheme, *, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """`w` [E, out, in] ([E, in, out] when `transposed`) -> (payloads [E, *payload], scales [E, *scales]), expert
    by expert as `quantize_weight` quantizes one weight: one expert's bytes stay one range of each."""
    count = w.shape[0]
    payload: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    for e in range(count):
        p, s = quantize_weight(w[e].t() if transposed else w[e], scheme)
        if payload is None or scales is None:
            payload = torch.empty((count, *p.shape), dtype=p.dtype)
            scales = torch.empty((count, *s.shape), dtype=s.dtype)
        payload[e], scales[e] = p, s
    assert payload is not None and scales is not None, "no experts to quantize"
    return payload, scales


def quantize_checkpoint(
    ckpt: Checkpoint, model: nn.Module | None, scheme: Scheme, *, src: Path
) -> tuple[Checkpoint, Quantization]:
    """`ckpt` with the weights of `model`'s quantizable Linear layers replaced by payload and scales.

    Each weight is read and quantized when its unit is written, one layer at a time: memory is
    bounded by about 1.5x (int8) to 2.5x (int4) the largest Linear weight (or fused experts tensor),
    never the model. Whether this machine's kernels run `scheme` is the caller's to check: the math
    here calls no kernel.
    """
    if model is None:
        raise ValueError(
            f"quantizing needs the model's Linear layers: `{src}` has no config.json naming a transformers class; "
            "convert a model folder, or pass model_cls (--model-cls)"
        )
    chosen, skipped = choose(model, scheme)
    experts, skipped_experts = choose_experts(model, scheme)
    by_name = {t.name: t for t in ckpt.tensors}
    tied = set(ckpt.aliases) | set(ckpt.aliases.values())
    record = Quantization(scheme, pack=None if isinstance(scheme, Int8WeightOnly) else pack_digest())
    replaced: dict[str, list[SourceTensor]] = {}

    def replace_(t: SourceTensor, scales: str, shapes: tuple[tuple[int, ...], tuple[int, ...]], job: _Quantize) -> None:
        replaced[t.name] = [
            SourceTensor(t.name, payload_dtype(scheme), shapes[0], t.file, keep_dtype=True),
            SourceTensor(scales, KERNEL_DTYPE, shapes[1], t.file, keep_dtype=True),
        ]
        for i, out in enumerate(replaced[t.name]):
            out.produce = partial(job.take, i)

    for name in chosen:
        layer = model.get_submodule(name)
        out_in = features(layer)
        assert out_in is not None
        t = by_name.get(f"{name}.weight")
        reason = _stored_reason(t, out_in if is_linear(layer) else out_in[::-1], tied)
        if reason is not None or t is None:
            skipped[name] = reason or ""
            continue
        out_features, in_features = out_in
        job = _Quantize(t, partial(_quantize_layer, layer=layer, scheme=scheme))
        replace_(t, f"{name}.scales", stored_shapes(out_features, in_features, scheme), job)
        record.modules[name] = {
            "in_features": in_features,
            "out_features": out_features,
            "dtype": str(t.dtype).removeprefix("torch."),
        }
    for fused in experts:
        t = by_name.get(fused.name)
        reason = _stored_reason(t, fused.shape, tied)
        if reason is not None or t is None:
            skipped_experts[fused.name] = reason or ""
            continue
        payload, scales = stored_shapes(fused.out_features, fused.in_features, scheme)
        job = _Quantize(t, partial(quantize_experts, scheme=scheme, transposed=fused.transposed))
        replace_(t, scales_name(t.name), ((fused.count, *payload), (fused.count, *scales)), job)
        record.experts.setdefault(fused.module, {})[fused.attr] = {
            "count": fused.count,
            "out_features": fused.out_features,
            "in_features": fused.in_features,
            "transposed": fused.transposed,
            "dtype": str(t.dtype).removeprefix("torch."),
        }
    record.skipped = {**skipped, **skipped_experts}
    for what, left in (("Linear layer(s)", skipped), ("fused experts tensor(s) or module(s)", skipped_experts)):
        if left:
            logger.warning(
                "%d %s not quantized, kept as stored: %s",
                len(left),
                what,
                "; ".join(f"{n} ({r})" for n, r in list(left.items())[:20]) + (" ..." if len(left) > 20 else ""),
            )
    if not record.modules and not record.experts:
        logger.warning(
            "no Linear layer of `%s` can be quantized to %s: the folder holds the weights as stored", src, scheme
        )
    logger.info(
        "quantizing %d Linear layers and %d fused experts tensors to %s",
        len(record.modules),
        sum(map(len, record.experts.values())),
        scheme,
    )
    tensors = [x for t in ckpt.tensors for x in replaced.get(t.name, [t])]
    return Checkpoint(tensors, dict(ckpt.aliases), ckpt.weight_files, ckpt.extra_files), record


def _stored_reason(t: SourceTensor | None, shape: tuple[int, ...], tied: set[str]) -> str | None:
    # Why the checkpoint's tensor cannot be quantized as the model's weight of `shape` (None: it can).
    if t is None:
        return "its weight is not in the checkpoint"
    if t.name in tied:
        return "tied to another parameter"
    if not t.dtype.is_floating_point or t.shape != tuple(shape):
        return f"stored as {t.dtype} {list(t.shape)}"
    return None


def _quantize_layer(weight: torch.Tensor, *, layer: nn.Module, scheme: Scheme) -> tuple[torch.Tensor, torch.Tensor]:
    return quantize_weight(as_out_in(layer, weight), scheme)


class _Quantize:
    """One tensor's quantization, done when the first of its two outputs is written, freed after the second."""

    def __init__(self, source: SourceTensor, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]):
        self.source, self.quantize = source, quantize
        self.out: list[torch.Tensor | None] = []

    def take(self, i: int) -> torch.Tensor:
        if not self.out:
            self.out = list(self.quantize(_materialize(self.source)))
        value, self.out[i] = self.out[i], None
        assert value is not None, f"`{self.source.name}` was taken twice"
        if all(v is None for v in self.out):
            self.out = []
        return value


def _materialize(t: SourceTensor) -> torch.Tensor:
    """The source tensor `t` in memory, whichever way the checkpoint holds it."""
    if t.produce is not None:
        return t.produce()
    if t.pieces is not None:
        return torch.cat([read_tensor(byte_range(p, off, n)) for p, off, n in t.pieces]).reshape(t.shape)
    return read_tensor(t)
