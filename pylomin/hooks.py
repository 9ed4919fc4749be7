"""Per-unit forward hooks: materialize a unit's parameters right before it runs, release them right after."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from pylomin.store import Store


@dataclass(eq=False)
class Slot:
    """One parameter, shared by all its tied names: where it is stored and who holds it now."""

    stored_name: str
    placeholder: nn.Parameter  # on meta: what the owners hold while the parameter is released
    owners: list[tuple[nn.Module, str]] = field(default_factory=list)
    refs: int = 0


class HookManager:
    """Registers the hooks of a streamed model and pages parameters in and out, thread-safely.

    `targets` maps each hooked module to the slots it needs while it runs. Slots are reference
    counted, so nested units, modules called twice (a tied LM head) and several threads running
    the same model all see parameters that stay put until the last user is done.
    """

    def __init__(
        self,
        store: Store,
        targets: dict[nn.Module, list[Slot]],
        *,
        device: torch.device,
        dtype: torch.dtype | None,
    ):
        self.store = store
        self.targets = targets
        self.device = device
        self.dtype = dtype
        self._lock = threading.RLock()
        self._handles: list[RemovableHandle] = []

    def attach(self) -> None:
        """Register a forward-pre-hook and an always-called forward hook on every target module."""
        for module in self.targets:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def detach(self) -> None:
        """Remove the hooks and put every parameter back on meta."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        with self._lock:
            for slots in self.targets.values():
                for slot in slots:
                    if slot.refs:
                        slot.refs = 0
                        self._release(slot)

    def _pre(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        slots = self.targets[module]
        with self._lock:
            for slot in slots:
                slot.refs += 1
                if slot.refs == 1:
                    self._materialize(slot)

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        slots = self.targets[module]
        with self._lock:
            for slot in slots:
                if slot.refs == 0:  # the pre-hook failed before reaching this slot
                    continue
                slot.refs -= 1
                if slot.refs == 0:
                    self._release(slot)

    def _materialize(self, slot: Slot) -> None:
        tensor = self.store.view(slot.stored_name)
        copied = self.device.type != "cpu" or (self.dtype is not None and tensor.dtype != self.dtype)
        if copied:
            tensor = tensor.to(device=self.device, dtype=self.dtype)
            # The copy is independent of the mapping: its pages are done already.
            self.store.done(*self.store.location(slot.stored_name))
        param = nn.Parameter(tensor, requires_grad=slot.placeholder.requires_grad)
        for module, attr in slot.owners:
            module._parameters[attr] = param

    def _release(self, slot: Slot) -> None:
        for module, attr in slot.owners:
            module._parameters[attr] = slot.placeholder
        self.store.done(*self.store.location(slot.stored_name))
