"""Checkpoint -> one safetensors file per unit + `pylomin.json`, streamed in bounded memory, written atomically."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import secrets
import shutil
import stat
import zlib
from collections.abc import Iterable, Mapping, Set
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from pylomin import _os
from pylomin.converter import hub
from pylomin.converter.checkpoint import Checkpoint, SourceTensor, byte_range, open_checkpoint
from pylomin.converter.compress import quantize_checkpoint
from pylomin.converter.layout import runtime_layout
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.quant import Quantization, Scheme, parse_scheme

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
    quantize: str | Scheme | None = None,
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
        quantize: weight-only quantization of the `nn.Linear` layers: `pylomin.Int8WeightOnly()`
            (symmetric, one scale per output channel) or `pylomin.Int4WeightOnly(group_size=64)`
            (a scale and zero per 32/64/128 inputs), or the shorthand `"int8"`, `"int4"`,
            `"int4-g128"`. Embeddings, norms, biases, tied weights and the LM head (unless the
            config's `head=True`) are kept as stored. Layers the kernels cannot run (odd shapes)
            are skipped and logged. Needs a model folder (config.json) or `model_cls`. Whether
            this machine's kernels run the scheme is checked where the folder is loaded
            (`pylomin-convert` checks first).

    Returns:
        The path of the converted folder.

    Example:
        >>> pylomin.convert("bert-large/", "bert-large-pylomin/", dtype="float16")
    """
    if unit not in ("block", "leaf"):
        raise ValueError(f"unit must be 'block' or 'leaf', got {unit!r}")
    if blocks_per_unit < 1:
        raise ValueError(f"blocks_per_unit must be >= 1, got {blocks_per_unit}")
    scheme = parse_scheme(quantize) if quantize is not None else None
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
        overwrite=overwrite,
        dtype=out_dtype,
        unit=unit,
        blocks_per_unit=blocks_per_unit,
        progress=progress,
        model_cls=model_cls,
        quantize=scheme,
    )
    return out


def convert_local(
    src: str | os.PathLike[str],
    out: Path,
    source: dict[str, object],
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    unit: Granularity = "block",
    blocks_per_unit: int = 1,
    progress: bool = True,
    model_cls: str | type | None = None,
    quantize: Scheme | None = None,
) -> fmt.Manifest:
    """`convert` of a local checkpoint, arguments already checked; `source` goes into the manifest."""
    ckpt = open_checkpoint(src)
    if not ckpt.tensors:
        raise ValueError(f"`{src}` holds no tensors")
    for name in (t.name for t in ckpt.tensors if fmt.is_padding(t.name)):
        raise ValueError(
            f"`{src}` holds tensor `{name}`, a name pylomin reserves for the alignment padding of unit files; "
            "rename it (it is not a model's tensor if the file is a pylomin unit file)"
        )
    ckpt, layout, experts, model = runtime_layout(ckpt, Path(src), model_cls)
    quantization = None
    if quantize is not None:
        ckpt, quantization = quantize_checkpoint(ckpt, model, quantize, src=Path(src))
    plan = plan_units([t.name for t in ckpt.tensors], unit=unit, blocks_per_unit=blocks_per_unit, own=experts)
    source = {**source, "path": str(Path(src).resolve())}
    source["files"] = [{"name": f.name, "size": f.stat().st_size} for f in ckpt.weight_files]
    return write_folder(
        ckpt,
        plan,
        out,
        dtype=dtype,
        progress=progress,
        source=source,
        layout=layout,
        quantization=quantization,
        overwrite=overwrite,
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
    overwrite: bool = False,
) -> fmt.Manifest:
    """Write `ckpt` as the units of `plan` into `out`, atomically (built beside it, renamed last).

    What sits at `out` is checked again when the folder is moved into place: it replaces nothing, the
    empty folder that was there when writing began, or (with `overwrite`) an empty folder or an earlier
    pylomin output. Anything else is left untouched, and FileExistsError says so.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out.parent)
    empty_at_start = _empty_dir_id(out)
    tmp, lock = _make_temp(out)
    tmp_id = _dir_id(lock)
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
        logger.debug("moving `%s` into place as `%s`", tmp, out)
        _move_into_place(tmp, out, empty_at_start=empty_at_start, overwrite=overwrite)
    except FileExistsError:  # `out` changed meanwhile: refused, ours removed, theirs untouched
        _remove_own(tmp, tmp_id)
        raise
    except OSError as e:
        _remove_own(tmp, tmp_id)
        where = f" on `{e.filename}`" if e.filename else ""
        hint = " Is the disk full?" if e.errno in _SPACE_ERRNOS else ""
        raise OSError(
            e.errno, f"writing `{out}` failed: {e.strerror or e}{where}.{hint} Nothing was left behind."
        ) from e
    except BaseException:
        _remove_own(tmp, tmp_id)
        raise
    finally:
        os.close(lock)  # after the removal: a folder is never unlocked while it is still ours to delete
    logger.info("wrote `%s`: %d units, %.1f MiB", out, len(m.units), m.nbytes / 2**20)
    return m


_SPACE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse an `out` that exists and is not empty, unless `overwrite` and it is an earlier pylomin output.

    `overwrite` never replaces another folder (a model, a project): only one with a `pylomin.json`.
    """
    if out.is_symlink():
        raise FileExistsError(f"`{out}` is a symbolic link; give the folder it points to, or choose another OUT_DIR")
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
                # 64-byte multiples first: each tensor after one whose size is not a multiple of
                # DATA_ALIGN needs a padding entry to start aligned, and the last one needs none.
                tensors = sorted(by_unit[uname], key=lambda t: _out_nbytes(t, dtype) % fmt.DATA_ALIGN != 0)
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


# --- Moving the finished folder into place: never over anything this conversion may not replace ---------


def _move_into_place(tmp: Path, out: Path, *, empty_at_start: tuple[int, int] | None, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`, deciding at the rename what may be replaced there.

    `check_out` ran before the conversion, minutes or hours ago: a folder made at `out` since (by
    hand, or by a second conversion) must not be swapped out and deleted.
    """
    for _ in range(3):  # `out` may come and go between our calls; each round re-reads it
        if _rename_noreplace(tmp, out):
            break
        try:
            st = os.lstat(out)
        except FileNotFoundError:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:  # a folder that is replaced keeps its mode, as `cp` into an existing folder keeps it
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if is_dir and _is_empty(out) and (overwrite or (st.st_dev, st.st_ino) == empty_at_start):
            try:  # rename(2) replaces an empty folder only: one that fills meanwhile is refused by the kernel
                os.rename(tmp, out)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue
        if overwrite and is_dir and (out / fmt.MANIFEST_NAME).is_file():
            _replace_output(tmp, out)
            break
        why = _NOT_AN_OUTPUT if overwrite else "was created while converting"
        raise _refusal(out, why)
    else:
        raise _refusal(out, "kept changing while converting")
    _fsync_dir(out.parent)


def _replace_output(tmp: Path, out: Path) -> None:
    """Swap the finished `tmp` with the earlier output at `out`, and delete that one if it still is one after the swap."""
    if _os.exchange(tmp, out):
        # What came out is checked again: a folder put at `out` between the check and the swap goes back.
        if _replaceable(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not _os.exchange(tmp, out):
            raise FileExistsError(
                f"`{out}` was replaced while converting by a folder that is not a pylomin output; it is now at "
                f"`{tmp}`, untouched, and the converted model at `{out}`: move them as you need"
            )
        raise _refusal(out, _NOT_AN_OUTPUT)
    # No atomic exchange here: the earlier output is moved aside, checked there, and deleted once ours is
    # in place. A crash between the two renames leaves no OUT_DIR (never a partial one) and a hidden
    # folder that the next conversion removes.
    aside = tmp.with_name(f"{tmp.name}-old")
    os.rename(out, aside)
    if not _replaceable(aside):
        if not _rename_noreplace(aside, out):
            raise FileExistsError(f"`{out}` changed while converting; what was there is now at `{aside}`, untouched")
        raise _refusal(out, _NOT_AN_OUTPUT)
    if not _rename_noreplace(tmp, out):
        shutil.rmtree(aside, ignore_errors=True)  # an earlier output, as --overwrite asked
        raise _refusal(out, "was created while converting")
    shutil.rmtree(aside, ignore_errors=True)


_NOT_AN_OUTPUT = f"changed while converting and is not a pylomin output (it has no {fmt.MANIFEST_NAME})"


def _refusal(out: Path, why: str) -> FileExistsError:
    return FileExistsError(
        f"`{out}` {why}; it was left as it is and this conversion was removed: remove `{out}` or choose another "
        "OUT_DIR, then convert again"
    )


def _replaceable(path: Path) -> bool:
    # A real folder (not a link to one) that is empty or holds a manifest: an earlier pylomin output.
    return path.is_dir() and not path.is_symlink() and (_is_empty(path) or (path / fmt.MANIFEST_NAME).is_file())


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless something exists at `dst`: True if renamed, False if `dst` exists.

    Linux `renameat2(RENAME_NOREPLACE)` checks and renames in one step. Where the C library or the
    file system lacks it (ENOSYS, EINVAL: glibc < 2.28, NFS, some FUSE file systems), `mkdir(dst)`
    claims the name first, failing if anything is there, and rename(2) then replaces that folder of
    ours, which it does only while the folder is still empty: nothing another process made at `dst`
    is ever replaced. What the fallback shows that renameat2 does not: an empty `dst`, for the
    instant between the two calls (or after a crash there, which a later conversion accepts).
    """
    fn = getattr(_os.libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    return _rename_claimed(src, dst)


def _rename_claimed(src: Path, dst: Path) -> bool:
    """`_rename_noreplace` without renameat2: claim `dst` with mkdir, then replace that empty folder."""
    try:
        os.mkdir(dst)
    except FileExistsError:
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # someone wrote into the folder we claimed: it is theirs now
            return False
        os.rmdir(dst)  # still our empty folder
        raise
    return True


# --- Temporary folders: ours are locked while we live, a dead converter's are removed -------------------


def _make_temp(out: Path) -> tuple[Path, int]:
    """A new hidden folder beside `out`, and a descriptor of it that holds an exclusive flock while we live.

    Its mode is 0777 less the umask, as `mkdir` and `cp` make folders (tempfile.mkdtemp's 0700 made every
    output private to its user). Its name carries this process's id and start time, read by
    `_remove_stale_temps`.
    """
    prefix = f".{out.name[:100]}{_TMP_MARK}{os.getpid()}-{_start_time(os.getpid()) or 0}-"
    while True:
        tmp = out.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # a file system without locks: the process id alone tells others we live
        logger.debug("cannot lock `%s` (%s)", tmp, e.strerror)
    return tmp, fd


def _dir_id(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _empty_dir_id(path: Path) -> tuple[int, int] | None:
    # The (device, inode) of `path` when it is a real, empty folder: the only such folder ours may replace.
    try:
        st = os.lstat(path)
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) and _is_empty(path) else None
    except OSError:
        return None


def _remove_own(tmp: Path, ident: tuple[int, int]) -> None:
    # Only the folder we made, recognized by its inode: after a refused swap `tmp` could hold another.
    try:
        st = os.lstat(tmp)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == ident:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temps(parent: Path) -> None:
    """Remove the temporary folders in `parent` whose converter is gone (killed: SIGKILL, a crash, a power cut).

    A folder is removed when its converter's process is gone (or its id now names a process started at
    another time: ids are reused) and no one holds its flock. The kernel drops a flock when its holder
    dies, whatever killed it, so the lock decides across pid namespaces (containers sharing a folder) and
    on network file systems that lock; the process check covers the instant between a folder's mkdir and
    its lock, and file systems without locks.
    """
    for p in parent.glob(f".*{_TMP_MARK}*"):
        fields = p.name.rpartition(_TMP_MARK)[2].split("-")
        if not fields[0].isdigit():
            continue
        started = int(fields[1]) if len(fields) >= 3 and fields[1].isdigit() else None  # older names: no start time
        if _alive(int(fields[0]), started):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its converter lives, in another pid namespace or on another machine
            except OSError:
                pass  # no locks on this file system: the process check decided
            logger.info("removing `%s`, left by an interrupted conversion", p)
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


def _alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` exists and, when `started` is known, is the one that started then."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process id can be
        return False
    except PermissionError:  # another user's process
        pass
    now = _start_time(pid)
    return not started or now is None or now == started  # no start time recorded or readable: the id decides


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses: split after the last.
    return int(stat_line.rpartition(b")")[2].split()[19])
