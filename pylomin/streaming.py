"""`load_streaming`: a converted folder becomes a live model whose parameters stay on disk until used."""

from __future__ import annotations

import inspect
import logging
import os
import re
import shutil
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin import hub
from pylomin import manifest as fmt
from pylomin.build import bind, build_on_meta, stored_dtype
from pylomin.hooks import HookManager
from pylomin.prefetch import Prefetcher
from pylomin.store import Store

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    store: Store
    manager: HookManager
    base_class: type
    restore: bool  # unload_ copies parameters back into memory (models that came from memory)
    cleanup: Any  # weakref.finalize closing the files (and removing a temporary folder)


def load_streaming(
    path: str | os.PathLike[str],
    model_cls: Callable[..., nn.Module] | type,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    drop_page_cache: bool = True,
    prefetch: int = 2,
    prefetch_bytes: int | str = "256MiB",
    memory_budget: int | str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Any:
    """Build `model_cls` with its parameters on disk, paged in per unit as the model runs.

    Args:
        path: a folder written by `pylomin.convert` / `pylomin-convert`, or a Hub repo id
            (`org/name`), converted on first use into pylomin's cache and reused afterwards.
        model_cls: a transformers model class (`BertModel`, `AutoModelForCausalLM`, ...), built
            from the folder's `config.json`; or any zero-argument callable returning the `nn.Module`.
        device: `"cpu"` (parameters are zero-copy views of the mapped files) or a CUDA device
            (each unit is copied in before it runs).
        dtype: cast floating-point parameters to this dtype as they are loaded; default: as stored.
        drop_page_cache: after a unit runs, also drop its pages from the page cache, so the
            process leaves no warm copy behind; `False` keeps them cached for the next forward
            (faster when RAM allows).
        prefetch: how many units a background reader makes resident ahead of the one running,
            in the execution order recorded on the first forward; 0 turns prefetching off.
        prefetch_bytes: at most this many bytes read ahead (`"512MiB"`, `"2GB"` or an int).
        memory_budget: keep as many parameters resident for the model's lifetime as fit in this
            many bytes (tied and embedding weights first, then in execution order); the rest
            stream. A budget larger than the model behaves like the in-memory model.
        revision: with a repo id, the branch, tag or commit (default `main`).
        cache_dir: with a repo id, where converted models are kept (default `$PYLOMIN_CACHE`,
            else `~/.cache/pylomin`).

    Returns:
        The model in eval mode, ready for inference; outputs equal the in-memory model's.

    Example:
        >>> model = pylomin.load_streaming("bert-pylomin/", transformers.BertModel)
        >>> with torch.no_grad():
        ...     out = model(input_ids)
    """
    folder = Path(path)
    if hub.is_repo_id(path):
        folder = hub.converted(os.fspath(path), revision, cache_dir=cache_dir)
    elif not folder.exists():
        raise FileNotFoundError(
            f"`{folder}` does not exist; convert a model first with `pylomin-convert MODEL {folder}`"
        )
    cast = fmt.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    manifest = fmt.read(folder)
    model = build_on_meta(model_cls, folder, cast or stored_dtype(manifest))
    return attach_(
        model,
        folder,
        manifest,
        device=device,
        dtype=cast,
        drop_page_cache=drop_page_cache,
        prefetch=prefetch,
        prefetch_bytes=prefetch_bytes,
        memory_budget=memory_budget,
    ).eval()


def attach_(
    model: nn.Module,
    folder: Path,
    manifest: fmt.Manifest,
    *,
    strict: bool = True,
    restore: bool = False,
    remove_folder: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    drop_page_cache: bool = True,
    prefetch: int = 2,
    prefetch_bytes: int | str = "256MiB",
    memory_budget: int | str | None = None,
) -> Any:
    """Bind `model` to the unit files of `folder` and register the hooks (shared by load_streaming and lazy_loading)."""
    device = torch.device(device)
    store = Store(folder, manifest, drop_page_cache=drop_page_cache)
    try:
        targets = bind(model, manifest, store, dtype, strict=strict)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        manager = HookManager(
            store,
            model,
            targets,
            device=device,
            dtype=dtype,
            prefetch_units=prefetch,
            prefetch_bytes=parse_bytes(prefetch_bytes),
            memory_budget=parse_bytes(memory_budget) if memory_budget is not None else 0,
        )
        manager.attach()
    except BaseException:
        store.close()
        raise
    base = type(model)
    if isinstance(inspect.getattr_static(base, "device", None), property):
        # transformers reads `model.device` from the first parameter, which is on meta here.
        model.__class__ = _with_device(base)
    # Only what does not reference the model: the finalizer must not keep it alive.
    cleanup = weakref.finalize(model, _close, manager.prefetcher, store, folder if remove_folder else None)
    model.__dict__["_pylomin_stream"] = _Stream(store, manager, base, restore, cleanup)
    model.__dict__["_pylomin_device"] = device
    return model


def unload_(model: nn.Module) -> nn.Module:
    """Remove pylomin's hooks from `model`, stop its reader and close its files.

    A model from `lazy_loading` gets its parameters back in memory (and its temporary folder is
    removed); a model from `load_streaming` is left with its parameters on meta.

    Returns:
        The same model object.
    """
    stream: _Stream | None = model.__dict__.pop("_pylomin_stream", None)
    if stream is None:
        raise ValueError(
            f"`{type(model).__name__}` is not a pylomin model (not returned by load_streaming or lazy_loading)"
        )
    stream.manager.detach(restore=stream.restore)
    stream.cleanup()
    model.__class__ = stream.base_class
    model.__dict__.pop("_pylomin_device", None)
    return model


def _close(prefetcher: Prefetcher[int] | None, store: Store, folder: Path | None) -> None:
    if prefetcher is not None:
        prefetcher.close()
    store.close()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(size: int | str) -> int:
    """`"2GiB"`, `"512MB"`, `"1.5 GiB"` or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. '512MiB', '2GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


_DEVICE_CLASSES: dict[type, type] = {}


def _with_device(base: type) -> type:
    # A subclass whose `device` is the streaming device, not the (meta) device of its first parameter.
    cls = _DEVICE_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (base,), {"device": property(lambda self: self.__dict__["_pylomin_device"])})
        cls.__module__ = base.__module__
        cls.__qualname__ = base.__qualname__
        _DEVICE_CLASSES[base] = cls
    return cls
