"""Per-unit forward hooks: materialize a unit's parameters right before it runs, release them right after."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pylomin.prefetch import Prefetcher, Range
from pylomin.store import Store


@dataclass(eq=False)
class Slot:
    """One parameter, shared by all its tied names: where it is stored and who holds it now."""

    stored_name: str
    placeholder: nn.Parameter  # on meta: what the owners hold while the parameter is released
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    refs: int = 0
    pinned: bool = False  # kept materialized for the model's lifetime (memory budget)


class HookManager:
    """Registers the hooks of a streamed model and pages parameters in and out, thread-safely.

    `targets` maps each hooked module to the slots it needs while it runs. Slots are reference
    counted, so nested units, modules called twice (a tied LM head) and several threads running
    the same model all see parameters that stay put until the last user is done.
    """

    def __init__(
        self,
        store: Store,
        root: nn.Module,
        targets: dict[nn.Module, list[Slot]],
        *,
        device: torch.device,
        dtype: torch.dtype | None,
        prefetch_units: int = 2,
        prefetch_bytes: int = 256 * 2**20,
        memory_budget: int = 0,
    ):
        self.store = store
        self.root = root
        self.targets = targets
        self.device = device
        self.dtype = dtype
        self._lock = threading.RLock()
        self._local = threading.local()  # per thread: the stack of hooked calls running and the slots each holds
        self._handles: list[RemovableHandle] = []
        self._staged: dict[Slot, tuple[torch.Tensor, Any]] = {}  # CUDA: copied ahead, with its event
        self.recorder: Any = None  # a pylomin.profile.Profile while profiling; one check per hook otherwise
        self._staging: _PinnedRing | None = None
        position = {m: i for i, m in enumerate(root.modules())}
        self.order = sorted(targets, key=lambda m: position.get(m, len(position)))
        self.ranges = {m: _merge([store.location(s.stored_name) for s in slots]) for m, slots in targets.items()}
        self.pinned_bytes = self._pin(memory_budget)
        # The reader knows targets by index only: a module reference would keep the model alive
        # through its hooks for as long as the thread runs.
        self.index = {m: i for i, m in enumerate(self.order)}
        # Embedding lookups read a few rows, not the table: never read a whole table ahead.
        skip = {
            self.index[m] for m, slots in targets.items() if isinstance(m, nn.Embedding) or all(s.pinned for s in slots)
        }
        # ... and have the kernel read only the pages a lookup faults, unless the table is tied to a
        # module that reads all of it (an LM head): that read wants the kernel's read-ahead.
        whole = {s for m, slots in targets.items() if not isinstance(m, nn.Embedding) for s in slots}
        for m, slots in targets.items():
            if isinstance(m, nn.Embedding):
                for slot in slots:
                    if slot not in whole:
                        store.random_access(*store.location(slot.stored_name))
        self._streamed = [s for i, m in enumerate(self.order) if i not in skip for s in targets[m] if not s.pinned]
        self.prefetcher: Prefetcher[int] | None = None
        if prefetch_units > 0:
            ranges = {self.index[m]: r for m, r in self.ranges.items()}
            first = list(range(len(self.order)))  # module definition order, until a forward is recorded
            self.prefetcher = Prefetcher(
                store,
                ranges,
                first,
                max_units=prefetch_units,
                max_bytes=prefetch_bytes,
                skip=skip,
                stage=self._stage if device.type == "cuda" else None,
            )

    def _pin(self, budget: int) -> int:
        """Keep the slots that fit in `budget` bytes materialized: tied and embedding slots first."""
        if budget <= 0:
            return 0
        seen: dict[Slot, int] = {}
        for module in self.order:
            for slot in self.targets[module]:
                seen[slot] = seen.get(slot, 0) + 1
        lookups = {s for m in self.order if isinstance(m, nn.Embedding) for s in self.targets[m]}
        ranked = sorted(seen, key=lambda s: (-seen[s], s not in lookups))  # stable: execution order after that
        used = 0
        for slot in ranked:
            nbytes = self.store.location(slot.stored_name)[2]
            if used + nbytes > budget:
                continue
            used += nbytes
            slot.pinned = True
            slot.refs += 1
            self._materialize(slot)
            if slot not in lookups:
                self.store.prefetch(*self.store.location(slot.stored_name))
        return used

    def attach(self) -> None:
        """Register the hooks: pass boundaries on the root, page-in/out on every target module."""
        if self.prefetcher is not None:
            self._handles.append(self.root.register_forward_pre_hook(self._begin_pass))
            self._handles.append(self.root.register_forward_hook(self._end_pass, always_call=True))
        for module in self.targets:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def detach(self, *, restore: bool = False) -> None:
        """Remove the hooks, stop the reader, and put every parameter back on meta (or in memory: `restore`)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.prefetcher is not None:
            self.prefetcher.close()
        with self._lock:
            for slots in self.targets.values():
                for slot in slots:
                    if slot.refs:
                        slot.refs = 0
                        slot.pinned = False
                        self._release(slot)
                    if restore:
                        # As loaded: the placeholder carries the dtype (integers are never cast).
                        self._set(
                            slot, self.store.view(slot.stored_name).to(self.device, slot.placeholder.dtype, copy=True)
                        )

    def _begin_pass(self, module: nn.Module, args: Any) -> None:
        assert self.prefetcher is not None
        self.prefetcher.begin_pass()

    def _end_pass(self, module: nn.Module, args: Any, output: Any) -> None:
        assert self.prefetcher is not None
        self.prefetcher.end_pass()

    def _frames(self) -> list[tuple[nn.Module, list[Slot]]]:
        frames = getattr(self._local, "frames", None)
        if frames is None:
            frames = self._local.frames = []
        return frames

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        rec = self.recorder
        t0 = time.perf_counter_ns() if rec is not None else 0
        # What this call holds, so the post-hook (which runs even when this one raises) gives back
        # exactly that, never a reference another thread holds on the same slot.
        held: list[Slot] = []
        self._frames().append((module, held))
        if self.prefetcher is not None:
            self.prefetcher.enter(self.index[module])  # may wait for this unit's read; outside the lock
        t1 = time.perf_counter_ns() if rec is not None else 0
        with self._lock:
            for slot in self.targets[module]:
                slot.refs += 1
                held.append(slot)
                if slot.refs == 1:
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
        frames = self._frames()
        if not frames or frames[-1][0] is not module:
            return  # our pre-hook did not run for this call (a hook before it raised): nothing is held
        _, held = frames.pop()
        with self._lock:
            for slot in held:
                slot.refs -= 1
                if slot.refs == 0:
                    self._release(slot)
        if rec is not None:
            i = self.index[module]
            rec.end_compute(i, t0)
            rec.add(i, "release", t0, time.perf_counter_ns())

    def _stage(self, target: int) -> None:
        """Reader thread, CUDA: copy a unit's parameters to the device through pinned buffers, on a copy stream."""
        if self._staging is None:
            self._staging = _PinnedRing(self.device, max(self.store.location(s.stored_name)[2] for s in self._streamed))
        ring = self._staging
        for slot in self.targets[self.order[target]]:
            if slot.pinned or slot in self._staged:
                continue
            src = self.store.view(slot.stored_name)
            with torch.cuda.stream(ring.stream):
                dev, event = ring.copy(src, self.dtype if src.is_floating_point() else None)
            self.store.done(*self.store.location(slot.stored_name))  # in pinned memory now
            with self._lock:
                self._staged[slot] = (dev, event)

    def _materialize(self, slot: Slot) -> None:
        staged = self._staged.pop(slot, None)
        if staged is not None:
            tensor, event = staged
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)  # compute waits for this copy only
            tensor.record_stream(stream)  # allocated on the copy stream, used on this one
            self._set(slot, tensor)
            return
        tensor = self.store.view(slot.stored_name)
        cast = self.dtype is not None and tensor.is_floating_point() and tensor.dtype != self.dtype
        if self.device.type != "cpu" or cast:
            tensor = tensor.to(device=self.device, dtype=self.dtype if cast else None)
            # The copy is independent of the mapping: its pages are done already.
            self.store.done(*self.store.location(slot.stored_name))
        self._set(slot, tensor)

    def _set(self, slot: Slot, tensor: torch.Tensor) -> None:
        param = nn.Parameter(tensor, requires_grad=slot.placeholder.requires_grad)
        for module, attr in slot.owners:
            module._parameters[attr] = param

    def _release(self, slot: Slot) -> None:
        for module, attr in slot.owners:
            module._parameters[attr] = slot.placeholder
        if self.prefetcher is not None and not self.prefetcher.closed:
            self.prefetcher.release_later(*self.store.location(slot.stored_name))
        else:
            self.store.done(*self.store.location(slot.stored_name))


class _PinnedRing:
    """Reusable pinned host buffers for host-to-device copies; a buffer is reused once its copy is done."""

    def __init__(self, device: torch.device, nbytes: int, count: int = 2):
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(count)]
        self.events: list[Any] = [None] * count
        self.device = device
        self.next = 0

    def copy(self, src: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, Any]:
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the previous copy out of this buffer has finished
        host = self.buffers[i][: src.numel() * src.element_size()].view(src.dtype).view(src.shape)
        host.copy_(src)  # page-cache pages -> pinned memory, on this (reader) thread
        dev = host.to(self.device, non_blocking=True)
        if dtype is not None and dev.dtype != dtype:
            dev = dev.to(dtype)
        event = torch.cuda.Event()
        event.record(self.stream)
        self.events[i] = event
        return dev, event


def _merge(ranges: list[Range]) -> list[Range]:
    """Sort byte ranges and merge those that touch, per file: fewer, larger reads."""
    out: list[Range] = []
    for file, offset, length in sorted(ranges):
        if out and out[-1][0] == file and out[-1][1] + out[-1][2] >= offset:
            f, o, n = out[-1]
            out[-1] = (f, o, max(n, offset + length - o))
        else:
            out.append((file, offset, length))
    return out
