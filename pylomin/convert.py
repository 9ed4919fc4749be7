"""Checkpoint -> one safetensors file per unit + `pylomin.json`, streamed in bounded memory, written atomically."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from pylomin import _os, hub
from pylomin import manifest as fmt
from pylomin.checkpoint import Checkpoint, SourceTensor, byte_range, open_checkpoint
from pylomin.compress import quantize_checkpoint
from pylomin.errors import PylominError
from pylomin.layout import runtime_layout
from pylomin.quant import Quantization, Scheme

logger = logging.getLogger(__name__)

# Bytes copied per read/write: what bounds the converter's memory, whatever the tensor sizes.
CHUNK_BYTES = 16 * 1024 * 1024
_TMP_MARK = ".pylomin-tmp-"
Granularity = Literal["block", "leaf"]


def convert(
    src: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    unit: Granularity = "block",
    blocks_per_unit: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    revision: str | None = None,
    model_cls: str | type | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    quantize_head: bool = False,
) -> Path:
    """Shard a checkpoint into one safetensors file per unit plus a `pylomin.json` manifest.

    Tensors are copied in chunks of 16 MiB, so memory stays bounded whatever the model size. The
    folder is built beside `out_dir` and renamed into place at the end: a folder with a manifest
    is always complete.

    Args:
        src: a Hugging Face model folder, a single `.safetensors`, `.bin` or `.pt` state dict, or a
            Hub repo id (`org/name`: config, tokenizer and one weight format are downloaded).
        out_dir: the folder to create.
        dtype: cast floating-point tensors to this dtype (integer and bool tensors are kept).
        unit: `"block"` (one unit per block of a numbered container, e.g. `encoder.layer.7`, other
            tensors with their parent module) or `"leaf"` (one unit per module owning tensors).
        blocks_per_unit: with `unit="block"`, put this many consecutive blocks in one unit file.
        overwrite: replace a non-empty `out_dir`.
        progress: show a progress bar in bytes.
        revision: with a repo id, the branch, tag or commit (default `main`).
        model_cls: the transformers class the folder will be loaded with (a class or an import path
            such as `"transformers.MixtralForCausalLM"`); default the class in `config.json`'s
            `architectures`. Tensors are written in the layout this class holds at run time
            (transformers' checkpoint conversion mapping: renamed keys, fused experts).
        quantize: `"int8"` (symmetric, one scale per output channel) or `"int4"` (groups of
            `group_size` inputs, 32/64/128, default 64; `"int4-g128"` also reads) weight-only
            quantization of the `nn.Linear` layers; embeddings, norms, biases, tied weights and the
            LM head are kept as stored. Layers the kernels cannot run (odd shapes) are skipped and
            logged. Needs a model folder (config.json) or `model_cls`.
        group_size: with `quantize="int4"`, inputs per scale.
        quantize_head: quantize the LM head too (when it is not tied to the embeddings).

    Returns:
        The path of the converted folder.

    Example:
        >>> pylomin.convert("bert-large/", "bert-large-pylomin/", dtype="float16")
    """
    if unit not in ("block", "leaf"):
        raise ValueError(f"unit must be 'block' or 'leaf', got {unit!r}")
    if blocks_per_unit < 1:
        raise ValueError(f"blocks_per_unit must be >= 1, got {blocks_per_unit}")
    scheme = Scheme.parse(quantize, group_size) if quantize is not None else None
    if scheme is None and (group_size is not None or quantize_head):
        raise ValueError("group_size and quantize_head go with quantize='int8' or 'int4'")
    out_dtype = fmt.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if out_dtype is not None and not out_dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got `{out_dtype}`")
    out = Path(out_dir)
    source: dict[str, object] = {}
    if hub.is_repo_id(src):
        repo_id = os.fspath(src)
        src = hub.snapshot(repo_id, revision)
        source = {"repo_id": repo_id, "revision": revision or "main", "commit": src.name}
    check_apart(Path(src), out)
    check_out(out, overwrite)
    convert_local(
        src,
        out,
        source,
        dtype=out_dtype,
        unit=unit,
        blocks_per_unit=blocks_per_unit,
        progress=progress,
        model_cls=model_cls,
        quantize=scheme,
        quantize_head=quantize_head,
    )
    return out


def convert_local(
    src: str | os.PathLike[str],
    out: Path,
    source: dict[str, object],
    *,
    dtype: torch.dtype | None = None,
    unit: Granularity = "block",
    blocks_per_unit: int = 1,
    progress: bool = True,
    model_cls: str | type | None = None,
    quantize: Scheme | None = None,
    quantize_head: bool = False,
) -> fmt.Manifest:
    """`convert` of a local checkpoint, arguments already checked; `source` goes into the manifest."""
    ckpt = open_checkpoint(src)
    if not ckpt.tensors:
        raise ValueError(f"`{src}` holds no tensors")
    ckpt, layout, experts, model = runtime_layout(ckpt, Path(src), model_cls)
    quantization = None
    if quantize is not None:
        ckpt, quantization = quantize_checkpoint(ckpt, model, quantize, head=quantize_head, src=Path(src))
    plan = plan_units([t.name for t in ckpt.tensors], unit=unit, blocks_per_unit=blocks_per_unit, own=experts)
    source = {**source, "path": str(Path(src).resolve())}
    source["files"] = [{"name": f.name, "size": f.stat().st_size} for f in ckpt.weight_files]
    return write_folder(
        ckpt, plan, out, dtype=dtype, progress=progress, source=source, layout=layout, quantization=quantization
    )


def write_folder(
    ckpt: Checkpoint,
    plan: dict[str, list[str]],
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    source: Mapping[str, object] | None = None,
    layout: dict[str, str] | None = None,
    quantization: Quantization | None = None,
) -> fmt.Manifest:
    """Write `ckpt` as the units of `plan` into `out`, atomically (built beside it, renamed last)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_MARK}{os.getpid()}-", dir=out.parent))
    try:
        m = _write_units(ckpt, plan, tmp, dtype, progress)
        m.source = dict(source or {})
        m.layout = layout
        m.quantization = quantization
        m.dtype = str(dtype).removeprefix("torch.") if dtype else None
        for f in ckpt.extra_files:
            shutil.copyfile(f, tmp / f.name)
            m.extra_files.append(f.name)
        fmt.write(m, tmp)  # last: only a complete folder has a manifest
        _fsync_dir(tmp / fmt.UNITS_DIR)
        _fsync_dir(tmp)
        _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        where = f" on `{e.filename}`" if e.filename else ""
        hint = " Is the disk full?" if e.errno in _SPACE_ERRNOS else ""
        raise OSError(
            e.errno, f"writing `{out}` failed: {e.strerror or e}{where}.{hint} Nothing was left behind."
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote `%s`: %d units, %.1f MiB", out, len(m.units), m.nbytes / 2**20)
    return m


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that exists and is not empty, unless `overwrite` and it is an earlier pylomin output.

    `overwrite` never replaces another folder (a model, a project): only one with a `pylomin.json`.
    """
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not out.is_dir():
        raise FileExistsError(f"`{out}` exists and is a file; choose a folder name for the converted model")
    if not overwrite:
        raise FileExistsError(f"`{out}` exists and is not empty; pass --overwrite (overwrite=True) to replace it")
    if not (out / fmt.MANIFEST_NAME).is_file():
        raise FileExistsError(
            f"`{out}` is not a pylomin output (it has no {fmt.MANIFEST_NAME}); --overwrite only replaces an earlier "
            "conversion, never another folder: remove it yourself or choose another OUT_DIR"
        )


def check_apart(src: Path, out: Path) -> None:
    """Refuse an `out` that is the source, inside it, or holds it: writing there would destroy the checkpoint."""
    s, o = src.resolve(), out.resolve()
    if s == o or o.is_relative_to(s) or s.is_relative_to(o):
        where = "is the source" if s == o else "is inside the source" if o.is_relative_to(s) else "holds the source"
        raise ValueError(
            f"OUT_DIR `{out}` {where} `{src}`: converting there would replace or change the checkpoint being read; "
            f"choose an OUT_DIR outside it, e.g. `{src.name}-pylomin` beside it"
        )


def plan_units(
    names: Iterable[str],
    *,
    unit: Granularity = "block",
    blocks_per_unit: int = 1,
    own: Set[str] = frozenset(),
) -> dict[str, list[str]]:
    """Group tensor names into units; returns unit name -> the modules it covers, in execution-order hint.

    Modules in `own` are units of their own whatever the granularity (fused experts: a token reads a
    few of them, so nothing else in their file may pull their pages in by read-around).

    >>> plan_units(["emb.weight", "layers.0.fc.weight", "layers.1.fc.weight"], blocks_per_unit=2)
    {'emb': ['emb'], 'layers.0-1': ['layers.0', 'layers.1']}
    """
    groups: dict[tuple[str, int], list[tuple[int, str]]] = {}  # (container, group) -> [(index, block)]
    units: dict[str, list[str]] = {}
    for name in names:
        module = name.rpartition(".")[0]
        separate = fmt.enclosing_module(module, own) if own else None
        if separate is not None:
            units.setdefault(separate, [separate])
            continue
        block = _block_of(module) if unit == "block" else None
        if block is None:
            units.setdefault(module, [module])
            continue
        container, index, prefix = block
        members = groups.setdefault((container, index // blocks_per_unit), [])
        if (index, prefix) not in members:
            members.append((index, prefix))
    for (container, _), members in groups.items():
        members.sort()
        first, last = members[0][0], members[-1][0]
        base = f"{container}." if container else ""
        uname = f"{base}{first}" if len(members) == 1 else f"{base}{first}-{last}"
        units[uname] = [prefix for _, prefix in members]
    return dict(sorted(units.items(), key=lambda kv: _natural_key(kv[0])))


def _block_of(module: str) -> tuple[str, int, str] | None:
    # The first numeric component marks a block of a numbered container: `model.layers.31.mlp` ->
    # container `model.layers`, index 31, block `model.layers.31`.
    parts = module.split(".") if module else []
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p), ".".join(parts[: i + 1])
    return None


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", name) if p]


def _write_units(
    ckpt: Checkpoint, plan: dict[str, list[str]], folder: Path, dtype: torch.dtype | None, progress: bool
) -> fmt.Manifest:
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
                tensors = by_unit[uname]
                # Larger items first (and 64-byte multiples before odd sizes) keeps every tensor aligned.
                order = sorted(
                    range(len(tensors)),
                    key=lambda k: (
                        -_out_dtype(tensors[k], dtype).itemsize,
                        _out_nbytes(tensors[k], dtype) % 64 != 0,
                        k,
                    ),
                )
                tensors = [tensors[k] for k in order]
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
    header, offsets = fmt.encode_header(entries)
    crc = 0
    with open(path, "wb") as out:
        out.write(header)
        crc = zlib.crc32(header, crc)
        for t in tensors:
            for piece in _chunks(t, _out_dtype(t, dtype), handles, buf):
                out.write(piece)
                crc = zlib.crc32(piece, crc)
                bar.update(len(piece))
        out.flush()
        os.fsync(out.fileno())
        size = out.tell()
    infos = {name: fmt.TensorInfo(fmt.dtype_code(d), tuple(shape), offsets[name], n) for name, d, shape, n in entries}
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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.rename(tmp, out)
    elif _os.exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)  # holds the old folder now
    else:  # no atomic exchange here: a crash between the two renames leaves no OUT_DIR (never a partial one)
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}{_TMP_MARK}{os.getpid()}-old-", dir=out.parent))
        os.rename(out, old / "x")
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _remove_stale_temps(out: Path) -> None:
    # Temp folders of a converter that was killed (its pid is gone) are removed, never reused.
    for p in out.parent.glob(f".{out.name}{_TMP_MARK}*"):
        try:
            pid = int(p.name[len(f".{out.name}{_TMP_MARK}") :].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
            logger.info("removing `%s`, left by an interrupted conversion", p)
            shutil.rmtree(p, ignore_errors=True)
