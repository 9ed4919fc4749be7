"""Expert paging: a mixture-of-experts layer reads only the experts its router chose, and keeps the most used.

Fused experts tensors (`[E, ...]`, transformers' experts modules: `forward(hidden_states, top_k_index,
top_k_weights)`) are never read ahead whole nor read around on a fault (`Plan.experts`). When an experts
module starts, the experts the router chose that are not kept are read, exactly their bytes; the
`ExpertCache` (a pure policy) decides which stay resident between uses within the budget the plan
leaves them. A prompt pass, whose tokens choose most experts of every layer, reads whole layers ahead
with the reader instead (`reads_all_experts`).
"""

from __future__ import annotations

import threading
from typing import Any

import torch
from torch import nn

from pylomin.format.manifest import Range
from pylomin.modeling import token_inputs
from pylomin.runtime.expert_cache import ExpertCache
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
