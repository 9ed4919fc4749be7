"""Memory that adapts: how much of a streamed model stays resident, from the memory this process may use.

`memory_budget="auto"` (the default) reads the memory this process may use (`pylomin.runtime.limits`):
a model that fits is kept whole and warm (in-memory speed); one that does not keeps resident what
fits, the most reused first, and streams the rest through a read-ahead window sized to fit too.
Between forwards, at most once a second, the figure is read again and the resident part follows it.
`decide` is a pure function of the figures; `Adaptive` re-reads them and says when to re-plan.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pylomin.runtime.limits import Memory, read_memory

logger = logging.getLogger(__name__)

MIB = 2**20
# Left to the process itself: activations, allocator slack, the hot part of its code pages (which
# the memory figure counts as reclaimable page cache). Measured under cgroup limits (1.4 GiB Llama at
# half the model, 1.6 GiB BERT at 384 / 512 MiB): 64 or 128 MiB ran alike; also subtracting all the
# code pages mapped at load (~90-300 MiB of RssFile) kept less resident and ran 15-20 % slower.
HEADROOM = 128 * MIB
RECHECK_S = 1.0  # at most this often, between forwards


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


class Adaptive:
    """Re-reads the memory figure between forwards (at most every `RECHECK_S`) and re-plans when it moved.

    `apply(decision)` carries a decision out (the hook manager's re-plan). Either way only a move
    worth it is applied (a shrink of a 32nd of the model, a growth of an eighth), so that the
    figure's noise does not move units back and forth.
    """

    def __init__(
        self,
        first: Decision,
        largest_streamed: Callable[[int], int],
        apply: Callable[[Decision], None],
        *,
        prefetch_units: int,
        prefetch_bytes: int,
        drop_page_cache: bool | None,
        headroom: int = HEADROOM,
        held: Callable[[], int] = lambda: 0,
        taken: Callable[[], int] = lambda: 0,
        read: Callable[[], Memory] = read_memory,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.current = first
        self.largest_streamed = largest_streamed
        self.headroom = headroom
        self.apply = apply
        self.held = held  # bytes the model holds as copies (anonymous memory): not taken from others
        self.taken = taken  # bytes other models of this process keep resident: counted as reclaimable, never given
        self.read = read
        self.clock = clock
        self.prefetch_units = prefetch_units
        self.prefetch_bytes = prefetch_bytes
        self.drop_page_cache = drop_page_cache
        self.checked_at = clock()  # when the figure was last read

    def maybe_recheck(self) -> Decision | None:
        """Between forwards: read the figure if a second has passed; re-plan and return the new decision if it moved."""
        now = self.clock()
        if now - self.checked_at < RECHECK_S:
            return None
        self.checked_at = now
        new = decide(
            with_available(self.read(), self.held() - self.taken()),
            self.current.model_bytes,
            self.largest_streamed,
            headroom=self.headroom,
            prefetch_units=self.prefetch_units,
            prefetch_bytes=self.prefetch_bytes,
            drop_page_cache=self.drop_page_cache,
        )
        old = self.current
        step = old.model_bytes // 8
        shrink = new.memory_budget < old.memory_budget - old.model_bytes // 32
        grow = new.memory_budget >= min(old.model_bytes, old.memory_budget + step) > old.memory_budget
        if not (shrink or grow or new.prefetch_units != old.prefetch_units):
            return None
        logger.info("%s (was %.2f GiB resident)", new.describe(), old.memory_budget / 2**30)
        self.apply(new)
        self.current = new
        return new
