"""Unit files written tensor by tensor, a chunk at a time: the converter's memory stays bounded whatever the model."""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from pylomin import _os
from pylomin.converter.checkpoint import Checkpoint, SourceTensor, byte_range
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.header import DATA_ALIGN, TensorInfo, dtype_code, encode_header

# Bytes copied per read/write: what bounds the converter's memory, whatever the tensor sizes.
CHUNK_BYTES = 16 * 1024 * 1024


def write_units(
    ckpt: Checkpoint, plan: dict[str, list[str]], folder: Path, dtype: torch.dtype | None, progress: bool
) -> fmt.Manifest:
    """Write each unit of `plan` as `folder/units/NNNN-name.safetensors`; returns a manifest of those units only."""
    (folder / fmt.UNITS_DIR).mkdir()
    by_unit: dict[str, list[SourceTensor]] = {u: [] for u in plan}
    unit_of_module = {m: u for u, mods in plan.items() for m in mods}
    for t in ckpt.tensors:
        by_unit[_unit_of(t.name, unit_of_module)].append(t)
    units: list[fmt.Unit] = []
    handles: dict[Path, Any] = {}
    out_bytes = sum(_out_dtype(t, dtype).itemsize * (t.nbytes // t.dtype.itemsize) for t in ckpt.tensors)
    buf = memoryview(bytearray(CHUNK_BYTES))
    try:
        # No bar at all when progress is off: even a disabled tqdm starts its monitor thread.
        bar_cls = tqdm if progress else _NoBar
        with bar_cls(total=out_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="convert") as bar:
            for i, (uname, modules) in enumerate(plan.items()):
                # 64-byte multiples first: each tensor after one whose size is not a multiple of
                # DATA_ALIGN needs a padding entry to start aligned, and the last one needs none.
                tensors = sorted(by_unit[uname], key=lambda t: _out_nbytes(t, dtype) % DATA_ALIGN != 0)
                rel = f"{fmt.UNITS_DIR}/{i:04d}-{_safe(uname)}.safetensors"
                units.append(_write_unit(folder / rel, rel, uname, modules, tensors, dtype, handles, buf, bar))
    finally:
        for h in handles.values():
            h.close()
    return fmt.Manifest(units=units, aliases=dict(ckpt.aliases))


class _NoBar:
    def __init__(self, **_: Any):
        pass

    def __enter__(self) -> _NoBar:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def _unit_of(name: str, unit_of_module: dict[str, str]) -> str:
    # The unit covering the deepest enclosing module of `name`.
    module = fmt.enclosing_module(name.rpartition(".")[0], unit_of_module)
    assert module is not None, f"no unit covers `{name}`"
    return unit_of_module[module]


def _write_unit(
    path: Path,
    rel: str,
    uname: str,
    modules: list[str],
    tensors: list[SourceTensor],
    dtype: torch.dtype | None,
    handles: dict[Path, Any],
    buf: memoryview,
    bar: tqdm | _NoBar,
) -> fmt.Unit:
    entries = [(t.name, _out_dtype(t, dtype), t.shape, _out_nbytes(t, dtype)) for t in tensors]
    header, offsets = encode_header(entries)
    crc = 0
    with open(path, "wb") as out:
        out.write(header)
        crc = zlib.crc32(header, crc)
        pos = len(header)
        for t, (name, _, _, nbytes) in zip(tensors, entries, strict=True):
            zeros = bytes(offsets[name] - pos)  # the padding entry before it, if any: < DATA_ALIGN bytes
            out.write(zeros)
            crc = zlib.crc32(zeros, crc)
            for piece in _chunks(t, _out_dtype(t, dtype), handles, buf):
                out.write(piece)
                crc = zlib.crc32(piece, crc)
                bar.update(len(piece))
            pos = offsets[name] + nbytes
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    infos = {name: TensorInfo(dtype_code(d), tuple(shape), offsets[name], n) for name, d, shape, n in entries}
    return fmt.Unit(name=uname, file=rel, size=size, checksum=f"crc32:{crc:08x}", modules=modules, tensors=infos)


def _chunks(t: SourceTensor, out_dtype: torch.dtype, handles: dict[Path, Any], buf: memoryview) -> Iterable[memoryview]:
    """The bytes of `t` cast to `out_dtype`, at most CHUNK_BYTES of source at a time."""
    if t.produce is not None:  # converted in memory (a run-time layout): never mapped
        t = replace(t, tensor=t.produce(), mapped=False, produce=None)
    if t.pieces is not None:  # fused from byte ranges of other tensors (stacked experts): streamed piece by piece
        for part, offset, length in t.pieces:
            yield from _chunks(byte_range(part, offset, length), out_dtype, handles, buf)
        return
    if t.nbytes == 0:
        return
    step = CHUNK_BYTES // t.dtype.itemsize  # elements per chunk
    numel = t.nbytes // t.dtype.itemsize
    if t.tensor is None:  # raw safetensors bytes: read with readinto into the reused buffer
        f = handles.get(t.file) or handles.setdefault(t.file, open(t.file, "rb"))  # noqa: SIM115
        f.seek(t.offset)
        for start in range(0, numel, step):
            n = min(step, numel - start) * t.dtype.itemsize
            got = f.readinto(buf[:n])
            if got != n:
                raise PylominError(f"`{t.file}` is truncated: tensor `{t.name}` ends past the end of the file")
            if out_dtype == t.dtype:
                yield buf[:n]
            else:
                piece = torch.frombuffer(buf[:n], dtype=t.dtype).to(out_dtype)
                yield memoryview(piece.view(torch.uint8).numpy())  # type: ignore[arg-type]
        return
    x = t.tensor
    if x.is_contiguous():
        flat = x.reshape(-1)
        for start in range(0, numel, step):
            src = flat[start : start + step]
            yield _as_bytes(src, out_dtype)
            if t.mapped:  # `src` views the mapped file itself: its pages can go
                _os.drop_file_pages(src.data_ptr(), src.nbytes)
        return
    # A view (transposed, sliced, expanded) is copied a block of rows at a time, so the copy stays
    # within a chunk. Its rows interleave in the storage, so the pages it spans are dropped once, after
    # the last block, never those of a copy: on heap memory MADV_DONTNEED would zero live bytes.
    for block in _row_blocks(x, step):
        yield _as_bytes(block.contiguous(), out_dtype)
    if t.mapped:
        _os.drop_file_pages(x.data_ptr(), _span(x))


def _row_blocks(x: torch.Tensor, step: int) -> Iterable[torch.Tensor]:
    """Slices of `x` along its leading dims, in order, each at most `step` elements (one element at the least)."""
    if x.numel() <= step or x.dim() == 0:
        yield x
        return
    row = x[0].numel()
    if row > step:
        for i in range(x.shape[0]):
            yield from _row_blocks(x[i], step)
        return
    rows = step // row
    for i in range(0, x.shape[0], rows):
        yield x[i : i + rows]


def _span(x: torch.Tensor) -> int:
    """Bytes of storage from the first to the last element of a view (strides are never negative in torch)."""
    return (sum((n - 1) * s for n, s in zip(x.shape, x.stride(), strict=True)) + 1) * x.element_size()


def _as_bytes(x: torch.Tensor, dtype: torch.dtype) -> memoryview:
    # x: contiguous; the bytes of x cast to `dtype`. Flattened with stride 1 explicitly: torch calls
    # a one-element tensor contiguous whatever its stride (0 after an expand), and keeps that stride.
    piece = x.to(dtype) if x.dtype != dtype else x
    flat = piece.as_strided((piece.numel(),), (1,))
    return memoryview(flat.view(torch.uint8).numpy())  # type: ignore[arg-type]


def _out_dtype(t: SourceTensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and t.dtype.is_floating_point and not t.keep_dtype else t.dtype


def _out_nbytes(t: SourceTensor, dtype: torch.dtype | None) -> int:
    return t.nbytes // t.dtype.itemsize * _out_dtype(t, dtype).itemsize


def _safe(name: str) -> str:
    return (re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "root")[:120]
