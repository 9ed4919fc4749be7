"""Which experts stay resident between uses: a pure policy over the experts the routers choose."""

from __future__ import annotations

import heapq
from collections.abc import Mapping


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
