"""Every pylomin internal the benchmarks read, each behind one function: the one file to re-point when pylomin moves.

Everything else goes through pylomin's public API (`load_streaming`, `convert`, `quantize_`,
`profile`, `unload_`). pylomin is moving its modules into subpackages (`pylomin.format`,
`pylomin.runtime`, `pylomin.tools`): each accessor imports the first of its paths that exists.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Any


def _module(*names: str) -> ModuleType:
    for name in names:
        try:
            return importlib.import_module(f"pylomin.{name}")
        except ModuleNotFoundError as e:
            if e.name is None or not f"pylomin.{name}".startswith(e.name):
                raise  # the module is there, something it imports is not
    raise ModuleNotFoundError(f"none of {', '.join('pylomin.' + n for n in names)} can be imported")


def manifest(folder: str | os.PathLike[str]) -> Any:
    """The converted folder's manifest (`pylomin.format.manifest.read`): its units, their files, tensors and bytes."""
    return _module("format.manifest", "manifest").read(folder)


def peak_rss(interval: float = 0.001) -> Any:
    """A `PeakRss` window (`pylomin.tools.memory`): the peak resident set inside it, above its entry, anon and file."""
    return _module("tools.memory", "memory").PeakRss(interval=interval)


def rss() -> Any:
    """This process's resident set now, `.anon`, `.file`, `.total` (`pylomin.tools.memory.rss`)."""
    return _module("tools.memory", "memory").rss()


def memory_policy(model: Any) -> dict[str, Any]:
    """A streamed model's memory policy now (`stream_of(model).manager`): bytes kept resident, its line, passes
    running; {} for a model pylomin does not stream."""
    streaming = _module("runtime.streaming", "streaming")
    if not streaming.is_streamed(model):
        return {}
    manager = streaming.stream_of(model).manager
    return {"resident_bytes": manager.plan.resident_bytes, "memory_note": manager.memory_note, "passes": manager.passes}


def read_memory() -> tuple[int, int]:
    """(available, limit) in bytes, as pylomin's memory policy reads them (`pylomin.runtime.limits.read_memory`)."""
    memory = _module("runtime.limits", "limits").read_memory()
    return memory.available, memory.limit


def recheck_s() -> float:
    """How often at most pylomin re-reads the memory figure between forwards (`pylomin.runtime.adapt.RECHECK_S`)."""
    return float(_module("runtime.adapt", "adapt").RECHECK_S)


def per_expert_paging(enabled: bool) -> str | None:
    """Switch per-expert paging of fused experts (`pylomin.runtime.streaming.PER_EXPERT`); why not, where it is gone."""
    streaming = _module("runtime.streaming", "streaming")
    if not hasattr(streaming, "PER_EXPERT"):
        return f"{streaming.__name__}.PER_EXPERT does not exist: experts paged as pylomin does by default"
    streaming.PER_EXPERT = enabled
    return None


def staging() -> tuple[Any, Any, Any]:
    """(Store, Stager, PinnedCopy): a converted folder's mapped files, the unit stager, the pinned ring to a device
    (`pylomin.runtime.store`, `pylomin.runtime.stage`)."""
    stage = _module("runtime.stage", "stage")
    return _module("runtime.store", "store").Store, stage.Stager, stage.PinnedCopy


def copied_bytes(model: Any) -> int:
    """Bytes a forward of a streamed model copies in: every hooked tensor not kept resident, once per module
    using it (`stream_of(model).manager`: its store, targets and plan)."""
    manager = _module("runtime.streaming", "streaming").stream_of(model).manager
    return sum(
        manager.store.location(s.stored_name)[2]
        for slots in manager.targets.values()
        for s in slots
        if s.stored_name not in manager.plan.resident
    )
