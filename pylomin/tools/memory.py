"""Measuring what we claim: resident set split into anonymous and file-backed, and its peak over a block of code."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

from pylomin import _os


@dataclass(frozen=True)
class Rss:
    """Resident set of this process in bytes: anonymous (heap, activations) and file-backed (mapped weights)."""

    anon: int
    file: int

    @property
    def total(self) -> int:
        return self.anon + self.file

    def __sub__(self, other: Rss) -> Rss:
        return Rss(self.anon - other.anon, self.file - other.file)


def rss() -> Rss:
    """The current resident set, from `/proc/self/status`."""
    fields: dict[str, int] = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value, _ = line.split()
                fields[key[:-1]] = int(value) * 1024
    return Rss(fields.get("RssAnon", 0), fields.get("RssFile", 0) + fields.get("RssShmem", 0))


def _hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class PeakRss:
    """Context manager recording the peak resident set inside its block, above the RSS at entry.

    The kernel's high-water mark gives the exact peak total; a sampling thread (every
    `interval` seconds) gives its split into anonymous and file-backed.

    >>> with PeakRss() as peak:
    ...     model(x)
    >>> peak.total, peak.anon, peak.file   # bytes above the RSS at entry
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.start = Rss(0, 0)
        self._max = Rss(0, 0)
        self._hwm_exact = False
        self._hwm = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self._hwm_exact = _reset_hwm()
        self.start = self._max = rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, name="pylomin-rss", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss()
            if now.total > self._max.total:
                self._max = now

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        now = rss()
        if now.total > self._max.total:
            self._max = now
        self._hwm = _hwm() if self._hwm_exact else self._max.total

    @property
    def total(self) -> int:
        """Peak RSS above the RSS at entry (exact when the kernel high-water mark could be reset)."""
        return max(self._hwm, self._max.total) - self.start.total

    @property
    def anon(self) -> int:
        """Anonymous part of the sampled peak, above entry."""
        return self._max.anon - self.start.anon

    @property
    def file(self) -> int:
        """File-backed part of the sampled peak, above entry."""
        return self._max.file - self.start.file

    def __repr__(self) -> str:
        return f"PeakRss(total={self.total / 2**20:.1f} MiB, anon={self.anon / 2**20:.1f} MiB, file={self.file / 2**20:.1f} MiB)"


def release_freed_memory_eagerly(threshold: int = 2**20) -> bool:
    """Have glibc serve allocations of `threshold` bytes or more with mmap, so freeing them returns memory.

    glibc otherwise raises its mmap threshold as large blocks are freed (up to 32 MiB) and keeps
    freed activation buffers in per-thread arenas, which blurs any memory figure. Same as setting
    `MALLOC_MMAP_THRESHOLD_` before start; returns False where glibc's `mallopt` is unavailable.

    The trade-off, measured on the 1.6 GiB BERT at batch 1 x 128 (`examples/original_api_bert.py`):
    at 1 MiB the 512 KiB hidden states live in the heap and its free chunks keep ~4 MiB more
    resident at the peak; at 128 KiB (glibc's own starting value, kept fixed) every such tensor is
    its own mapping, and the page faults of fresh mappings make the plain forward ~15 % slower.
    """
    return _os.set_mmap_threshold(threshold)
