"""The pager: puts a unit's parameters in place for the calls that hold them and takes them out after, thread-safely.

One `Slot` per stored tensor (tied names share it) records the calls holding it by token, so nested
units, modules called twice (a tied LM head), several threads running the same model and calls cut
short by Ctrl-C all see parameters that stay put until the last holder is done. The pager carries out
the plan's resident set (`pin`, `replan`); when to hold and give back is the pass lifecycle's
(`pylomin.runtime.lifecycle`).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pylomin.errors import PylominError
from pylomin.format.manifest import Range
from pylomin.runtime.experts import ExpertPaging
from pylomin.runtime.policy import Plan, merge
from pylomin.runtime.prefetch import Prefetcher
from pylomin.runtime.stage import Stager
from pylomin.runtime.store import Store


@dataclass(eq=False)
class Slot:
    """One parameter, shared by all its tied names: where it is stored and who holds it now."""

    stored_name: str
    placeholder: nn.Parameter  # on meta: what the owners hold while the parameter is released
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    # The calls holding it now, by token: adding or removing a token twice changes nothing, so a
    # call interrupted anywhere in its hooks is given back exactly, by whoever finishes its work.
    holders: set[int] = field(default_factory=set)
    pinned: bool = False  # kept materialized for the model's lifetime (the plan's resident set)

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


class Pager:
    """Materializes and releases the slots of each hooked module; `order` lists them in the plan's target order."""

    def __init__(
        self,
        store: Store,
        order: list[nn.Module],
        slots: dict[nn.Module, list[Slot]],
        plan: Plan,
        *,
        device: torch.device,
    ):
        self.store = store
        self.order = order
        self.slots = slots
        self.plan = plan
        self.device = device
        self.lock = threading.RLock()
        self.experts: ExpertPaging | None = None  # fused experts paged per expert (under this lock)
        self.reader: Prefetcher | None = None  # drops released pages off the compute thread, when there is one
        self.stager: Stager | None = None  # hands over device copies made on the reader thread (CUDA)
        # Every parameter by owner, for `state_dict()`; one view per stored tensor while any is alive,
        # so tied names share one tensor there as they share one parameter.
        self.owned: dict[nn.Module, dict[str, Slot]] = {}
        for module_slots in slots.values():
            for slot in module_slots:
                for owner, attr in slot.owners:
                    self.owned.setdefault(owner, {})[attr] = slot
        self._views: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()

    def pin(self) -> list[Range]:
        """Materialize the plan's resident tensors; returns the ranges of zero-copy ones, to `fault_in`."""
        rows_only = set(self.plan.random_access)
        ranges = []
        for module in self.order:
            for slot in self.slots[module]:
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

    def fault_in(self, ranges: list[Range]) -> None:
        """Read resident ranges in; outside the lock: it takes seconds, and other threads' hooks run meanwhile."""
        for where in ranges:
            self.store.prefetch(where)

    def replan(self, plan: Plan) -> list[Range]:
        """Carry out a new plan between forwards: unpin what left the resident set, pin what joined it.

        Units running in other threads keep what they hold; pages given back are dropped from the
        cache. Returns the ranges to `fault_in` (after the lock is let go).
        """
        with self.lock:
            self.plan = plan
            gone: list[Slot] = []
            for module in self.order:
                for slot in self.slots[module]:
                    if slot.pinned and slot.stored_name not in plan.resident:
                        slot.pinned = False
                        if not slot.holders:
                            gone.append(slot)
            self._release(gone)
            if self.experts is not None:
                self.experts.replan(plan)
            return self.pin()

    def whole_layers(self) -> dict[int, list[Range]]:
        """Per unit holding fused experts: its ranges with every expert, for passes that read all experts."""
        if self.experts is None:
            return {}
        return self.experts.whole_layers([[s.stored_name for s in self.slots[m]] for m in self.order])

    def hold(self, module: nn.Module, token: int) -> None:
        """The call `token` of `module` starts: its slots are in place until it gives them back."""
        with self.lock:
            for slot in self.slots[module]:
                slot.holders.add(token)
                if slot.released:  # also where a call interrupted while materializing it left it
                    self._materialize(slot)

    def give_back(self, module: nn.Module, token: int) -> None:
        """The call `token` of `module` is done (or was interrupted): whatever no call holds any more goes,
        including a slot whose release an interrupt cut short. Twice changes nothing."""
        with self.lock:
            slots = self.slots[module]
            for slot in slots:
                slot.holders.discard(token)
            self._release([s for s in slots if not s.holders and not s.pinned and not s.released])

    def detach(self, *, restore: bool = False) -> None:
        """Put every parameter back on meta (or in memory: `restore`)."""
        if self.stager is not None:
            self.stager.clear()
        with self.lock:
            for slots in self.slots.values():
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

    def real_state(self, module: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
        """`state_dict()` post-hook: the stored tensors (views of the files, cast as loaded), not meta placeholders."""
        for attr, slot in self.owned[module].items():
            key = prefix + attr
            value = state.get(key)
            if isinstance(value, torch.Tensor) and value.is_meta:
                tensor = self._views.get(slot.stored_name)
                if tensor is None:
                    tensor = self.store.view(slot.stored_name).to(slot.placeholder.dtype)
                    self._views[slot.stored_name] = tensor
                state[key] = tensor

    def _materialize(self, slot: Slot) -> bool:
        """Put the slot's tensor in place; True when it is a copy (device or dtype), not a view of the file."""
        staged = self.stager.pop(slot.stored_name) if self.stager is not None else None
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
        self.store.release(self.store.location(slot.stored_name))
        self._set(slot, tensor)
        return True

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
            if self.reader is not None and not self.reader.closed:
                self.reader.release_later(where)
            else:
                self.store.release(where)

    def _ranges_to_drop(self, stored_name: str) -> list[Range]:
        # All of a released tensor, but the experts the expert cache keeps.
        ranges = self.experts.ranges_to_drop(stored_name) if self.experts is not None else None
        return [self.store.location(stored_name)] if ranges is None else ranges
