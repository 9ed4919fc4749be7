"""`load_streaming`: a converted folder becomes a live model whose parameters stay on disk until used."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin import manifest as fmt
from pylomin.errors import PylominError
from pylomin.hooks import HookManager, Slot
from pylomin.prefetch import Prefetcher
from pylomin.store import Store

logger = logging.getLogger(__name__)
_META_LOCK = threading.Lock()


@dataclass
class _Stream:
    store: Store
    manager: HookManager
    base_class: type


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
) -> Any:
    """Build `model_cls` with its parameters on disk, paged in per unit as the model runs.

    Args:
        path: a folder written by `pylomin.convert` / `pylomin-convert`.
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

    Returns:
        The model in eval mode, ready for inference; outputs equal the in-memory model's.

    Example:
        >>> model = pylomin.load_streaming("bert-pylomin/", transformers.BertModel)
        >>> with torch.no_grad():
        ...     out = model(input_ids)
    """
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(
            f"`{folder}` does not exist; convert a model first with `pylomin-convert MODEL {folder}`"
        )
    device = torch.device(device)
    cast = fmt.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    manifest = fmt.read(folder)
    store = Store(folder, manifest, drop_page_cache=drop_page_cache)
    try:
        model = _build(model_cls, folder, cast or _stored_dtype(manifest))
        targets = _bind(model, manifest, store, cast)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        manager = HookManager(
            store,
            model,
            targets,
            device=device,
            dtype=cast,
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
    model.__dict__["_pylomin_stream"] = _Stream(store, manager, base)
    model.__dict__["_pylomin_device"] = device
    # Only what does not reference the model: the finalizer must not keep it alive.
    weakref.finalize(model, _close, manager.prefetcher, store)
    return model.eval()


def unload_(model: nn.Module) -> nn.Module:
    """Remove pylomin's hooks from `model` and close its files; its parameters are left on meta.

    Returns:
        The same model object.
    """
    stream: _Stream | None = model.__dict__.pop("_pylomin_stream", None)
    if stream is None:
        raise ValueError(f"`{type(model).__name__}` is not a streamed model (not returned by pylomin.load_streaming)")
    stream.manager.detach()
    stream.store.close()
    model.__class__ = stream.base_class
    model.__dict__.pop("_pylomin_device", None)
    return model


def _close(prefetcher: Prefetcher[int] | None, store: Store) -> None:
    if prefetcher is not None:
        prefetcher.close()
    store.close()


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


def _stored_dtype(manifest: fmt.Manifest) -> torch.dtype | None:
    # The floating dtype most bytes are stored in: what the model is built in when no dtype is given.
    sizes: dict[torch.dtype, int] = {}
    for unit in manifest.units:
        for info in unit.tensors.values():
            if info.torch_dtype.is_floating_point:
                sizes[info.torch_dtype] = sizes.get(info.torch_dtype, 0) + info.length
    return max(sizes, key=lambda d: sizes[d]) if sizes else None


def _build(model_cls: Callable[..., nn.Module] | type, folder: Path, dtype: torch.dtype | None) -> nn.Module:
    is_hf = isinstance(model_cls, type) and (hasattr(model_cls, "_from_config") or hasattr(model_cls, "_model_mapping"))
    with _params_on_meta():
        if is_hf:
            from transformers import AutoConfig

            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"`{folder / 'config.json'}` not found: a transformers class is built from the folder's config; "
                    "pass a zero-argument factory returning the model instead"
                )
            config = AutoConfig.from_pretrained(folder)
            expected = getattr(getattr(model_cls, "config_class", None), "model_type", "")
            if expected and config.model_type != expected:
                raise PylominError(
                    f"`{folder / 'config.json'}` describes a `{config.model_type}` model, but `{model_cls.__name__}` "
                    f"is a `{expected}` class; pass the class matching the checkpoint (or an Auto class)"
                )
            build = getattr(model_cls, "_from_config", None) or model_cls.from_config  # type: ignore[union-attr]
            model = build(config, dtype=dtype) if dtype is not None else build(config)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
        else:
            model = model_cls()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_cls returned a {type(model).__name__}, not an nn.Module")
    return model


@contextlib.contextmanager
def _params_on_meta() -> Iterator[None]:
    """Every parameter registered while this is active lands on meta; buffers stay real.

    Buffers computed in `__init__` (position ids, rotary frequencies, masks) keep their values,
    which building under `torch.device("meta")` would lose.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with _META_LOCK:
        nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
        try:
            yield
        finally:
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def _bind(
    model: nn.Module, manifest: fmt.Manifest, store: Store, dtype: torch.dtype | None
) -> dict[nn.Module, list[Slot]]:
    """Match the model to the manifest strictly, put placeholders in, and return each hook target's slots."""
    index = manifest.tensor_index()
    modules = dict(model.named_modules(remove_duplicate=False))

    def stored(name: str) -> str | None:
        name = manifest.aliases.get(name, name)
        return name if name in index else None

    groups: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), (p, []))[1].append(name)
    ignore_missing = _patterns(model, "_keys_to_ignore_on_load_missing")
    ignore_unexpected = _patterns(model, "_keys_to_ignore_on_load_unexpected")
    missing: list[str] = []
    mismatched: list[str] = []
    used: set[str] = set()
    unit_modules = {m for u in manifest.units for m in u.modules}
    targets: dict[nn.Module, list[Slot]] = {}

    for p, names in groups.values():
        sources = [s for s in map(stored, names) if s is not None]
        used.update(n for n in names if stored(n) is not None)
        if not sources:
            missing.extend(n for n in names if not _matches(n, ignore_missing))
            continue
        info = index[sources[0]][1]
        if tuple(p.shape) != info.shape:
            mismatched.append(
                f"size mismatch for {names[0]}: copying a param with shape {torch.Size(info.shape)} from checkpoint, "
                f"the shape in current model is {p.shape}."
            )
            continue
        load_dtype = dtype if dtype is not None and info.torch_dtype.is_floating_point else info.torch_dtype
        # requires_grad as built: matmul picks its kernel path by it, so it is part of bit-identity.
        grad = p.requires_grad and load_dtype.is_floating_point
        placeholder = nn.Parameter(torch.empty(info.shape, dtype=load_dtype, device="meta"), requires_grad=grad)
        slot = Slot(sources[0], placeholder)
        for n in names:
            owner, _, attr = n.rpartition(".")
            slot.owners.append((modules[owner], attr))
            modules[owner]._parameters[attr] = placeholder
            # A stored name is paged with its unit; another name of a tied parameter with its own module.
            target = _enclosing_unit_module(owner, unit_modules) if n in index else owner
            hooked = targets.setdefault(modules[target if target is not None else owner], [])
            if slot not in hooked:
                hooked.append(slot)

    for name, buf in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        source = stored(name)
        if source is not None:
            used.add(name)
            if attr not in modules[owner]._non_persistent_buffers_set:
                modules[owner]._buffers[attr] = store.view(source).to(buf.dtype, copy=True)
            # Non-persistent buffers keep the values `__init__` computed, as transformers does.
        elif attr not in modules[owner]._non_persistent_buffers_set and not _matches(name, ignore_missing):
            missing.append(name)

    unexpected = [n for n in [*index, *manifest.aliases] if n not in used and not _matches(n, ignore_unexpected)]
    if missing or unexpected or mismatched:
        lines = []
        if missing:
            lines.append("Missing key(s) in state_dict: " + ", ".join(f'"{k}"' for k in missing) + ". ")
        if unexpected:
            lines.append("Unexpected key(s) in state_dict: " + ", ".join(f'"{k}"' for k in unexpected) + ". ")
        lines.extend(mismatched)
        raise PylominError(
            f"Error(s) in loading state_dict for {type(model).__name__}:\n\t"
            + "\n\t".join(lines)
            + f"\nThe converted folder `{store.folder}` does not match the model class; pass the class the checkpoint "
            "was saved from (or convert the matching checkpoint)."
        )
    return targets


def _enclosing_unit_module(module: str, unit_modules: set[str]) -> str | None:
    while module not in unit_modules:
        if not module:
            return None
        module = module.rpartition(".")[0]
    return module


def _patterns(model: nn.Module, attr: str) -> list[str]:
    return list(getattr(model, attr, None) or [])


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


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
