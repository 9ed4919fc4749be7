"""The memory policy: what a streamed model keeps resident, reads ahead and hints to the kernel, as plain data.

`make_plan` turns one memory budget into a `Plan`: a pure function of the hooked modules and where their
tensors lie in the unit files (no threads, no files, no torch). `MemoryPolicy` chooses the budget: the
one given, or with `memory_budget="auto"` (the default) from the memory this process may use (`decide`):
a model that fits is kept whole and warm (in-memory speed); one that does not keeps resident what fits,
the most reused first, and streams the rest through a read-ahead window sized to fit too. Between
forwards, at most once a second, it reads the figure again and hands the runtime a new plan when it
moved. The pass lifecycle, the reader thread and the device stager only carry plans out.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from pylomin._os import Memory, read_memory
from pylomin.format.header import DATA_ALIGN
from pylomin.format.manifest import Range

logger = logging.getLogger(__name__)

MIB = 2**20
# Left to the process itself: activations, allocator slack, the hot part of its code pages (which
# the memory figure counts as reclaimable page cache). Measured under cgroup limits (1.4 GiB Llama at
# half the model, 1.6 GiB BERT at 384 / 512 MiB): 64 or 128 MiB ran alike; also subtracting all the
# code pages mapped at load (~90-300 MiB of RssFile) kept less resident and ran 15-20 % slower.
HEADROOM = 128 * MIB
RECHECK_S = 1.0  # at most this often, between forwards


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
        picked = [Range(self.file, self.offset + e * self.stride, self.stride) for e in chosen if 0 <= e < self.count]
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


def merge(ranges: list[Range]) -> list[Range]:
    """Sort byte ranges and merge those that touch or lie only padding apart, per file: fewer, larger
    reads, and a page two released tensors share is released with them. Tensor data starts at a
    multiple of `DATA_ALIGN` in a unit file: a shorter gap before such a start is padding, no tensor's."""
    out: list[Range] = []
    for file, offset, length in sorted(ranges):
        end = out[-1][1] + out[-1][2] if out else 0
        if out and out[-1][0] == file and (end >= offset or offset % DATA_ALIGN == 0 and offset - end < DATA_ALIGN):
            f, o, n = out[-1]
            out[-1] = Range(f, o, max(n, offset + length - o))
        else:
            out.append(Range(file, offset, length))
    return out


@dataclass(frozen=True)
class Decision:
    """What `memory_budget="auto"` chose for one memory figure."""

    memory: Memory
    model_bytes: int
    memory_budget: int  # bytes kept resident
    drop_page_cache: bool  # streamed pages leave the page cache after use
    prefetch_units: int  # read-ahead window
    prefetch_bytes: int

    @property
    def fits(self) -> bool:
        return self.memory_budget >= self.model_bytes

    def describe(self) -> str:
        """One line for logs and the profiler: the figure, where it came from, and the choice."""
        gib = 2**30
        where = f"{self.memory.available / gib:.2f} GiB available of {self.memory.limit / gib:.2f} GiB ({self.memory.source})"
        if self.fits:
            return f"memory: {where}; the model ({self.model_bytes / gib:.2f} GiB) is kept resident"
        streamed = self.model_bytes - self.memory_budget
        window = f"read-ahead {self.prefetch_units} units / {self.prefetch_bytes / MIB:.0f} MiB"
        return (
            f"memory: {where}; {self.memory_budget / gib:.2f} GiB resident, {streamed / gib:.2f} GiB streamed"
            f" (pages dropped after use), {window}"
        )


def decide(
    memory: Memory,
    model_bytes: int,
    largest_streamed: Callable[[int], int],
    *,
    headroom: int = HEADROOM,
    prefetch_units: int,
    prefetch_bytes: int,
    drop_page_cache: bool | None = None,
) -> Decision:
    """Choose the resident budget, page-cache policy and read-ahead window for `memory`.

    `largest_streamed(budget)`: the most bytes one unit reads when `budget` bytes stay resident
    (the plan's); it sizes the window. `headroom`: left to the process itself.
    - The model fits: everything resident, pages kept warm.
    - It does not: the read-ahead window is sized first (the running unit plus up to
      `prefetch_units` ahead, within `prefetch_bytes` and what is usable; a window that does not
      fit thrashes the whole process), the rest of what is usable is kept resident, and streamed
      pages are dropped after use so that they never push the resident part out. What stays
      resident sets the largest streamed unit (an LM head kept shrinks the window), so the window
      is sized for the most that could stay, then again for less until the two agree.
    `drop_page_cache` given by the user wins over the choice.
    """
    usable = max(0, memory.available - headroom)
    if model_bytes <= usable:
        keep_warm = True if drop_page_cache is None else not drop_page_cache
        return Decision(memory, model_bytes, model_bytes, not keep_warm, prefetch_units, prefetch_bytes)
    budget, units = usable, 0
    for _ in range(4):  # from the most that could stay resident down, until the window agrees
        largest = largest_streamed(budget)
        units = 0
        while units < prefetch_units and (units + 2) * largest <= usable and (units + 1) * largest <= prefetch_bytes:
            units += 1
        budget = max(0, usable - (units + 1) * largest)
        if largest_streamed(budget) <= largest:
            break
    drop = True if drop_page_cache is None else drop_page_cache
    return Decision(memory, model_bytes, budget, drop, units, prefetch_bytes)


def with_available(memory: Memory, delta: int) -> Memory:
    """`memory` with `delta` bytes more (or fewer) available, never below none."""
    return Memory(max(0, memory.available + delta), memory.limit, memory.source) if delta else memory


class MemoryPolicy:
    """Chooses a streamed model's plan, and with `memory_budget=None` ("auto") follows the memory this process may use.

    Pure but for `read` and `clock` (tests pass their own): it never touches the model or its files.
    A fixed budget gives one plan for the model's life. "auto" decides from `read()` less what the
    other streamed models of this process keep resident (their pages are page cache, which the figure
    counts as reclaimable, but those models will not give them up); on CUDA from the GPU's free memory
    (`gpu`), the host page cache keeping the model warm if it fits there. Between forwards `recheck`
    reads the figure again (CPU, at most every `RECHECK_S`) and returns the new plan when it moved by
    a move worth it (a shrink of a 32nd of the model, a growth of an eighth): the figure's noise does
    not move units back and forth.
    """

    # The policies of the streamed models alive in this process whose resident set is host memory.
    _host: ClassVar[weakref.WeakSet[MemoryPolicy]] = weakref.WeakSet()

    def __init__(
        self,
        targets: Sequence[Target],
        locations: Mapping[str, Range],
        *,
        memory_budget: int | None,
        prefetch_units: int,
        prefetch_bytes: int,
        drop_page_cache: bool | None,
        experts: Mapping[str, int] | None = None,
        copies: bool = False,
        gpu: Memory | None = None,
        headroom: int = HEADROOM,
        read: Callable[[], Memory] = read_memory,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.targets, self.locations, self.experts = targets, locations, experts or {}
        self.model_bytes = sum(locations[n].length for n in {n for t in targets for n in t.tensors})
        self.prefetch_units, self.prefetch_bytes = prefetch_units, prefetch_bytes
        self.asked_drop = drop_page_cache  # the user's choice, or None: chosen with the budget
        self.copies = copies  # resident tensors are copies (a dtype cast): anonymous memory, not page cache
        self.headroom, self.read, self.clock = headroom, read, clock
        self.adaptive = memory_budget is None and gpu is None
        self.reserved = 0  # the reserve of the last re-check (`recheck`)
        self.decision: Decision | None = None
        if memory_budget is not None:
            self.plan = self.plan_for(memory_budget, prefetch_units)
            self.drop_page_cache = drop_page_cache is not False
        else:
            host = with_available(read(), -self.resident_elsewhere())
            self.decision = self._decide(gpu or host)
            if gpu is not None:  # the page cache keeps the model warm for the GPU if it fits on the host
                warm = self.model_bytes <= host.available - headroom
                drop = not warm if drop_page_cache is None else drop_page_cache
                self.decision = dataclasses.replace(self.decision, drop_page_cache=drop)
            self._follow(self.decision)
        self.checked_at = clock()
        if gpu is None and not copies:
            MemoryPolicy._host.add(self)

    @property
    def note(self) -> str:
        """What "auto" chose, in words (logs, the profiler, `pylomin run`); empty for a fixed budget."""
        return self.decision.describe() if self.decision is not None else ""

    def plan_for(self, budget: int, units: int) -> Plan:
        """The plan for a resident budget and a read-ahead window of `units`."""
        return make_plan(
            self.targets,
            self.locations,
            memory_budget=budget,
            prefetch_units=units,
            prefetch_bytes=self.prefetch_bytes,
            experts=self.experts,
        )

    def largest_streamed(self, budget: int) -> int:
        """What the largest streamed unit reads with `budget` bytes resident (a lookup reads a few rows: none)."""
        plan = self.plan_for(budget, 0)
        return max(
            (
                sum(self.locations[n].length for n in set(t.tensors) - plan.resident - set(plan.experts))
                for t in self.targets
                if not t.lookup
            ),
            default=0,
        )

    def resident_elsewhere(self) -> int:
        """Bytes the other streamed models of this process keep resident in host memory."""
        return sum(p.plan.resident_bytes for p in list(MemoryPolicy._host) if p is not self)

    def close(self) -> None:
        """The model is unloaded: its resident set no longer counts against the others."""
        MemoryPolicy._host.discard(self)

    @contextlib.contextmanager
    def step_aside(self) -> Iterator[None]:
        """While the block runs, the other models loaded decide as if this one held nothing (a draft that runs
        every token comes first); afterwards this one re-reads the memory at its next forward and gives back
        what they took."""
        counted = self in MemoryPolicy._host
        MemoryPolicy._host.discard(self)
        try:
            yield
        finally:
            if counted:
                MemoryPolicy._host.add(self)
            self.checked_at = float("-inf")

    def recheck(self, reserve: int = 0) -> Plan | None:
        """Between forwards: read the figure if a second has passed; the new plan if it moved, else None.

        `reserve`: bytes the coming forward will allocate beyond what is allocated now (the KV cache it
        adds, its activations: `modeling.pass_bytes`). Beyond the headroom they count against the
        budget, and a reserve beyond it that grew by a 32nd of the model re-reads at once: resident units are
        given back before the forward allocates, not reclaimed by the kernel while it runs (where they
        would thrash) or pushed out of a container by anonymous memory (where the OOM killer ends it).
        """
        if not self.adaptive:
            return None
        urgent = reserve > max(self.headroom, self.reserved + self.model_bytes // 32)
        if not urgent and self.clock() - self.checked_at < RECHECK_S:
            return None
        self.checked_at, self.reserved = self.clock(), reserve
        held = self.plan.resident_bytes if self.copies else 0  # copies are not reclaimable pages
        memory = with_available(self.read(), held - self.resident_elsewhere())
        extra = max(0, reserve - self.headroom)
        if urgent and memory.available < reserve + self.headroom:  # once per growth, not every second
            logger.warning(
                "the next forward needs ~%.0f MiB for its KV cache and activations, and %.0f MiB are available"
                " (%s): it may be killed for memory; use a smaller batch or a shorter context",
                reserve / MIB,
                memory.available / MIB,
                memory.source,
            )
        new = self._decide(with_available(memory, -extra))
        old = self.decision
        assert old is not None
        shrink = new.memory_budget < old.memory_budget - (0 if urgent else old.model_bytes // 32)
        grow = new.memory_budget >= min(old.model_bytes, old.memory_budget + old.model_bytes // 8) > old.memory_budget
        if not (shrink or grow or new.prefetch_units != old.prefetch_units):
            return None
        logger.info("%s (was %.2f GiB resident)", new.describe(), old.memory_budget / 2**30)
        self._follow(new)
        return self.plan

    def _decide(self, memory: Memory, prefetch_units: int | None = None) -> Decision:
        return decide(
            memory,
            self.model_bytes,
            self.largest_streamed,
            headroom=self.headroom,
            prefetch_units=self.prefetch_units if prefetch_units is None else prefetch_units,
            prefetch_bytes=self.prefetch_bytes,
            drop_page_cache=self.asked_drop,
        )

    def _follow(self, decision: Decision) -> None:
        self.decision = decision
        self.plan = self.plan_for(decision.memory_budget, decision.prefetch_units)
        self.drop_page_cache = decision.drop_page_cache

    def plan_at(self, memory: Memory, *, prefetch_units: int | None = None) -> tuple[Decision, Plan]:
        """What "auto" would choose at `memory`, and its plan, without following it (a question asked before a run).

        `prefetch_units`: the most units read ahead (default: this policy's); a model loaded with
        `prefetch=0` only to ask can ask about the default's window.
        """
        decision = self._decide(memory, prefetch_units)
        return decision, self.plan_for(decision.memory_budget, decision.prefetch_units)
