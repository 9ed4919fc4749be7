"""The plan: what a streamed model keeps resident, reads ahead and hints to the kernel, decided as plain data.

A pure function of the hooked modules, where their tensors lie in the unit files and the options:
no threads, no files, no torch. The hooks, the reader thread and the device stager carry it out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

Range = tuple[str, int, int]  # (unit file, byte offset, byte length)


@dataclass(frozen=True)
class Target:
    """One hooked module as the plan sees it: the stored tensors it needs while it runs."""

    name: str
    tensors: tuple[str, ...]
    lookup: bool = False  # reads a few rows of its tensors (an embedding table), not all of them


@dataclass(frozen=True)
class Experts:
    """A fused experts tensor (`[E, ...]`): expert `e` is bytes `[offset + e * stride, + stride)` of `file`."""

    file: str
    offset: int
    stride: int
    count: int

    def ranges(self, chosen: list[int]) -> list[Range]:
        """The byte ranges of the `chosen` experts, merged where they touch."""
        picked = [(self.file, self.offset + e * self.stride, self.stride) for e in chosen if 0 <= e < self.count]
        return merge(picked)


@dataclass(frozen=True)
class Plan:
    """What to do with each target (by index into the targets, in module definition order)."""

    names: tuple[str, ...]  # per target: the module's name
    ranges: tuple[tuple[Range, ...], ...]  # per target: the byte ranges it reads, merged
    resident: frozenset[str]  # stored tensors kept materialized for the model's lifetime
    resident_bytes: int
    random_access: tuple[Range, ...]  # read a few rows at a time: no kernel read-around on their faults
    read_ahead: tuple[bool, ...]  # per target: the reader makes it resident before it runs
    prefetch_units: int  # read-ahead window: at most this many targets ...
    prefetch_bytes: int  # ... and this many bytes ahead
    largest_streamed: int  # bytes of the largest tensor that is read ahead (sizes a staging buffer)
    # Fused experts tensors by stored name: never read ahead whole nor read around on a fault; the
    # experts the router chose are read when the experts module starts.
    experts: Mapping[str, Experts] = field(default_factory=dict)

    @property
    def streamed(self) -> list[int]:
        """Targets the reader reads ahead."""
        return [i for i, r in enumerate(self.read_ahead) if r]


def make_plan(
    targets: Sequence[Target],
    locations: Mapping[str, Range],
    *,
    memory_budget: int = 0,
    prefetch_units: int = 2,
    prefetch_bytes: int = 256 * 2**20,
    experts: Mapping[str, int] | None = None,
) -> Plan:
    """Decide the plan for `targets` (module definition order) whose tensors lie at `locations`.

    - Resident set: the tensors that fit in `memory_budget` bytes, the most reused first (tied
      weights are used by several targets), lookup tables before other tensors at equal use, then
      in target order; a tensor that does not fit is passed over for smaller ones after it.
    - Embedding lookups read a few rows: never read ahead, and mapped random-access unless the same
      tensor is also read whole by another target (a tied LM head wants the kernel's read-ahead).
    - A target whose tensors are all resident is not read ahead either.
    - `experts` names fused experts tensors (stored name -> number of experts, the leading dim): a
      token uses a few of them, so they are left out of their target's read-ahead, mapped
      random-access, and read per expert once the router has chosen.
    """
    experts = experts or {}
    fused = {
        name: Experts(locations[name][0], locations[name][1], locations[name][2] // count, count)
        for name, count in experts.items()
        if count > 0 and locations[name][2] % count == 0
    }
    uses: dict[str, int] = {}
    for t in targets:
        for name in t.tensors:
            uses[name] = uses.get(name, 0) + 1
    looked_up = {name for t in targets if t.lookup for name in t.tensors}
    read_whole = {name for t in targets if not t.lookup for name in t.tensors}

    resident: set[str] = set()
    used = 0
    if memory_budget > 0:
        for name in sorted(uses, key=lambda n: (-uses[n], n not in looked_up)):  # stable: target order after that
            nbytes = locations[name][2]
            if used + nbytes <= memory_budget:
                used += nbytes
                resident.add(name)

    def read_whole_of(t: Target) -> list[str]:
        return [n for n in t.tensors if n not in fused]

    read_ahead = tuple(
        not t.lookup and not all(n in resident for n in read_whole_of(t)) and bool(read_whole_of(t)) for t in targets
    )
    streamed = [n for t, r in zip(targets, read_ahead, strict=True) if r for n in read_whole_of(t) if n not in resident]
    return Plan(
        names=tuple(t.name for t in targets),
        ranges=tuple(tuple(merge([locations[n] for n in read_whole_of(t)])) for t in targets),
        resident=frozenset(resident),
        resident_bytes=used,
        random_access=tuple(locations[n] for n in sorted((looked_up - read_whole) | set(fused))),
        read_ahead=read_ahead,
        prefetch_units=prefetch_units,
        prefetch_bytes=prefetch_bytes,
        largest_streamed=max((locations[n][2] for n in streamed), default=0),
        experts=fused,
    )


def merge(ranges: list[Range]) -> list[Range]:
    """Sort byte ranges and merge those that touch, per file: fewer, larger reads."""
    out: list[Range] = []
    for file, offset, length in sorted(ranges):
        if out and out[-1][0] == file and out[-1][1] + out[-1][2] >= offset:
            f, o, n = out[-1]
            out[-1] = (f, o, max(n, offset + length - o))
        else:
            out.append((file, offset, length))
    return out
