"""The plan: what a streamed model keeps resident, reads ahead and hints to the kernel, decided as plain data.

A pure function of the hooked modules, where their tensors lie in the unit files and the options:
no threads, no files, no torch. The hooks, the reader thread and the device stager carry it out.
"""

from __future__ import annotations

import heapq
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
    expert_cache_bytes: int = 0  # the budget left for the most used experts (`ExpertCache`)

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
      weights are used by several targets), then the larger first (an LM head), lookup-only tables
      last (a forward reads a few of their rows), then in target order; a tensor that does not fit
      is passed over for smaller ones after it.
    - Embedding lookups read a few rows: never read ahead, and mapped random-access unless the same
      tensor is also read whole by another target (a tied LM head wants the kernel's read-ahead).
    - A target whose tensors are all resident is not read ahead either.
    - `experts` names fused experts tensors (stored name -> number of experts, the leading dim): a
      token uses a few of them, so they are left out of their target's read-ahead, mapped
      random-access, and read per expert once the router has chosen. The budget goes to the other
      tensors first (each is used by every token; an expert by a few); what is left keeps the most
      used experts (`expert_cache_bytes`), or all of them where they all fit (resident).
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
        dense = [n for n in uses if n not in fused]
        only_looked_up = looked_up - read_whole

        def value(n: str) -> tuple[int, bool, int]:
            # Each resident byte of a tensor read whole saves a byte read per use; a lookup table
            # reads a few rows. Larger first at equal use: an LM head kept resident shrinks the
            # read-ahead window that the largest streamed unit sets. Stable: target order after that.
            return (-uses[n], n in only_looked_up, -locations[n][2])

        for name in sorted(dense, key=value):
            nbytes = locations[name][2]
            if used + nbytes <= memory_budget:
                used += nbytes
                resident.add(name)
        experts_bytes = sum(locations[n][2] for n in fused)
        if fused and used + experts_bytes <= memory_budget:
            resident.update(fused)
            used += experts_bytes
    cache_bytes = max(0, memory_budget - used) if fused and not resident >= set(fused) else 0

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
        expert_cache_bytes=cache_bytes,
    )


class ExpertCache:
    """Which experts stay resident between uses: the most used ones, counted per expert across forwards.

    A pure policy (no files, no locks: its owner serializes calls). Experts are keyed by
    `(group, index)`, a group being one experts module, whose experts all take `sizes[group]` bytes
    (their slices of every fused tensor of the module). An expert the router chose is read anyway;
    keeping it costs nothing more, so it is kept while it fits, or in place of kept experts used
    less often than it (never on a tie: no churn between equals).
    """

    def __init__(self, capacity: int, sizes: Mapping[int, int]):
        self.capacity = capacity
        self.sizes = dict(sizes)
        self.uses: dict[tuple[int, int], int] = {}
        self.kept: set[tuple[int, int]] = set()
        self.kept_bytes = 0
        self.lookups = 0  # experts the router chose, all groups, since the model was loaded
        self.hits = 0  # ... of which were kept already
        # (uses, expert) of kept experts, least used first; stale entries are skipped when popped.
        self._heap: list[tuple[int, tuple[int, int]]] = []

    def use(self, group: int, chosen: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Count one use of each chosen expert; return (the chosen experts to read, the kept ones to drop)."""
        size = self.sizes[group]
        misses = [e for e in chosen if (group, e) not in self.kept]
        self.lookups += len(chosen)
        self.hits += len(chosen) - len(misses)
        for e in chosen:
            key = (group, e)
            self.uses[key] = self.uses.get(key, 0) + 1
            if key in self.kept:
                heapq.heappush(self._heap, (self.uses[key], key))
        if len(self._heap) > 2 * len(self.kept) + 64:
            self._heap = [(self.uses[k], k) for k in self.kept]
            heapq.heapify(self._heap)
        dropped: list[tuple[int, int]] = []
        if size > self.capacity:
            return misses, dropped
        busy = {(group, e) for e in chosen}
        for e in sorted(misses, key=lambda e: -self.uses[(group, e)]):
            key, count = (group, e), self.uses[(group, e)]
            free = self.capacity - self.kept_bytes
            victims: list[tuple[int, tuple[int, int]]] = []
            skipped: list[tuple[int, tuple[int, int]]] = []
            while free < size and self._heap:
                uses, victim = self._heap[0]
                if victim not in self.kept or self.uses[victim] != uses:
                    heapq.heappop(self._heap)  # stale: dropped already, or used since
                    continue
                if uses >= count:
                    break  # never drop an expert used as often as this one
                heapq.heappop(self._heap)
                if victim in busy:
                    skipped.append((uses, victim))  # in use by this very call
                    continue
                victims.append((uses, victim))
                free += self.sizes[victim[0]]
            for entry in skipped + (victims if free < size else []):
                heapq.heappush(self._heap, entry)
            if free < size:
                continue
            for _, victim in victims:
                self.kept.discard(victim)
                self.kept_bytes -= self.sizes[victim[0]]
                dropped.append(victim)
            self.kept.add(key)
            self.kept_bytes += size
            heapq.heappush(self._heap, (count, key))
        return misses, dropped

    def resize(self, capacity: int) -> list[tuple[int, int]]:
        """A new capacity; returns the kept experts that no longer fit (the least used go first)."""
        self.capacity = capacity
        dropped: list[tuple[int, int]] = []
        for key in sorted(self.kept, key=lambda k: self.uses[k]):
            if self.kept_bytes <= capacity:
                break
            self.kept.discard(key)
            self.kept_bytes -= self.sizes[key[0]]
            dropped.append(key)
        return dropped

    def kept_in(self, group: int) -> set[int]:
        """The experts of `group` kept now."""
        return {e for g, e in self.kept if g == group}

    @property
    def hit_rate(self) -> float:
        """Share of the chosen experts that were kept already (0 before any use)."""
        return self.hits / self.lookups if self.lookups else 0.0


# Tensor data starts at a multiple of this in a unit file (`manifest.DATA_ALIGN`): a shorter gap
# before such a start is padding, which no tensor shares.
_ALIGN = 64


def merge(ranges: list[Range]) -> list[Range]:
    """Sort byte ranges and merge those that touch or lie only padding apart, per file: fewer, larger
    reads, and a page two released tensors share is released with them."""
    out: list[Range] = []
    for file, offset, length in sorted(ranges):
        end = out[-1][1] + out[-1][2] if out else 0
        if out and out[-1][0] == file and (end >= offset or offset % _ALIGN == 0 and offset - end < _ALIGN):
            f, o, n = out[-1]
            out[-1] = (f, o, max(n, offset + length - o))
        else:
            out.append((file, offset, length))
    return out
