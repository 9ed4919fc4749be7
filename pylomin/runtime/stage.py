"""Copying units to the device ahead of use, on the reader thread: pinned staging buffers and a copy stream.

The stager knows tensors by their stored names and the store; it never holds a module. The reader
thread is a garbage-collection root, so anything it references lives as long as it runs: a
reference to the model would keep the model, its files and its device memory alive forever.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

from pylomin.runtime.store import Store

# (source tensor on the CPU, dtype to cast floating tensors to or None) -> (device tensor, its ready event or None)
Copy = Callable[[torch.Tensor, "torch.dtype | None"], "tuple[torch.Tensor, Any]"]


class Stager:
    """Copies a target's streamed tensors to the device when the reader reaches it; the hooks take them."""

    def __init__(self, store: Store, tensors: dict[int, list[str]], dtypes: dict[str, torch.dtype], copy: Copy):
        self.store = store
        self.tensors = tensors  # target index -> stored names copied ahead (resident ones are not)
        self.dtypes = dtypes  # stored name -> the dtype it is loaded in
        self.copy = copy
        self._staged: dict[str, tuple[torch.Tensor, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, target: int) -> None:
        """Reader thread: copy `target`'s tensors, unless a copy is already waiting."""
        for name in self.tensors.get(target, ()):
            with self._lock:
                if name in self._staged:
                    continue
            src = self.store.view(name)
            dtype = self.dtypes.get(name, src.dtype)
            dev, event = self.copy(src, dtype if dtype != src.dtype else None)
            self.store.release(self.store.location(name))  # the device copy is independent of the mapping
            with self._lock:
                self._staged[name] = (dev, event)

    def pop(self, name: str) -> tuple[torch.Tensor, Any] | None:
        """The staged copy of `name` and its event, handed over once; None if none is waiting."""
        with self._lock:
            return self._staged.pop(name, None)

    def clear(self) -> None:
        """Drop copies that were staged but never taken (their device memory goes back)."""
        with self._lock:
            self._staged.clear()


class PinnedCopy:
    """CUDA copies through a ring of reusable pinned host buffers on a copy stream; a buffer is reused once its copy is done.

    The buffers are allocated on first use, in the reader thread, each `nbytes` long (the largest
    streamed tensor).
    """

    def __init__(self, device: torch.device, nbytes: int, count: int = 2):
        self.device = device
        self.nbytes = nbytes
        self.count = count
        self.stream: Any = None
        self.buffers: list[torch.Tensor] = []
        self.events: list[Any] = []
        self.next = 0

    def __call__(self, src: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, Any]:
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
            self.buffers = [torch.empty(self.nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(self.count)]
            self.events = [None] * self.count
        i = self.next
        self.next = (i + 1) % self.count
        if self.events[i] is not None:
            self.events[i].synchronize()  # the previous copy out of this buffer has finished
        with torch.cuda.stream(self.stream):
            host = self.buffers[i][: src.numel() * src.element_size()].view(src.dtype).view(src.shape)
            host.copy_(src)  # page-cache pages -> pinned memory, on this (reader) thread
            dev = host.to(self.device, non_blocking=True)
            if dtype is not None and dev.dtype != dtype:
                dev = dev.to(dtype)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.events[i] = event
        return dev, event
