"""Expert paging: a mixture-of-experts layer reads only the experts its router chose, and keeps the most used.

Fused experts tensors (`[E, ...]`, transformers' experts modules: `forward(hidden_states, top_k_index,
top_k_weights)`) are never read ahead whole nor read around on a fault (`Plan.experts`). When an experts
module starts, the experts the router chose that are not kept are read, exactly their bytes; the
`ExpertCache` (a pure policy) decides which stay resident between uses within the budget the plan
leaves them. A prompt pass, whose tokens choose most experts of every layer, reads whole layers ahead
with the reader instead (`reads_all_experts`).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from pylomin.format.manifest import Range
from pylomin.modeling import token_inputs
from pylomin.runtime.policy import Plan, merge
from pylomin.runtime.store import Store


class ExpertPaging:
    """Reads the chosen experts of each experts module and drops those the cache lets go.

    `experts`: experts module -> its fused tensors' stored names (all in `plan.experts`). Calls that
    change the cache hold `lock` (the pager's), since several threads may run the model.
    """

    def __init__(
        self, store: Store, experts: dict[nn.Module, list[str]], plan: Plan, top_k: int, lock: threading.RLock
    ):
        self.store = store
        self.lock = lock
        self.plan = plan
        # One group per experts module; an expert's size is its slice of each of the module's tensors.
        self.group = {m: g for g, m in enumerate(experts)}
        self.names = list(experts.values())
        self.group_of = {name: g for g, names in enumerate(self.names) for name in names}
        self.per_layer = max((plan.experts[ns[0]].count for ns in self.names), default=0)
        self.top_k = top_k  # from the config until a router has chosen
        self.cache = ExpertCache(
            plan.expert_cache_bytes,
            {g: sum(plan.experts[n].stride for n in names) for g, names in enumerate(self.names)},
        )

    def replan(self, plan: Plan) -> None:
        """Follow a new plan (under the lock): the cache shrinks or grows to what it leaves the experts."""
        self.plan = plan
        for g, e in self.cache.resize(plan.expert_cache_bytes):
            self._drop(g, e)

    def reads_all_experts(self, args: Any, kwargs: Any) -> bool:
        """Whether a pass of these inputs chooses most experts in every layer: T tokens routed to k
        of E experts each choose on average 1 - e^-2 = 86 % of them once T * k >= 2E; reading them
        ahead whole, overlapped with compute, then beats reading them once the router has chosen."""
        ids = token_inputs(args, kwargs)
        if ids is None:
            return False
        tokens = ids.shape[:-1].numel() if ids.is_floating_point() else ids.numel()
        return tokens * self.top_k >= 2 * self.per_layer

    def whole_layers(self, targets: list[list[str]]) -> dict[int, list[Range]]:
        """Per target (its stored tensors) holding fused experts not all resident: its ranges with every
        expert, which the reader reads ahead in a pass that reads all experts."""
        out = {}
        for i, names in enumerate(targets):
            fused = [n for n in names if n in self.group_of]
            if fused and not all(n in self.plan.resident for n in fused):
                out[i] = merge([*self.plan.ranges[i], *(self.store.location(n) for n in fused)])
        return out

    def read_chosen(self, module: nn.Module, index: torch.Tensor, *, read_ahead: bool) -> tuple[list[int], int, int]:
        """The router chose `index` ([tokens, k]): read the chosen experts the cache does not keep (none
        when the reader read the whole layer ahead); returns (chosen, hits, bytes read)."""
        self.top_k = index.shape[-1] if index.dim() else 1
        group = self.group[module]
        if all(name in self.plan.resident for name in self.names[group]):
            return [], 0, 0  # every expert resident
        chosen = [int(e) for e in torch.unique(index).tolist()]
        with self.lock:
            misses, dropped = self.cache.use(group, chosen)
        for g, e in dropped:  # no longer among the most used: its pages go like a streamed unit's
            self._drop(g, e)
        ranges = [] if read_ahead else [r for n in self.names[group] for r in self.plan.experts[n].ranges(misses)]
        self.store.read_exactly(ranges)
        return chosen, len(chosen) - len(misses), sum(r.length for r in ranges)

    def ranges_to_drop(self, stored_name: str) -> list[Range] | None:
        """The byte ranges of a released fused tensor to drop: all but the kept experts (None: not fused)."""
        group = self.group_of.get(stored_name)
        if group is None:
            return None
        kept = self.cache.kept_in(group)
        fused = self.plan.experts[stored_name]
        return fused.ranges([e for e in range(fused.count) if e not in kept])

    def _drop(self, group: int, e: int) -> None:
        for where in merge([r for name in self.names[group] for r in self.plan.experts[name].ranges([e])]):
            self.store.release(where)


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
