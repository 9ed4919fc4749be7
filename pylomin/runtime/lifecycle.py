"""The pass lifecycle of a streamed model: begin pass, enter unit, leave unit, end pass, and recovery after an interrupt.

    root forward ──▶ begin pass ── recover what an interrupted call of this thread left;
       │                           the memory policy's re-check (first pass in, at most 1/s):
       │                           a new plan → pager.replan, reader.resize;
       │                           reader.begin_pass (reads the first units ahead)
       │  each unit ──▶ enter ── reader.enter (waits for its read) → pager.hold(token)
       │                 │       router: guess the next layer's experts, queue their reads
       │                 │       experts module: read the experts the router chose
       │                 ▼
       │              leave ──── pager.give_back(token); the frame leaves the thread's stack
       ▼
    end pass ─────────────────── reader.end_pass; the pass is closed

torch runs `always_call` forward hooks for an `Exception` only: a `KeyboardInterrupt` (Ctrl-C) skips
every post-hook between it and the caller. So each thread records what its calls hold (`_Calls`), and
the next call of that thread that finds them unfinished gives it all back first (`_recover`): what each
unfinished call holds, its pass, and reads queued for it. Each step is idempotent.
"""

from __future__ import annotations

import functools
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pylomin.modeling import pass_bytes, token_inputs
from pylomin.runtime.pager import Pager
from pylomin.runtime.policy import MemoryPolicy
from pylomin.runtime.prefetch import Prefetcher, Recorder

logger = logging.getLogger(__name__)


class Call(NamedTuple):
    """A hooked call running now: its unit and the token that marks what it holds."""

    module: nn.Module
    token: int


@dataclass(eq=False)
class _Calls:
    """One thread's hooked calls, outermost first. A call leaves the list only after what it holds is
    given back, so a call still there after an interrupt says exactly what is left to give back."""

    running: list[Call] = field(default_factory=list)


class Lifecycle:
    """Registers the pass and unit hooks of a streamed model and drives the pager, the reader and the policy from them."""

    def __init__(self, root: nn.Module, pager: Pager, policy: MemoryPolicy, reader: Prefetcher | None):
        self.root = root
        # The activations' dtype, for the memory a forward will allocate (`_reserve`).
        self.dtype = next((p.dtype for p in root.parameters() if p.is_floating_point()), torch.float32)
        self.pager = pager
        self.policy = policy
        self.reader = reader
        # The reader knows units by index only: a module reference would keep the model alive
        # through its hooks for as long as the thread runs.
        self.index = {m: i for i, m in enumerate(pager.order)}
        self.recorder: Recorder | None = None  # while profiling; one check per hook otherwise
        self._local = threading.local()  # per thread: its `_Calls`
        self._open: set[_Calls] = set()  # the threads whose root forward runs now
        self._tokens = itertools.count()  # holder tokens, one per hooked call
        self._handles: list[RemovableHandle] = []

    @property
    def passes(self) -> int:
        """Root forwards running now, all threads."""
        return len(self._open)

    def attach(self) -> None:
        """Register the hooks: the pass hooks first, so that an interrupted call is recovered before any unit's own hook runs."""
        hooks = self._handles
        hooks.append(self.root.register_forward_pre_hook(self._begin_pass, with_kwargs=True))
        hooks.append(self.root.register_forward_hook(self._end_pass, always_call=True))
        for module in self.pager.order:
            hooks.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            hooks.append(module.register_forward_hook(self._leave, always_call=True))
        if self.pager.experts is not None:
            for module in self.pager.experts.group:
                hooks.append(module.register_forward_pre_hook(self._read_chosen_experts, with_kwargs=True))
            for router in self.pager.experts.next:
                hooks.append(router.register_forward_pre_hook(self._guess_next_experts, with_kwargs=True))
        for module in self.pager.owned:
            # A partial, not the bound method: torch marks the hook with an attribute.
            hooks.append(module.register_state_dict_post_hook(functools.partial(self.pager.real_state)))

    def detach(self) -> None:
        """Remove every hook."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _calls(self) -> _Calls:
        calls = getattr(self._local, "calls", None)
        if calls is None:
            calls = self._local.calls = _Calls()
        return calls

    # --- begin pass, end pass ------------------------------------------------------------------

    def _begin_pass(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        calls = self._calls()
        if calls in self._open or calls.running:  # the root forward runs outermost: an interrupted call's
            self._recover(calls, 0)
        with self.pager.lock:
            alone = not self._open
            self._open.add(calls)
        if alone:
            self._recheck(args, kwargs)
        if self.reader is not None:
            experts = self.pager.experts
            self.reader.begin_pass(calls, all_experts=experts is not None and experts.reads_all_experts(args, kwargs))

    def _recheck(self, args: Any, kwargs: Any) -> None:
        # Between forwards: the policy reads the memory figure again (at most once a second, at once when
        # this forward will allocate much more than the last) and may hand a new plan.
        plan = self.policy.recheck(self._reserve(args, kwargs) if self.policy.adaptive else 0)
        if plan is None:
            return
        self.pager.store.drop_page_cache = self.policy.drop_page_cache
        ranges = self.pager.replan(plan)
        if self.reader is not None:
            self.reader.resize(
                max_units=plan.prefetch_units,
                max_bytes=plan.prefetch_bytes,
                skip={i for i, r in enumerate(plan.read_ahead) if not r},
                whole_layers=self.pager.whole_layers(),
            )
        self.pager.fault_in(ranges)

    def _reserve(self, args: Any, kwargs: Any) -> int:
        """What this root forward will allocate: its KV cache growth and activations, from the model's
        config and the inputs' shape (0 for a model without a config or token inputs)."""
        config = getattr(self.root, "config", None)
        ids = token_inputs(args, kwargs)
        if config is None or ids is None or ids.dim() < 2:
            return 0
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        try:
            cached = int(past.get_seq_length()) if past is not None else 0
        except Exception:  # a legacy tuple cache, or a cache type without it
            cached = 0
        keep = kwargs.get("logits_to_keep")
        dtype = ids.dtype if ids.is_floating_point() else self.dtype
        return pass_bytes(
            config,
            ids.shape[0],
            ids.shape[1],
            cached,
            logits=keep if isinstance(keep, int) and keep > 0 else None,
            dtype=dtype,
        )

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        self._close_pass(self._calls(), interrupted=False)

    def _close_pass(self, calls: _Calls, *, interrupted: bool) -> None:
        """End this thread's pass: undo what `_begin_pass` did, however far it got (each step is idempotent)."""
        if self.reader is not None:
            self.reader.end_pass(calls, interrupted=interrupted)
        with self.pager.lock:
            self._open.discard(calls)

    def _recover(self, calls: _Calls, depth: int) -> None:
        """Give back what this thread's interrupted calls from `depth` up still hold; from 0, end their pass too."""
        stale = calls.running[depth:]
        for call in stale:
            self.pager.give_back(*call)
        del calls.running[depth:]
        if depth == 0:
            self._close_pass(calls, interrupted=True)
        logger.info("pylomin: a forward was interrupted; released what it held (%d units)", len(stale))

    # --- enter unit, leave unit ------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        calls = self._calls()
        for depth, running in enumerate(calls.running):
            if running.module is module:  # a unit never runs inside itself: that call was interrupted
                self._recover(calls, depth)
                break
        # This call's token marks what it holds, so the post-hook (which runs even when this one
        # raises) gives back exactly that, never what another thread holds on the same slot.
        call = Call(module, next(self._tokens))
        calls.running.append(call)
        if self.reader is not None:
            self.reader.enter(self.index[module])  # may wait for this unit's read; outside the lock
        t1 = time.perf_counter_ns() if rec is not None else 0
        self.pager.hold(*call)
        if rec is not None:
            t2 = time.perf_counter_ns()
            i = self.index[module]
            rec.add(i, "wait", t0, t1)
            rec.add(i, "load", t1, t2, nbytes=0 if self.reader is not None else rec.nbytes[i])
            rec.begin_compute(i, t2)

    def _leave(self, module: nn.Module, args: Any, output: Any) -> None:
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        running = self._calls().running
        if not running or running[-1].module is not module:
            return  # our pre-hook did not run for this call (a hook before it raised): nothing is held
        self.pager.give_back(*running[-1])
        running.pop()  # last: interrupted before this, the call is given back again by `_recover`
        if rec is not None:
            i = self.index[module]
            rec.end_compute(i, t0)
            rec.add(i, "release", t0, time.perf_counter_ns())

    def _read_chosen_experts(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        # forward(hidden_states, top_k_index, top_k_weights): the router's choice is an argument.
        index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        experts = self.pager.experts
        if experts is None or not isinstance(index, torch.Tensor):
            return  # called some other way: the chosen experts' pages fault in as they are used
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        # Read ahead whole with the unit in a prompt pass (waited for in `_enter`).
        whole = self.reader is not None and self.reader.reads_all_experts and module in self.index
        got = experts.read_chosen(module, index, read_ahead=whole)
        if rec is not None and got.experts and module in self.index:
            rec.experts(self.index[module], t0, time.perf_counter_ns(), got)

    def _guess_next_experts(self, router: nn.Module, args: Any, kwargs: Any) -> None:
        # A router's input, before it runs: the next layer's experts are guessed from it and read ahead
        # while this layer computes; not in a pass that reads whole layers ahead anyway.
        experts = self.pager.experts
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (
            experts is None
            or not isinstance(hidden, torch.Tensor)
            or self.reader is not None
            and self.reader.reads_all_experts
        ):
            return
        experts.predict(router, hidden)
