"""Expert paging: a mixture-of-experts layer reads only the experts its router chose, and keeps the most used.

Fused experts tensors (`[E, ...]`, transformers' experts modules: `forward(hidden_states, top_k_index,
top_k_weights)`) are never read ahead whole nor read around on a fault (`Plan.experts`). When an experts
module starts, the experts the router chose that are not kept are read, exactly their bytes; the
`ExpertCache` (a pure policy) decides which stay resident between uses within the budget the plan
leaves them. A prompt pass, whose tokens choose most experts of every layer, reads whole layers ahead
with the reader instead (`reads_all_experts`).

Experts read before the router asks: when the router of layer L runs, its input (the hidden state,
normed for routing) goes through the next layer's router weights too (a copy kept in memory), and the
experts that guess picks are queued for reading once layer L's own chosen experts are read, so they
never compete with them for the disk, and come in while layer L computes (`predict`). When layer L+1's
router has chosen, what it chose and was not guessed is read at once; what was guessed and not chosen
is dropped. A wrong guess costs bytes, never correctness: the forward only ever uses what its router chose.
Guesses are scored against the choice every time, and read only while the share of them chosen lately
pays for the bytes read in vain (`GUESS_TRUST`); the guesses go on being scored, so reading resumes
when they improve.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, NamedTuple

import torch
from torch import nn

from pylomin.format.manifest import Range
from pylomin.modeling import token_inputs
from pylomin.runtime.expert_cache import ExpertCache
from pylomin.runtime.policy import Plan, merge
from pylomin.runtime.store import Store

logger = logging.getLogger(__name__)

# The moving average of guesses chosen: each experts-module call weighs 0.1 (about the last 10 calls).
_SMOOTH = 0.1
# Guesses are read ahead while at least this share of them is lately chosen. A right guess saves at
# most the compute it overlaps, a wrong one costs a read: with c = compute / reads per layer, guesses
# right a share a of the time pay from a = 1 / (1 + c). A CPU decoding fp32 experts from disk has
# c ~ 0.25-0.33 (Mixtral-shaped, benchmarks/moe.py): 0.75-0.8. Measured there: random weights' guesses,
# 72 % right, ran 0.91x the speed of waiting for each router; a model trained here, 81 % right, 1.05x.
GUESS_TRUST = 0.75


class Chosen(NamedTuple):
    """What one call of an experts module read: the experts its router chose, how many were kept already,
    the bytes of the others (`read`: read ahead on a guess or now), the bytes read ahead on a guess
    (`guessed`), and of those not chosen (`wasted`)."""

    experts: list[int]
    hits: int
    read: int
    guessed: int = 0
    wasted: int = 0


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
        # Router module of layer L -> (group of layer L+1, its router's weight [E, hidden]); see `predict`.
        self.next: dict[nn.Module, tuple[int, torch.Tensor]] = {}
        # Per group: the experts guessed for its next call (not kept), and whether they were read ahead.
        self.guessed: dict[int, tuple[set[int], bool]] = {}
        self.after: dict[int, int] = {}  # group of layer L -> group of layer L+1, guessed from L's router
        self.queued: dict[int, list[Range]] = {}  # per group: the guessed ranges to read once layer L has read
        self.trust = 1.0  # the moving share of guessed experts the router chose (`GUESS_TRUST`)

    def predict_with(self, routers: list[tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]]) -> None:
        """Guess each experts module's choice from the router before it: (router of layer L, experts module of
        layer L, experts module of layer L+1, the weight of layer L+1's router, in memory)."""
        self.next = {router: (self.group[after], weight) for router, _, after, weight in routers}
        self.after = {self.group[before]: self.group[after] for _, before, after, _ in routers}

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

    def predict(self, router: nn.Module, hidden: torch.Tensor) -> None:
        """Layer L's `router` is about to run on `hidden` ([..., hidden]): guess the experts the next layer's
        router would choose from it (not kept ones); their reads are queued once layer L's own chosen
        experts are read (`read_chosen`), unless the guesses have lately been poor (`GUESS_TRUST`)."""
        following = self.next.get(router)
        if following is None:
            return
        group, weight = following
        if all(name in self.plan.resident for name in self.names[group]):
            return
        if hidden.shape[-1] != weight.shape[-1]:  # the next router reads another width: no guess from here
            self.next.pop(router, None)
            return
        try:
            with torch.no_grad():
                scores = torch.nn.functional.linear(hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype), weight)
                top = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).indices
                guess = {int(e) for e in top.unique().tolist()}
        except Exception as e:  # a guess costs bytes, never the forward: this router guesses no more
            logger.warning("not guessing the experts after %s: %s", type(router).__name__, e)
            self.next.pop(router, None)
            return
        with self.lock:
            guess -= self.cache.kept_in(group)
            read = self.trust >= GUESS_TRUST
            before, was_read = self.guessed.get(group, (set(), False))
            self.guessed[group] = (before | guess, read or was_read)
            if read:  # read once layer L's own chosen experts are: never in their way on the disk
                ranges = [r for n in self.names[group] for r in self.plan.experts[n].ranges(sorted(guess))]
                self.queued[group] = self.queued.get(group, []) + ranges

    def read_chosen(self, module: nn.Module, index: torch.Tensor, *, read_ahead: bool) -> Chosen:
        """The router chose `index` ([tokens, k]): read the chosen experts the cache does not keep (none
        when the reader read the whole layer ahead), and drop those guessed and not chosen."""
        self.top_k = index.shape[-1] if index.dim() else 1
        group = self.group[module]
        with self.lock:
            guessed, was_read = self.guessed.pop(group, (set(), False))
            self.queued.pop(group, None)  # not issued (the layer before never read): too late now
        chosen = [int(e) for e in torch.unique(index).tolist()]
        if all(name in self.plan.resident for name in self.names[group]):  # every expert resident
            again = self._reclaimed(group, chosen)
            self._read_guesses_after(group)
            return Chosen(chosen, len(chosen), again) if again else Chosen([], 0, 0)
        with self.lock:
            if guessed:
                self.trust += _SMOOTH * (len(guessed.intersection(chosen)) / len(guessed) - self.trust)
            misses, dropped = self.cache.use(group, chosen)
            kept = self.cache.kept_in(group)
        if not was_read:
            guessed = set()  # scored only
        for g, e in dropped:  # no longer among the most used: its pages go like a streamed unit's
            self._drop(g, e)
        wasted = sorted(guessed - set(chosen) - kept)
        for e in wasted:
            self._drop(group, e)
        size = self.cache.sizes[group]
        if read_ahead:
            return Chosen(chosen, len(chosen) - len(misses), 0)
        again = self._reclaimed(group, [e for e in chosen if e not in misses])
        ranges = [r for n in self.names[group] for r in self.plan.experts[n].ranges(misses)]
        self.store.read_exactly(ranges)
        self._read_guesses_after(group)
        read = sum(r.length for r in ranges) + again
        return Chosen(chosen, len(chosen) - len(misses), read, len(guessed) * size, len(wasted) * size)

    def _read_guesses_after(self, group: int) -> None:
        """Queue the reads guessed for the layer after `group` (their pages are then read while this layer's
        experts compute and the next layer's attention runs)."""
        following = self.after.get(group)
        if following is None:
            return
        with self.lock:
            ranges = self.queued.pop(following, [])
        self.store.will_need(ranges)

    def _reclaimed(self, group: int, kept: list[int]) -> int:
        """Read again, at the disk's speed, what the kernel reclaimed of these kept experts' pages (they would
        fault in 4 KiB at a time, being random-access); returns the bytes. A mincore check: ~10 us for 21 MiB."""
        stale = self.store.uncached([r for n in self.names[group] for r in self.plan.experts[n].ranges(kept)])
        self.store.read_exactly(stale)
        return sum(r.length for r in stale)

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
