"""The converter's side of compressed units: the quantization math, and a checkpoint's Linear weights replaced by payloads and scales."""

from __future__ import annotations

import logging
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
    stored_shapes,
)
from pylomin.modeling import as_out_in, features, is_linear

logger = logging.getLogger(__name__)

# Smaller weights are left as they are: a kernel call for a few KiB saves nothing worth its error.
MIN_WEIGHT_NUMEL = 4096


def skip_reason(shape: tuple[int, ...], scheme: Scheme) -> str | None:
    """Why a Linear weight of `shape` [out, in] is not quantized with `scheme` (None: it is)."""
    if len(shape) != 2:
        return f"{len(shape)}-D weight"
    n, k = shape
    if n * k < MIN_WEIGHT_NUMEL:
        return f"small ({n}x{k} < {MIN_WEIGHT_NUMEL} weights)"
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
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for name, m in model.named_modules():
        out_in = features(m)
        if out_in is None:
            continue
        reason = skip_reason(out_in, scheme)
        if counts.get(id(m.weight), 0) > 1:
            reason = "tied to another parameter"
        elif m is lm_head and not scheme.head:
            reason = "the LM head (quantize it with --quantize-head / head=True)"
        if reason is None:
            chosen.append(name)
        else:
            skipped[name] = reason
    return chosen, skipped


def quantize_checkpoint(
    ckpt: Checkpoint, model: nn.Module | None, scheme: Scheme, *, src: Path
) -> tuple[Checkpoint, Quantization]:
    """`ckpt` with the weights of `model`'s quantizable Linear layers replaced by payload and scales.

    Each weight is read and quantized when its unit is written, one layer at a time: memory is
    bounded by about 1.5x (int8) to 2.5x (int4) the largest Linear weight, never the model. Whether
    this machine's kernels run `scheme` is the caller's to check: the math here calls no kernel.
    """
    if model is None:
        raise ValueError(
            f"quantizing needs the model's Linear layers: `{src}` has no config.json naming a transformers class; "
            "convert a model folder, or pass model_cls (--model-cls)"
        )
    chosen, skipped = choose(model, scheme)
    by_name = {t.name: t for t in ckpt.tensors}
    tied = set(ckpt.aliases) | set(ckpt.aliases.values())
    record = Quantization(scheme, pack=None if isinstance(scheme, Int8WeightOnly) else pack_digest())
    replaced: dict[str, list[SourceTensor]] = {}
    for name in chosen:
        layer = model.get_submodule(name)
        out_in = features(layer)
        assert out_in is not None
        t = by_name.get(f"{name}.weight")
        reason = None
        if t is None:
            reason = "its weight is not in the checkpoint"
        elif t.name in tied:
            reason = "tied to another parameter"
        elif not t.dtype.is_floating_point or t.shape != (out_in if is_linear(layer) else out_in[::-1]):
            reason = f"stored as {t.dtype} {list(t.shape)}"
        if reason is not None or t is None:
            skipped[name] = reason or ""
            continue
        job = _Quantize(t, scheme, layer)
        out_features, in_features = out_in
        payload_shape, scales_shape = stored_shapes(out_features, in_features, scheme)
        replaced[t.name] = [
            SourceTensor(t.name, payload_dtype(scheme), payload_shape, t.file, keep_dtype=True),
            SourceTensor(f"{name}.scales", KERNEL_DTYPE, scales_shape, t.file, keep_dtype=True),
        ]
        for i, out in enumerate(replaced[t.name]):
            out.produce = partial(job.take, i)
        record.modules[name] = {
            "in_features": in_features,
            "out_features": out_features,
            "dtype": str(t.dtype).removeprefix("torch."),
        }
    record.skipped = skipped
    if skipped:
        logger.warning(
            "%d Linear layer(s) not quantized, kept as stored: %s",
            len(skipped),
            "; ".join(f"{n} ({r})" for n, r in list(skipped.items())[:20]) + (" ..." if len(skipped) > 20 else ""),
        )
    if not record.modules:
        logger.warning(
            "no Linear layer of `%s` can be quantized to %s: the folder holds the weights as stored", src, scheme
        )
    logger.info("quantizing %d Linear layers to %s", len(record.modules), scheme)
    tensors = [x for t in ckpt.tensors for x in replaced.get(t.name, [t])]
    return Checkpoint(tensors, dict(ckpt.aliases), ckpt.weight_files, ckpt.extra_files), record


class _Quantize:
    """One weight's quantization, done when the first of its two outputs is written, freed after the second."""

    def __init__(self, source: SourceTensor, scheme: Scheme, layer: nn.Module):
        self.source, self.scheme, self.layer = source, scheme, layer
        self.out: list[torch.Tensor | None] = []

    def take(self, i: int) -> torch.Tensor:
        if not self.out:
            weight = as_out_in(self.layer, _materialize(self.source))
            self.out = list(quantize_weight(weight, self.scheme))
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
