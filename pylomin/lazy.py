"""`lazy_loading`: the original in-memory API, on the streaming runtime (spill to unit files, then stream)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from torch import nn

from pylomin import _os
from pylomin.converter.checkpoint import from_tensors
from pylomin.converter.convert import check_out, write_folder
from pylomin.format import manifest as fmt
from pylomin.format.quant import Scheme
from pylomin.quantize import quantize_
from pylomin.runtime.model import is_streamed
from pylomin.runtime.options import Options
from pylomin.runtime.quant import QuantLinear
from pylomin.runtime.streaming import attach_

M = TypeVar("M", bound=nn.Module)
ModuleRef = str | nn.Module


def lazy_loading(
    model: M,
    *,
    target_classes: Sequence[type[nn.Module]] | None = None,
    target_modules: Sequence[ModuleRef] | None = None,
    skip_modules: Sequence[ModuleRef] | None = None,
    offload_dir: str | os.PathLike[str] | None = None,
    prefetch: int = 2,
    prefetch_bytes: int | str = "256MiB",
    drop_page_cache: bool = True,
    quantize: str | Scheme | None = None,
) -> M:
    """Move the parameters of the chosen modules to disk; each module loads them only while it runs.

    The parameters are written to safetensors unit files (one per module) and the model is then
    streamed like `load_streaming`'s: outputs are bit-identical, and the memory the parameters
    held is given back.

    Args:
        model: a model in memory (changed in place).
        target_classes: make modules of these types lazy (e.g. `[nn.Linear, nn.Embedding]`).
        target_modules: make exactly these modules lazy (names like `"encoder.layer.0"`, or modules).
        skip_modules: never make these modules, or anything inside them, lazy.
        offload_dir: where the unit files go (kept after `unload_`); default a temporary folder,
            removed when the model is garbage-collected or `pylomin.unload_` is called.
        prefetch, prefetch_bytes, drop_page_cache: as for `load_streaming`.
        quantize: `pylomin.Int8WeightOnly()`, `pylomin.Int4WeightOnly(...)` or `"int8"`, `"int4"`
            (`"int4-g128"`): quantize the Linear layers first (`pylomin.quantize_`, which refuses a
            scheme this machine's kernels cannot run), so the spilled units are a quarter (an
            eighth) of the bytes.
            The model keeps the quantized layers after `unload_`.

    Returns:
        The same model object. With no targets, every module owning parameters becomes lazy.

    Example:
        >>> model = pylomin.lazy_loading(model, target_classes=[nn.Linear], skip_modules=["pooler"])
    """
    if target_classes is not None and target_modules is not None:
        raise ValueError("pass either target_classes or target_modules, not both")
    options = Options.check(
        prefetch=prefetch, prefetch_bytes=prefetch_bytes, drop_page_cache=drop_page_cache, memory_budget=0
    )
    if is_streamed(model):
        raise ValueError(f"`{type(model).__name__}` is already streamed or lazy; call pylomin.unload_ first")
    if quantize is not None:
        before = {m: n for n, m in model.named_modules()}  # modules given as objects: by name, as they are replaced
        target_modules = None if target_modules is None else [_name(t, model, before) for t in target_modules]
        skip_modules = None if skip_modules is None else [_name(s, model, before) for s in skip_modules]
        quantize_(model, quantize)
        if target_classes is not None and any(issubclass(nn.Linear, c) for c in target_classes):
            target_classes = [*target_classes, QuantLinear]  # Linear layers that are quantized now
    names = {m: n for n, m in model.named_modules()}
    skipped = {_name(s, model, names) for s in skip_modules or []}
    if target_modules is not None:
        targets = [_name(t, model, names) for t in target_modules]
    elif target_classes is not None:
        targets = [n for m, n in names.items() if isinstance(m, tuple(target_classes))]
    else:
        targets = [n for m, n in names.items() if any(True for _ in m.parameters(recurse=False))]
    targets = [t for t in targets if not _inside(t, skipped)]
    owned = _assign(model, targets, skipped)
    if not owned:
        raise ValueError("no parameters to make lazy: the targets own none (or all are skipped)")

    params = {name: p.detach() for name, p in model.named_parameters(remove_duplicate=False) if name in owned}
    device = next(iter(params.values())).device
    ckpt = from_tensors({n: t.cpu() for n, t in params.items()}, Path("<memory>"))
    del params
    used = set(owned.values())
    plan = {t: [t] for t in targets if t in used}
    if offload_dir is None:
        # An empty folder of our own: write_folder swaps the finished one in, and it is removed whole.
        folder, remove = Path(tempfile.mkdtemp(prefix="pylomin-lazy-")), True
    else:
        folder, remove = Path(offload_dir), False
        check_out(folder, overwrite=False)
    try:
        manifest = write_folder(ckpt, plan, folder, progress=False, source={"path": "<memory>"})
    except BaseException:
        if remove:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    del ckpt  # the last references to the in-memory parameters go with it
    attach_(model, folder, manifest, replace(options, device=device), strict=False, restore=True, remove_folder=remove)
    _os.trim_freed_memory()  # the parameters that lived in malloc's heap (below its mmap threshold) go back too
    return model


def _name(ref: ModuleRef, model: nn.Module, names: dict[nn.Module, str]) -> str:
    if isinstance(ref, nn.Module):
        if ref not in names:
            raise ValueError(f"module {type(ref).__name__} is not part of the model")
        return names[ref]
    try:
        model.get_submodule(ref)
    except AttributeError:
        raise ValueError(f"`{ref}` is not a submodule of {type(model).__name__}") from None
    return ref


def _inside(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") or p == "" for p in prefixes)


def _assign(model: nn.Module, targets: list[str], skipped: set[str]) -> dict[str, str]:
    """Parameter name -> the target module that pages it: its deepest enclosing target, unless skipped first."""
    chosen = set(targets)
    stops = chosen | skipped  # the walk up from a parameter ends at the first of either
    owned: dict[str, str] = {}
    for name, _ in model.named_parameters(remove_duplicate=False):
        module = fmt.enclosing_module(name.rpartition(".")[0], stops)
        if module is not None and module in chosen:
            owned[name] = module
    return owned
