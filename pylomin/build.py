"""Building a model with parameters on meta, and binding its parameters to the tensors of a manifest."""

from __future__ import annotations

import contextlib
import importlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin import manifest as fmt
from pylomin.errors import PylominError
from pylomin.hooks import Slot
from pylomin.store import Store

_META_LOCK = threading.Lock()


def resolve_model_cls(model_cls: str | Callable[..., nn.Module] | type) -> Callable[..., nn.Module] | type:
    """An import path (`"transformers.BertModel"` or `"pkg.mod:factory"`) -> the object; anything else as is."""
    if not isinstance(model_cls, str):
        return model_cls
    module, sep, attr = model_cls.partition(":") if ":" in model_cls else model_cls.rpartition(".")
    if not sep or not module or not attr:
        raise ValueError(f"cannot import {model_cls!r}: write it as 'package.module.Class' or 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import `{model_cls}` ({e}); give e.g. transformers.BertModel") from None
    return obj  # type: ignore[no-any-return]


def stored_dtype(manifest: fmt.Manifest) -> torch.dtype | None:
    # The floating dtype most bytes are stored in: what the model is built in when no dtype is given.
    sizes: dict[torch.dtype, int] = {}
    for unit in manifest.units:
        for info in unit.tensors.values():
            if info.torch_dtype.is_floating_point:
                sizes[info.torch_dtype] = sizes.get(info.torch_dtype, 0) + info.length
    return max(sizes, key=lambda d: sizes[d]) if sizes else None


def build_on_meta(model_cls: Callable[..., nn.Module] | type, folder: Path, dtype: torch.dtype | None) -> nn.Module:
    is_hf = isinstance(model_cls, type) and (hasattr(model_cls, "_from_config") or hasattr(model_cls, "_model_mapping"))
    with params_on_meta():
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
def params_on_meta() -> Iterator[None]:
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


def bind(
    model: nn.Module, manifest: fmt.Manifest, store: Store, dtype: torch.dtype | None, *, strict: bool = True
) -> dict[nn.Module, list[Slot]]:
    """Match the model to the manifest, put placeholders in, and return each hook target's slots.

    `strict=False` lets parameters and buffers the manifest does not hold stay as they are (in memory).
    """
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
            target = fmt.enclosing_module(owner, unit_modules) if n in index else owner
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
    if not strict:
        missing = []
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


def _patterns(model: nn.Module, attr: str) -> list[str]:
    return list(getattr(model, attr, None) or [])


def _matches(name: str, patterns: list[str]) -> bool:
    return any(re.search(p, name) for p in patterns)
