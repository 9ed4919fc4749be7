"""Every pylomin internal the benchmarks read, each behind one function: the one file to re-point when pylomin moves.

Everything else goes through pylomin's public API (`load_streaming`, `convert`, `quantize_`, `profile`, `unload_`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pylomin import _os
from pylomin.format import manifest as fmt
from pylomin.runtime import model as streamed
from pylomin.runtime import options, policy, stage, store, streaming
from pylomin.tools import memory


def manifest(folder: str | os.PathLike[str]) -> Any:
    """The converted folder's manifest (`pylomin.format.manifest.read`): its units, their files, tensors and bytes."""
    return fmt.read(folder)


def peak_rss(interval: float = 0.001) -> Any:
    """A `PeakRss` window (`pylomin.tools.memory`): the peak resident set inside it, above its entry, anon and file."""
    return memory.PeakRss(interval=interval)


def rss() -> Any:
    """This process's resident set now, `.anon`, `.file`, `.total` (`pylomin.tools.memory.rss`)."""
    return memory.rss()


def memory_policy(model: Any) -> dict[str, Any]:
    """A streamed model's memory policy now (`stream_of(model)`: `.policy.plan`, `.policy.note`, `.lifecycle`):
    bytes kept resident, what "auto" chose, root forwards running; {} for a model pylomin does not stream."""
    if not streamed.is_streamed(model):
        return {}
    s = streamed.stream_of(model)
    return {"resident_bytes": s.policy.plan.resident_bytes, "memory_note": s.policy.note, "passes": s.lifecycle.passes}


def read_memory() -> tuple[int, int]:
    """(available, limit) in bytes, as pylomin's memory policy reads them (`pylomin._os.read_memory`)."""
    m = _os.read_memory()
    return m.available, m.limit


def recheck_s() -> float:
    """How often at most pylomin re-reads the memory figure between forwards (`pylomin.runtime.policy.RECHECK_S`)."""
    return float(policy.RECHECK_S)


def load_experts_whole(path: str, cls: Any, **kwargs: Any) -> Any:
    """`load_streaming(path, cls, **kwargs)` with fused experts read whole with their layer, not per expert
    (`pylomin.runtime.streaming.load` with `Options.expert_paging=False`)."""
    return streaming.load(path, cls, dataclasses.replace(options.Options.check(**kwargs), expert_paging=False))


def load_experts_unguessed(path: str, cls: Any, **kwargs: Any) -> Any:
    """`load_streaming(path, cls, **kwargs)` with each layer's experts read only once its router has chosen, never
    guessed ahead from the layer before (`pylomin.runtime.streaming.load` with `Options.expert_guessing=False`)."""
    return streaming.load(path, cls, dataclasses.replace(options.Options.check(**kwargs), expert_guessing=False))


def expert_ranges(file: str, offset: int, stride: int, count: int, chosen: list[int]) -> list[Any]:
    """The byte ranges of the `chosen` experts of a fused tensor, merged where they touch, as expert paging reads
    them (`pylomin.runtime.policy.Experts.ranges`)."""
    return list(policy.Experts(file, offset, stride, count).ranges(chosen))


def staging() -> tuple[Any, Any, Any]:
    """(Store, Stager, PinnedCopy): a converted folder's mapped files, the unit stager, the pinned ring to a device
    (`pylomin.runtime.store`, `pylomin.runtime.stage`)."""
    return store.Store, stage.Stager, stage.PinnedCopy


def copied_bytes(model: Any) -> int:
    """Bytes a forward of a streamed model copies in: each tensor a hooked module needs and the plan does not keep
    resident, once per module (`stream_of(model).store`, `.policy.targets`, `.policy.plan`)."""
    s = streamed.stream_of(model)
    resident = s.policy.plan.resident
    return sum(s.store.location(n).length for t in s.policy.targets for n in t.tensors if n not in resident)
