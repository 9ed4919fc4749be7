"""Which experts stay resident between uses: a pure policy over the experts the routers choose."""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping

# Replayed on routing traces of a trained Qwen3-MoE (6 layers x 32 experts, top-4; 4096 decoded
# held-out tokens, `python -m benchmarks.routing`), a half-life of 32 passes kept 38.8 / 71.7 / 95.2 %
# of the chosen experts with room for 10 / 25 / 50 % of them, against 35.6 / 67.2 / 94.1 % for uses
# counted since loading (LFU), 0.0 / 64.4 / 94.1 % for LRU and 54.0 / 84.0 / 97.7 % for Belady's oracle.
HALF_LIFE = 32.0


class ExpertCache:
    """Which experts stay resident between uses: the most used ones lately, counted per expert across forwards.

    A pure policy (no files, no locks: its owner serializes calls). Experts are keyed by
    `(group, index)`, a group being one experts module, whose experts all take `sizes[group]` bytes
    (their slices of every fused tensor of the module). An expert the router chose is read anyway;
    keeping it costs nothing more, so it is kept while it fits, or in place of kept experts used
    less often than it (never on a tie: no churn between equals).

    A use counts for less as it ages: half after `half_life` passes (a pass: one `use` per group),
    so the cache follows traffic that drifts from prompt to prompt. With `half_life=None` every use
    since loading counts the same (LFU).
    """

    def __init__(self, capacity: int, sizes: Mapping[int, int], *, half_life: float | None = HALF_LIFE):
        if half_life is not None and not half_life > 0:
            raise ValueError(f"`half_life` must be a positive number of passes or None, got {half_life!r}")
        self.capacity = capacity
        self.sizes = dict(sizes)
        self.half_life = half_life
        # log2 of each expert's uses, each weighted by 2 ** (its pass / half_life): the order of the
        # weighted sums is the order of the decayed counts, and log2 keeps them finite however long it runs
        self.uses: dict[tuple[int, int], float] = {}
        self._passes = 0.0
        self.kept: set[tuple[int, int]] = set()
        self.kept_bytes = 0
        self.lookups = 0  # experts the router chose, all groups, since the model was loaded
        self.hits = 0  # ... of which were kept already
        # (uses, expert) of kept experts, least used first; stale entries are skipped when popped.
        self._heap: list[tuple[float, tuple[int, int]]] = []

    def _count(self, key: tuple[int, int]) -> None:
        """One more use of `key`, now: log2(2 ** old + 2 ** now)."""
        now = self._passes / self.half_life if self.half_life is not None else 0.0
        old = self.uses.get(key)
        self.uses[key] = now if old is None else max(old, now) + math.log2(1.0 + 2.0 ** -abs(old - now))

    def use(self, group: int, chosen: list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        """Count one use of each chosen expert; return (the chosen experts to read, the kept ones to drop)."""
        size = self.sizes[group]
        misses = [e for e in chosen if (group, e) not in self.kept]
        self.lookups += len(chosen)
        self.hits += len(chosen) - len(misses)
        self._passes += 1 / len(self.sizes)
        for e in chosen:
            key = (group, e)
            self._count(key)
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
            victims: list[tuple[float, tuple[int, int]]] = []
            skipped: list[tuple[float, tuple[int, int]]] = []
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
