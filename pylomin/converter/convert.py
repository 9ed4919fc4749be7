"""Checkpoint -> converted folder: `convert` checks its arguments, groups tensors into units, writes atomically."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Set
from pathlib import Path
from typing import Literal

import torch

from pylomin.converter import hub
from pylomin.converter.checkpoint import Checkpoint, open_checkpoint
from pylomin.converter.compress import quantize_checkpoint
from pylomin.converter.layout import runtime_layout
from pylomin.converter.publish import (
    dir_id,
    empty_dir_id,
    fsync_dir,
    make_temp,
    move_into_place,
    remove_own,
    remove_stale_temps,
)
from pylomin.converter.write import write_units
from pylomin.format import manifest as fmt
from pylomin.format.header import is_padding, parse_dtype
from pylomin.format.quant import Quantization, Scheme, parse_scheme

logger = logging.getLogger(__name__)

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
    out_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
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
    for name in (t.name for t in ckpt.tensors if is_padding(t.name)):
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
    remove_stale_temps(out.parent)
    empty_at_start = empty_dir_id(out)
    tmp, lock = make_temp(out)
    tmp_id = dir_id(lock)
    try:
        m = write_units(ckpt, plan, tmp, dtype, progress)
        m.source = dict(source or {})
        m.layout = layout
        m.quantization = quantization
        m.dtype = str(dtype).removeprefix("torch.") if dtype else None
        for f in ckpt.extra_files:
            shutil.copyfile(f, tmp / f.name)
            m.extra_files.append(f.name)
        fmt.write(m, tmp)  # last: only a complete folder has a manifest
        fsync_dir(tmp / fmt.UNITS_DIR)
        fsync_dir(tmp)
        logger.debug("moving `%s` into place as `%s`", tmp, out)
        move_into_place(tmp, out, empty_at_start=empty_at_start, overwrite=overwrite)
    except FileExistsError:  # `out` changed meanwhile: refused, ours removed, theirs untouched
        remove_own(tmp, tmp_id)
        raise
    except OSError as e:
        remove_own(tmp, tmp_id)
        where = f" on `{e.filename}`" if e.filename else ""
        hint = " Is the disk full?" if e.errno in _SPACE_ERRNOS else ""
        raise OSError(
            e.errno, f"writing `{out}` failed: {e.strerror or e}{where}.{hint} Nothing was left behind."
        ) from e
    except BaseException:
        remove_own(tmp, tmp_id)
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
