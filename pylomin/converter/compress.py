"""The converter's side of compressed units: a checkpoint's Linear weights become quantized payloads and scales."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import torch
from torch import nn

from pylomin import quant
from pylomin.converter.checkpoint import Checkpoint, SourceTensor, byte_range
from pylomin.converter.layout import read_tensor
from pylomin.quant import Quantization, Scheme

logger = logging.getLogger(__name__)


def quantize_checkpoint(
    ckpt: Checkpoint, model: nn.Module | None, scheme: Scheme, *, head: bool, src: Path
) -> tuple[Checkpoint, Quantization]:
    """`ckpt` with the weights of `model`'s quantizable Linear layers replaced by payload and scales.

    Each weight is read and quantized when its unit is written, one layer at a time: memory is
    bounded by about 1.5x (int8) to 2.5x (int4) the largest Linear weight, never the model.
    """
    if model is None:
        raise ValueError(
            f"quantizing needs the model's Linear layers: `{src}` has no config.json naming a transformers class; "
            "convert a model folder, or pass model_cls (--model-cls)"
        )
    quant.check_kernels(scheme)
    chosen, skipped = quant.choose(model, scheme, head=head)
    by_name = {t.name: t for t in ckpt.tensors}
    tied = set(ckpt.aliases) | set(ckpt.aliases.values())
    record = Quantization(scheme, head=head, pack=quant.pack_digest() if scheme.name == "int4" else None)
    replaced: dict[str, list[SourceTensor]] = {}
    for name in chosen:
        layer = model.get_submodule(name)
        out_in = quant.features(layer)
        assert out_in is not None
        t = by_name.get(f"{name}.weight")
        reason = None
        if t is None:
            reason = "its weight is not in the checkpoint"
        elif t.name in tied:
            reason = "tied to another parameter"
        elif not t.dtype.is_floating_point or t.shape != (out_in if quant.is_linear(layer) else out_in[::-1]):
            reason = f"stored as {t.dtype} {list(t.shape)}"
        if reason is not None or t is None:
            skipped[name] = reason or ""
            continue
        job = _Quantize(t, scheme, layer)
        out_features, in_features = out_in
        payload_shape, scales_shape = quant.stored_shapes(out_features, in_features, scheme)
        replaced[t.name] = [
            SourceTensor(t.name, quant.payload_dtype(scheme), payload_shape, t.file, keep_dtype=True),
            SourceTensor(f"{name}.scales", quant.KERNEL_DTYPE, scales_shape, t.file, keep_dtype=True),
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
            weight = quant.as_out_in(self.layer, _materialize(self.source))
            self.out = list(quant.quantize_weight(weight, self.scheme))
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
