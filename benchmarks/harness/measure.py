"""What the benchmarks measure with: bytes read from disk, a clock per generated token, and the page cache."""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.harness.paths import MIB

DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def read_bytes() -> int:
    """Bytes this process (all its threads) had the block layer fetch from storage so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache; written back first, as dirty pages would stay."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def drop_page_cache() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches` (root): dirty pages written back, then every clean cached page dropped."""
    os.sync()
    DROP_CACHES.write_text("3")


def cached_bytes(paths: list[Path]) -> int | None:
    """Bytes of `paths` in the page cache now (util-linux `fincore`): what an evict could not drop; None without it."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "-bno", "RES", *map(str, paths)], capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split())


def cold_read_bandwidth(paths: list[Path], repeats: int = 3) -> float:
    """Bytes/second of a cold sequential read of `paths` with 16 MiB `readinto`; median of `repeats`."""
    buf = memoryview(bytearray(16 * MIB))
    rates = []
    for _ in range(repeats):
        evict(paths)
        total = 0
        t0 = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        rates.append(total / (time.perf_counter() - t0))
    evict(paths)
    return statistics.median(rates)


def peak_above(window: Any, base: Any) -> dict[str, int]:
    """The peak of a `peak_rss` window above `base`, an RSS taken before it: total, anon and file bytes."""
    start = window.start - base
    return {"total": start.total + window.total, "anon": start.anon + window.anon, "file": start.file + window.file}


class TokenClock:
    """A `generate(streamer=...)` streamer: the time, `read_bytes` and tokens (per sequence) of every `put`.

    The first put is the prompt. Plain decoding puts one token per sequence at a time (a 1-D tensor of
    the batch's tokens); assisted decoding puts each verify pass's accepted tokens at once (`[1, n]`).
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.reads: list[int] = []
        self.counts: list[int] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.reads.append(read_bytes())
        self.counts.append(int(value.shape[-1]) if value.dim() == 2 else 1)

    def end(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Prefill seconds, decode tokens/s (per sequence) and mean bytes read per decode token: the tokens
        after the first put of new ones."""
        t, r, n = self.times, self.reads, self.counts
        decode = sum(n[2:])  # puts: the prompt, the first new token(s), then the decode tokens
        return {
            "prefill_s": t[1] - t[0],
            "decode_tps": decode / (t[-1] - t[1]),
            "read_per_token": (r[-1] - r[1]) / decode if decode else 0.0,
            "token_s": [b - a for a, b in zip(t, t[1:], strict=False)],
            "token_read": [b - a for a, b in zip(r, r[1:], strict=False)],
            "put_tokens": n[1:],
        }
