"""A streamed model: its parameters bound to the tensors of a manifest, its class, and what pylomin attaches to it.

`bind` matches the model to the manifest and puts placeholders on meta in, one `Slot` per tied
parameter; `Stream` is the one thing pylomin attaches to a model (reached through `stream_of`); the
streamed class fixes what a model with parameters on meta would get wrong (`.device`, `.to`, pickling).
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.runtime.lifecycle import Lifecycle
from pylomin.runtime.pager import Slot
from pylomin.runtime.policy import MemoryPolicy
from pylomin.runtime.prefetch import Prefetcher
from pylomin.runtime.store import Store

logger = logging.getLogger(__name__)


@dataclass
class Stream:
    """What pylomin attaches to a model it streams: its files, its hooks, and how to undo them."""

    store: Store  # the unit files, mapped
    policy: MemoryPolicy  # what stays resident, what is read ahead: `policy.plan`, `policy.note`
    lifecycle: Lifecycle  # the hooks; `lifecycle.pager` puts parameters in place and takes them out
    reader: Prefetcher | None  # the reader thread (None: prefetch off)
    base_class: type
    device: torch.device
    restore: bool  # unload_ copies parameters back into memory (models that came from memory)
    cleanup: Any  # weakref.finalize closing the files (and removing a temporary folder)


_STREAM = "_pylomin_stream"  # the one key pylomin sets on a model; read only through stream_of


def stream_of(model: nn.Module) -> Stream:
    """The `Stream` of a model from `load_streaming` or `lazy_loading`; `ValueError` for any other model."""
    stream = model.__dict__.get(_STREAM)
    if not isinstance(stream, Stream):
        raise ValueError(
            f"`{type(model).__name__}` is not a pylomin model (not returned by load_streaming or lazy_loading)"
        )
    return stream


def set_stream(model: nn.Module, stream: Stream) -> None:
    """Attach `stream` to `model`, whose class becomes the streamed subclass of its own."""
    model.__class__ = _streamed_class(stream.base_class)
    model.__dict__[_STREAM] = stream


def pop_stream(model: nn.Module) -> Stream:
    """Detach the `Stream` of `model` and give it its class back."""
    stream = stream_of(model)
    del model.__dict__[_STREAM]
    model.__class__ = stream.base_class
    return stream


def is_streamed(model: nn.Module) -> bool:
    """Whether pylomin streams `model` now."""
    return isinstance(model.__dict__.get(_STREAM), Stream)


def stored_dtype(manifest: fmt.Manifest) -> torch.dtype | None:
    # The floating dtype most bytes are stored in: what the model is built in when no dtype is given.
    sizes: dict[torch.dtype, int] = {}
    for unit in manifest.units:
        for info in unit.tensors.values():
            if info.torch_dtype.is_floating_point:
                sizes[info.torch_dtype] = sizes.get(info.torch_dtype, 0) + info.length
    return max(sizes, key=lambda d: sizes[d]) if sizes else None


def bind(
    model: nn.Module, manifest: fmt.Manifest, store: Store, dtype: torch.dtype | None, *, strict: bool = True
) -> dict[nn.Module, list[Slot]]:
    """Match the model to the manifest, put placeholders in, and return each hook target's slots.

    `strict=False` lets parameters and buffers the manifest does not hold stay as they are (in memory).
    """
    index = manifest.tensor_index()
    modules = dict(model.named_modules(remove_duplicate=False))
    # A base model (`LlamaModel`, what `AutoModel` builds) from a checkpoint of its model with a head:
    # its names are the checkpoint's without the base model prefix, as transformers loads it.
    prefix = _base_prefix(model, index)

    def stored(name: str) -> str | None:
        name = manifest.aliases.get(prefix + name, prefix + name)
        return name if name in index else None

    def hook_target(owner: str) -> nn.Module:
        # The unit (a checkpoint module) enclosing `owner`, as a module of this model; else `owner` itself.
        unit = fmt.enclosing_module(prefix + owner if owner else prefix.rstrip("."), unit_modules)
        if unit is not None and prefix and unit.startswith(prefix):
            unit = unit[len(prefix) :]
        elif unit is not None and prefix:
            unit = "" if unit == prefix.rstrip(".") else None
        return modules[unit if unit is not None and unit in modules else owner]

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
        used.update(prefix + n for n in names if stored(n) is not None)
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
        owner0, _, attr0 = names[0].rpartition(".")
        exact = attr0 in getattr(modules[owner0], "exact_dtype", ())  # a quantized layer's payload and scales
        cast = dtype is not None and info.torch_dtype.is_floating_point and not exact
        load_dtype = dtype if cast and dtype is not None else info.torch_dtype
        # requires_grad as built: matmul picks its kernel path by it, so it is part of bit-identity.
        grad = p.requires_grad and load_dtype.is_floating_point
        placeholder = nn.Parameter(torch.empty(info.shape, dtype=load_dtype, device="meta"), requires_grad=grad)
        slot = Slot(sources[0], placeholder)
        for n in names:
            owner, _, attr = n.rpartition(".")
            slot.owners.append((modules[owner], attr))
            modules[owner]._parameters[attr] = placeholder
            # A stored name is paged with its unit; another name of a tied parameter with its own module.
            hooked = targets.setdefault(hook_target(owner) if prefix + n in index else modules[owner], [])
            if slot not in hooked:
                hooked.append(slot)

    for name, buf in model.named_buffers(remove_duplicate=False):
        owner, _, attr = name.rpartition(".")
        source = stored(name)
        if source is not None:
            used.add(prefix + name)
            if attr not in modules[owner]._non_persistent_buffers_set:
                modules[owner]._buffers[attr] = store.view(source).to(buf.dtype, copy=True)
            # Non-persistent buffers keep the values `__init__` computed, as transformers does.
        elif attr not in modules[owner]._non_persistent_buffers_set and not _matches(name, ignore_missing):
            missing.append(name)

    unexpected = [n for n in [*index, *manifest.aliases] if n not in used and not _matches(n, ignore_unexpected)]
    if prefix:  # the head's tensors: a base model does not use them (transformers only logs them)
        head = [n for n in unexpected if not n.startswith(prefix)]
        if head:
            logger.info(
                "%s does not use %d tensor(s) of the checkpoint's head: %s", type(model).__name__, len(head), head
            )
        unexpected = [n for n in unexpected if n.startswith(prefix)]
    if not strict:
        missing = []
    if missing or unexpected or mismatched:
        # A folder edited by hand (a unit removed with its entry) looks like the wrong class: say which it is.
        fmt.check_digest(store.folder)
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


def _base_prefix(model: nn.Module, index: Mapping[str, object]) -> str:
    """`"model."` when `model` is a transformers base model whose names appear in the checkpoint only
    under its `base_model_prefix` (the checkpoint of a model with a head); else `""`."""
    base = getattr(model, "base_model_prefix", "")
    if not isinstance(base, str) or not base or hasattr(model, base):
        return ""  # not a transformers model, or one with a head (its base is a child)
    names = [n for n, _ in model.named_parameters()]
    if not names or any(n in index for n in names):
        return ""
    return f"{base}." if all(f"{base}.{n}" in index for n in names) else ""


def _patterns(model: nn.Module, attr: str) -> list[str]:
    return list(getattr(model, attr, None) or [])


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


_STREAMED_CLASSES: dict[type, type] = {}


def _streamed_class(base: type) -> type:
    """A subclass of `base` for a streamed model: `device` is the streaming device, not that of its first
    (meta) parameter; `.to` where it already is does nothing, elsewhere says how to load it there;
    pickling says what to save instead. Its name and module are `base`'s, so it prints the same."""
    cls = _STREAMED_CLASSES.get(base)
    if cls is None:
        ns: dict[str, Any] = {
            "to": _to,
            "cpu": lambda self: _to(self, "cpu"),
            "cuda": lambda self, device=None: _to(self, "cuda" if device is None else torch.device("cuda", device)),
            "float": lambda self: _to(self, torch.float32),
            "half": lambda self: _to(self, torch.float16),
            "bfloat16": lambda self: _to(self, torch.bfloat16),
            "double": lambda self: _to(self, torch.float64),
            "__reduce_ex__": _refuse_pickle,
        }
        if isinstance(inspect.getattr_static(base, "device", None), property):
            # transformers reads `model.device` from the first parameter, which is on meta here.
            ns["device"] = property(lambda self: stream_of(self).device)
        cls = type(base.__name__, (base,), ns)
        cls.__module__ = base.__module__
        cls.__qualname__ = base.__qualname__
        _STREAMED_CLASSES[base] = cls
    return cls


def _to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    stream = stream_of(self)
    here = stream.device
    if device is not None and device.type == "meta":
        raise PylominError(
            "a streamed model's parameters are placeholders on meta already, paged in from their files per unit; "
            "`pylomin.unload_(model)` detaches it from its files"
        )
    if device is not None and (device.type != here.type or device.index not in (None, here.index)):
        raise PylominError(
            f"this streamed model runs on `{here}`; its weights stay in their files, so `.to({device})` cannot move "
            f"them: load it with `pylomin.load_streaming(..., device='{device}')`"
        )
    if dtype is not None:
        floats = {  # a quantized layer's scales keep their own dtype (`exact_dtype`), as in memory
            p.dtype
            for m in self.modules()
            for n, p in m._parameters.items()
            if p is not None and p.is_floating_point() and n not in getattr(m, "exact_dtype", ())
        }
        if floats - {dtype}:
            raise PylominError(
                f"this streamed model's weights are {', '.join(sorted(map(str, floats)))}; its weights stay in their "
                f"files, so `.to({dtype})` cannot cast them: load it with `pylomin.load_streaming(..., dtype={dtype})`"
            )
    return self


def _refuse_pickle(self: nn.Module, protocol: int) -> Any:
    raise TypeError(
        f"a streamed `{type(self).__name__}` cannot be pickled: its weights are mappings of the files of "
        f"`{stream_of(self).store.folder}`. Save `model.state_dict()` (it holds the real tensors) or call "
        "`save_pretrained`, or pickle the folder's path and load it again"
    )
