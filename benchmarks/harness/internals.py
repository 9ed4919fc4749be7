"""Every pylomin internal the benchmarks read, each behind one function: the one file to re-point when pylomin moves.

Everything else goes through pylomin's public API (`load_streaming`, `convert`, `quantize_`,
`profile`, `unload_`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any


def manifest(folder: str | os.PathLike[str]) -> Any:
    """The converted folder's manifest (`pylomin.format.manifest.read`): its units, their files, tensors and bytes."""
    from pylomin.format.manifest import read

    return read(folder)


def peak_rss(interval: float = 0.001) -> Any:
    """A `PeakRss` window (`pylomin.tools.memory`): the peak resident set inside it, above its entry, anon and file."""
    from pylomin.tools.memory import PeakRss

    return PeakRss(interval=interval)


def rss() -> Any:
    """This process's resident set now, `.anon`, `.file`, `.total` (`pylomin.tools.memory.rss`)."""
    from pylomin.tools.memory import rss

    return rss()


def memory_policy(model: Any) -> dict[str, Any]:
    """A streamed model's memory policy now (`stream_of(model)`: `.policy.plan`, `.policy.note`, `.lifecycle`):
    bytes kept resident, what "auto" chose, root forwards running; {} for a model pylomin does not stream."""
    from pylomin.runtime.model import is_streamed, stream_of

    if not is_streamed(model):
        return {}
    stream = stream_of(model)
    return {
        "resident_bytes": stream.policy.plan.resident_bytes,
        "memory_note": stream.policy.note,
        "passes": stream.lifecycle.passes,
    }


def read_memory() -> tuple[int, int]:
    """(available, limit) in bytes, as pylomin's memory policy reads them (`pylomin._os.read_memory`)."""
    from pylomin._os import read_memory

    memory = read_memory()
    return memory.available, memory.limit


def recheck_s() -> float:
    """How often at most pylomin re-reads the memory figure between forwards (`pylomin.runtime.policy.RECHECK_S`)."""
    from pylomin.runtime.policy import RECHECK_S

    return float(RECHECK_S)


def load_experts_whole(path: str, cls: Any, **options: Any) -> Any:
    """`load_streaming(path, cls, **options)` with fused experts read whole with their layer, not per expert
    (`pylomin.runtime.streaming.load` with `Options.expert_paging=False`)."""
    from pylomin.runtime.options import Options
    from pylomin.runtime.streaming import load

    return load(path, cls, dataclasses.replace(Options.check(**options), expert_paging=False))


def staging() -> tuple[Any, Any, Any]:
    """(Store, Stager, PinnedCopy): a converted folder's mapped files, the unit stager, the pinned ring to a device
    (`pylomin.runtime.store`, `pylomin.runtime.stage`)."""
    from pylomin.runtime.stage import PinnedCopy, Stager
    from pylomin.runtime.store import Store

    return Store, Stager, PinnedCopy


def copied_bytes(model: Any) -> int:
    """Bytes a forward of a streamed model copies in: each tensor a hooked module needs and the plan does not keep
    resident, once per module (`stream_of(model).store`, `.policy.targets`, `.policy.plan`)."""
    from pylomin.runtime.model import stream_of

    stream = stream_of(model)
    resident = stream.policy.plan.resident
    return sum(stream.store.location(n).length for t in stream.policy.targets for n in t.tensors if n not in resident)
