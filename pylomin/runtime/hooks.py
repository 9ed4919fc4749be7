"""Per-unit forward hooks: materialize a unit's parameters right before it runs, release them right after."""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pylomin.errors import PylominError
from pylomin.runtime.adapt import Adaptive
from pylomin.runtime.plan import ExpertCache, Plan, merge
from pylomin.runtime.prefetch import Prefetcher, Recorder
from pylomin.runtime.stage import Copy, Stager
from pylomin.runtime.store import Store

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    """One parameter, shared by all its tied names: where it is stored and who holds it now."""

    stored_name: str
    placeholder: nn.Parameter  # on meta: what the owners hold while the parameter is released
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    # The calls holding it now, by token: adding or removing a token twice changes nothing, so a
    # call interrupted anywhere in its hooks is given back exactly, by whoever finishes its work.
    holders: set[int] = field(default_factory=set)
    pinned: bool = False  # kept materialized for the model's lifetime (memory budget)

    @property
    def released(self) -> bool:
        """Whether an owner holds the meta placeholder (all of them, unless a release was interrupted)."""
        return any(module._parameters.get(attr) is self.placeholder for module, attr in self.owners)


def _refuse_training(grad: torch.Tensor) -> torch.Tensor:
    raise PylominError(
        "a streamed model is for inference: its parameters are paged in for one forward and released, so "
        "gradients have nowhere to go; train the model in memory (e.g. `from_pretrained`), or run this under "
        "`torch.no_grad()`"
    )


@dataclass(eq=False)
class _Calls:
    """One thread's hooked calls: the units it runs now (outermost first), each with its holder token.

    A frame leaves the stack only after what it holds is given back, so a frame still there after
    an interrupt says exactly what is left to give back. Its pass is open while it is in `_open`.
    """

    frames: list[tuple[nn.Module, int]] = field(default_factory=list)


class HookManager:
    """Registers the hooks of a streamed model and pages parameters in and out, thread-safely.

    It carries out a `Plan`; it decides nothing. `order` lists the hooked modules in the plan's
    target order and `slots` gives each the slots it needs while it runs. Slots record the calls
    holding them, so nested units, modules called twice (a tied LM head), several threads running
    the same model and calls cut short by Ctrl-C all see parameters that stay put until the last
    holder is done.
    """

    def __init__(
        self,
        store: Store,
        root: nn.Module,
        order: list[nn.Module],
        slots: dict[nn.Module, list[Slot]],
        plan: Plan,
        *,
        device: torch.device,
        copy: Copy | None = None,
        experts: dict[nn.Module, list[str]] | None = None,
    ):
        self.store = store
        self.root = root
        self.order = order
        self.targets = slots
        self.plan = plan
        self.device = device
        self.copy = copy  # copies streamed units to the device on the reader thread (CUDA); None: on demand
        self.experts = experts or {}  # experts module -> its fused tensors (stored names in plan.experts)
        # One group per experts module for the expert cache; an expert's size is its slice of each tensor.
        self._group = {m: g for g, m in enumerate(self.experts)}
        self._group_of = {name: g for m, g in self._group.items() for name in self.experts[m]}
        self._names_of = [self.experts[m] for m in self._group]
        self._experts_per_layer = max((plan.experts[ns[0]].count for ns in self._names_of), default=0)
        config = getattr(root, "config", None)
        self._top_k = int(getattr(config, "num_experts_per_tok", 0) or 2)  # then as the router chose
        self.expert_cache = ExpertCache(
            plan.expert_cache_bytes,
            {g: sum(plan.experts[n].stride for n in names) for g, names in enumerate(self._names_of)},
        )
        # The reader knows targets by index only: a module reference would keep the model alive
        # through its hooks for as long as the thread runs.
        self.index = {m: i for i, m in enumerate(order)}
        # Every parameter by owner, for `state_dict()`; one view per stored tensor while any is alive,
        # so tied names share one tensor there as they share one parameter.
        self._owned: dict[nn.Module, dict[str, Slot]] = {}
        for module_slots in slots.values():
            for slot in module_slots:
                for owner, attr in slot.owners:
                    self._owned.setdefault(owner, {})[attr] = slot
        self._views: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
        self._lock = threading.RLock()
        self._local = threading.local()  # per thread: its `_Calls`
        self._handles: list[RemovableHandle] = []
        self.recorder: Recorder | None = None  # while profiling; one check per hook otherwise
        self.prefetcher: Prefetcher | None = None
        self.stager: Stager | None = None
        self.adaptive: Adaptive | None = None  # memory_budget="auto": re-plans between forwards
        self.memory_note = ""  # what the memory policy chose, in words (profiler, `pylomin run`)
        self._open: set[_Calls] = set()  # the threads whose root forward runs now
        self._tokens = itertools.count()  # holder tokens, one per hooked call

    @property
    def pinned_bytes(self) -> int:
        """Bytes kept materialized for the model's lifetime (the plan's resident set)."""
        return self.plan.resident_bytes

    def _pin(self) -> list[tuple[str, int, int]]:
        """Materialize the plan's resident tensors; returns the ranges of zero-copy ones, to fault in (`_fault_in`)."""
        rows_only = set(self.plan.random_access)
        ranges = []
        for module in self.order:
            for slot in self.targets[module]:
                if slot.stored_name not in self.plan.resident or slot.pinned:
                    continue
                slot.pinned = True
                copied = self._materialize(slot)
                # A copy (device or dtype) is the resident one: faulting the file pages back in would
                # keep a second, useless copy in host memory. Lookup tables are read by rows on use.
                where = self.store.location(slot.stored_name)
                if not copied and where not in rows_only:
                    ranges.append(where)
        return ranges

    def _fault_in(self, ranges: list[tuple[str, int, int]]) -> None:
        # Outside the lock: reading a resident set from disk takes seconds, and other threads' hooks run meanwhile.
        for where in ranges:
            self.store.prefetch(*where)

    def attach(self) -> None:
        """Carry out the plan: resident tensors in, kernel hints, the reader thread, then the hooks."""
        for where in self.plan.random_access:
            self.store.random_access(*where)
        self._fault_in(self._pin())
        if self.plan.prefetch_units > 0 or self.adaptive is not None and self.adaptive.prefetch_units > 0:
            if self.copy is not None:
                streamed = {
                    i: [s.stored_name for s in self.targets[self.order[i]] if not s.pinned] for i in self.plan.streamed
                }
                dtypes = {s.stored_name: s.placeholder.dtype for slots in self.targets.values() for s in slots}
                self.stager = Stager(self.store, streamed, dtypes, self.copy)
            self.prefetcher = Prefetcher(
                self.store,
                dict(enumerate(map(list, self.plan.ranges))),
                list(range(len(self.order))),  # module definition order, until a forward is recorded
                max_units=self.plan.prefetch_units,
                max_bytes=self.plan.prefetch_bytes,
                skip={i for i, r in enumerate(self.plan.read_ahead) if not r},
                stage=self.stager,
                wide=self._wide_ranges(),
            )
        # The pass hooks come first, so that an interrupted call is recovered before any unit's own hook runs.
        self._handles.append(self.root.register_forward_pre_hook(self._begin_pass, with_kwargs=True))
        self._handles.append(self.root.register_forward_hook(self._end_pass, always_call=True))
        for module in self.order:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        for module in self.experts:
            self._handles.append(module.register_forward_pre_hook(self._read_chosen_experts, with_kwargs=True))
        for module in self._owned:
            # A partial, not the bound method: torch marks the hook with an attribute.
            self._handles.append(module.register_state_dict_post_hook(functools.partial(self._real_state)))

    def detach(self, *, restore: bool = False) -> None:
        """Remove the hooks, stop the reader, and put every parameter back on meta (or in memory: `restore`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.prefetcher is not None:
            self.prefetcher.close()
        if self.stager is not None:
            self.stager.clear()
        with self._lock:
            for slots in self.targets.values():
                for slot in slots:
                    slot.holders.clear()
                    slot.pinned = False
                    if not slot.released:
                        self._release([slot])
                    if restore:
                        # As loaded: the placeholder carries the dtype (integers are never cast).
                        self._set(
                            slot, self.store.view(slot.stored_name).to(self.device, slot.placeholder.dtype, copy=True)
                        )

    def replan(self, plan: Plan, *, drop_page_cache: bool, note: str = "") -> None:
        """Carry out a new plan between forwards: unpin what left the resident set, pin what joined it.

        Used when the memory this process may use moved (`memory_budget="auto"`). Units running in
        other threads keep what they hold; pages given back are dropped from the cache.
        """
        with self._lock:
            self.plan = plan
            self.store.drop_page_cache = drop_page_cache
            self.memory_note = note or self.memory_note
            gone: list[Slot] = []
            for module in self.order:
                for slot in self.targets[module]:
                    if slot.pinned and slot.stored_name not in plan.resident:
                        slot.pinned = False
                        if not slot.holders:
                            gone.append(slot)
            self._release(gone)
            for g, e in self.expert_cache.resize(plan.expert_cache_bytes):
                self._drop_expert(g, e)
            ranges = self._pin()
            if self.prefetcher is not None:
                self.prefetcher.resize(
                    max_units=plan.prefetch_units,
                    max_bytes=plan.prefetch_bytes,
                    skip={i for i, r in enumerate(plan.read_ahead) if not r},
                    wide=self._wide_ranges(),
                )
        self._fault_in(ranges)

    def _drop_expert(self, group: int, e: int) -> None:
        for where in merge([r for name in self._names_of[group] for r in self.plan.experts[name].ranges([e])]):
            self.store.done(*where)

    def _wide_ranges(self) -> dict[int, list[tuple[str, int, int]]]:
        """Per target holding fused experts not all resident: its ranges with every expert (read ahead for prompts)."""
        out = {}
        for i, module in enumerate(self.order):
            fused = [s.stored_name for s in self.targets[module] if s.stored_name in self._group_of]
            if fused and not all(n in self.plan.resident for n in fused):
                out[i] = merge([*self.plan.ranges[i], *(self.store.location(n) for n in fused)])
        return out

    # --- the pass lifecycle: begin pass, enter unit, leave unit, end pass, and recovery --------
    #
    # torch runs `always_call` forward hooks for an `Exception` only: a `KeyboardInterrupt` (Ctrl-C)
    # skips every post-hook between it and the caller. So each thread records what its calls hold
    # (`_Calls`), and the next call of that thread that finds them unfinished gives it all back
    # first (`_recover`): what each unfinished call holds, its pass, and reads queued for it.

    def _calls(self) -> _Calls:
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = _Calls()
        return calls

    @property
    def passes(self) -> int:
        """Root forwards running now, all threads."""
        return len(self._open)

    def _begin_pass(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        calls = self._calls()
        if calls in self._open or calls.frames:  # the root forward runs outermost: an interrupted call's
            self._recover(calls, 0)
        with self._lock:
            alone = not self._open
            self._open.add(calls)
        if alone and self.adaptive is not None:
            self.adaptive.maybe_recheck()  # re-plans through `replan` when memory moved
        if self.prefetcher is not None:
            self.prefetcher.begin_pass(calls, wide=self._wide_pass(args, kwargs))

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        self._close_pass(self._calls(), interrupted=False)

    def _close_pass(self, calls: _Calls, *, interrupted: bool) -> None:
        """End this thread's pass: undo what `_begin_pass` did, however far it got (each step is idempotent)."""
        if self.prefetcher is not None:
            self.prefetcher.end_pass(calls, interrupted=interrupted)
        with self._lock:
            self._open.discard(calls)

    def _recover(self, calls: _Calls, depth: int) -> None:
        """Give back what this thread's interrupted calls from `depth` up still hold; from 0, end their pass too."""
        stale = calls.frames[depth:]
        with self._lock:
            for module, token in stale:
                self._give_back(module, token)
        del calls.frames[depth:]
        if depth == 0:
            self._close_pass(calls, interrupted=True)
        logger.info("pylomin: a forward was interrupted; released what it held (%d units)", len(stale))

    def _give_back(self, module: nn.Module, token: int) -> None:
        # Under the lock. Whatever no call holds any more goes, including a slot whose release an
        # interrupt cut short.
        slots = self.targets[module]
        for slot in slots:
            slot.holders.discard(token)
        self._release([s for s in slots if not s.holders and not s.pinned and not s.released])

    def _wide_pass(self, args: Any, kwargs: Any) -> bool:
        """Whether a pass of these inputs chooses most experts in every layer: T tokens routed to k
        of E experts each choose on average 1 - e^-2 = 86 % of them once T * k >= 2E; reading them
        ahead whole, overlapped with compute, then beats reading them once the router has chosen."""
        if not self.experts:
            return False
        ids = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if not isinstance(ids, torch.Tensor):
            return False
        tokens = ids.shape[:-1].numel() if ids.is_floating_point() else ids.numel()
        return tokens * self._top_k >= 2 * self._experts_per_layer

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        # This call's token marks what it holds, so the post-hook (which runs even when this one
        # raises) gives back exactly that, never what another thread holds on the same slot.
        calls = self._calls()
        for depth, (running, _) in enumerate(calls.frames):
            if running is module:  # a unit never runs inside itself: that call was interrupted
                self._recover(calls, depth)
                break
        token = next(self._tokens)
        calls.frames.append((module, token))
        if self.prefetcher is not None:
            self.prefetcher.enter(self.index[module])  # may wait for this unit's read; outside the lock
        t1 = time.perf_counter_ns() if rec is not None else 0
        with self._lock:
            for slot in self.targets[module]:
                slot.holders.add(token)
                if slot.released:  # also where a call interrupted while materializing it left it
                    self._materialize(slot)
        if rec is not None:
            t2 = time.perf_counter_ns()
            i = self.index[module]
            rec.add(i, "wait", t0, t1)
            rec.add(i, "load", t1, t2, nbytes=0 if self.prefetcher is not None else rec.nbytes[i])
            rec.begin_compute(i, t2)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        frames = self._calls().frames
        if not frames or frames[-1][0] is not module:
            return  # our pre-hook did not run for this call (a hook before it raised): nothing is held
        with self._lock:
            self._give_back(module, frames[-1][1])
        frames.pop()  # last: interrupted before this, the frame is given back again by `_recover`
        if rec is not None:
            i = self.index[module]
            rec.end_compute(i, t0)
            rec.add(i, "release", t0, time.perf_counter_ns())

    def _read_chosen_experts(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        # forward(hidden_states, top_k_index, top_k_weights): the router's choice is an argument.
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if not isinstance(index, torch.Tensor):
            return  # called some other way: the chosen experts' pages fault in as they are used
        self._top_k = index.shape[-1] if index.dim() else 1
        group = self._group[module]
        if all(name in self.plan.resident for name in self._names_of[group]):
            return  # every expert resident
        chosen = [int(e) for e in torch.unique(index).tolist()]
        with self._lock:
            misses, dropped = self.expert_cache.use(group, chosen)
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        for g, e in dropped:  # no longer among the most used: its pages go like a streamed unit's
            self._drop_expert(g, e)
        hits = len(chosen) - len(misses)
        prefetcher = self.prefetcher
        if prefetcher is not None and prefetcher.wide_pass and module in self.index:
            misses = []  # read ahead whole with the unit (waited for in `_pre`)
        ranges = [r for name in self._names_of[group] for r in self.plan.experts[name].ranges(misses)]
        self.store.read_exactly(ranges)
        if rec is not None and module in self.index:
            nbytes = sum(n for _, _, n in ranges)
            rec.experts(
                self.index[module],
                t0,
                time.perf_counter_ns(),
                chosen=chosen,
                hits=hits,
                nbytes=nbytes,
            )

    def _materialize(self, slot: Slot) -> bool:
        """Put the slot's tensor in place; True when it is a copy (device or dtype), not a view of the file."""
        staged = self.stager.take(slot.stored_name) if self.stager is not None else None
        if staged is not None:
            tensor, event = staged
            if event is not None:
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(event)  # compute waits for this copy only
                tensor.record_stream(stream)  # allocated on the copy stream, used on this one
            self._set(slot, tensor)
            return True
        tensor = self.store.view(slot.stored_name)
        # The placeholder carries the dtype to load in (integers, a quantized layer's scales: as stored).
        cast = tensor.dtype != slot.placeholder.dtype
        if self.device.type == "cpu" and not cast:
            self._set(slot, tensor)
            return False
        tensor = tensor.to(device=self.device, dtype=slot.placeholder.dtype)
        # The copy is independent of the mapping: its pages are done already.
        self.store.done(*self.store.location(slot.stored_name))
        self._set(slot, tensor)
        return True

    def _real_state(self, module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
        """`state_dict()` holds the stored tensors (views of the files, cast as loaded), not meta placeholders."""
        for attr, slot in self._owned[module].items():
            key = prefix + attr
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.is_meta:
                tensor = self._views.get(slot.stored_name)
                if tensor is None:
                    tensor = self.store.view(slot.stored_name).to(slot.placeholder.dtype)
                    self._views[slot.stored_name] = tensor
                state[key] = tensor

    def _set(self, slot: Slot, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=slot.placeholder.requires_grad)
        if param.requires_grad and torch.is_grad_enabled():
            param.register_hook(_refuse_training)  # its gradient would land on a parameter released after use
        for module, attr in slot.owners:
            module._parameters[attr] = param

    def _release(self, slots: list[Slot]) -> None:
        for slot in slots:
            for module, attr in slot.owners:
                module._parameters[attr] = slot.placeholder
        # One merged range per file: the page cache drops a multi-page folio only when one call covers it.
        for where in merge([r for s in slots for r in self._ranges_to_drop(s.stored_name)]):
            if self.prefetcher is not None and not self.prefetcher.closed:
                self.prefetcher.release_later(*where)
            else:
                self.store.done(*where)

    def _ranges_to_drop(self, stored_name: str) -> list[tuple[str, int, int]]:
        """The byte ranges of a released tensor to drop: all of it, but the experts the cache keeps."""
        group = self._group_of.get(stored_name)
        if group is None:
            return [self.store.location(stored_name)]
        kept = self.expert_cache.kept_in(group)
        fused = self.plan.experts[stored_name]
        return fused.ranges([e for e in range(fused.count) if e not in kept])
