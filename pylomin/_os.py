"""The operating-system calls pylomin makes, in one place: libc through ctypes, page hints, page rounding,
and how much memory this process may use (`/proc/meminfo`, capped by every cgroup above it)."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# The C library, loaded once for the whole package. ctypes releases the GIL for the length of each
# call, so a madvise that blocks on the disk lets the other Python threads run.
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]

PAGE = mmap.PAGESIZE
MADV_RANDOM = mmap.MADV_RANDOM
MADV_DONTNEED = mmap.MADV_DONTNEED
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault pages in and map them, without touching them from Python


def page_range(offset: int, length: int, limit: int | None = None) -> tuple[int, int]:
    """The whole pages covering `[offset, offset + length)`: `(begin, end)`, end capped at `limit`."""
    begin = offset // PAGE * PAGE
    end = -(-(offset + length) // PAGE) * PAGE
    return begin, end if limit is None else min(end, limit)


def inner_page_range(offset: int, length: int, limit: int) -> tuple[int, int]:
    """The whole pages inside `[offset, offset + length)`: `(begin, end)`; a range ending at `limit` keeps its last page."""
    begin = -(-offset // PAGE) * PAGE
    end = limit if offset + length >= limit else (offset + length) // PAGE * PAGE
    return begin, max(begin, end)


def madvise(address: int, length: int, advice: int) -> int:
    """`madvise(2)` on `[address, address + length)`, widened to whole pages; returns 0 or the errno."""
    begin, end = page_range(address, length)
    if libc.madvise(begin, end - begin, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def all_cached(address: int, length: int) -> bool:
    """Whether every page of `[address, address + length)` of a file mapping is in the page cache (`mincore(2)`:
    ~10 us for 21 MiB); True where the kernel cannot say, so a caller then reads nothing it would not have."""
    begin, end = page_range(address, length)
    vec = (ctypes.c_ubyte * ((end - begin) // PAGE))()
    if libc.mincore(begin, end - begin, vec) != 0:
        return True
    return all(b & 1 for b in bytes(vec))


def drop_file_pages(address: int, length: int) -> None:
    """Unmap the pages of `[address, address + length)` from this process (MADV_DONTNEED).

    Only for a private file mapping this process never wrote to: a later access reads the file
    again. On any other memory (the heap, a copy) this would zero live bytes, so callers pass
    addresses inside such a mapping only.
    """
    if length > 0:
        madvise(address, length, MADV_DONTNEED)


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


def trim_freed_memory() -> bool:
    """Return the free pages of the C heap to the kernel now (glibc `malloc_trim(0)`).

    Freed blocks below the mmap threshold stay in malloc's heaps and keep counting as resident;
    after dropping a model's parameters this gives back whole free pages among them (a default
    glibc process: 11.8 -> 6.4 MiB above baseline after `lazy_loading` on the 1.6 GiB BERT).
    Returns False where glibc is not the C library.
    """
    try:
        libc.malloc_trim(0)
        return True
    except AttributeError:
        return False


def set_mmap_threshold(threshold: int) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD)`: allocations of `threshold` bytes or more get their own mapping."""
    try:
        return bool(libc.mallopt(-3, threshold))
    except AttributeError:
        return False


# --- how much memory this process may use --------------------------------------------------------

# cgroup v1 writes "no limit" as LONG_MAX rounded down to a page (9223372036854771712); no machine
# has 2**60 bytes, so anything at least that large is no limit, in v1 and v2 alike.
_UNLIMITED = 2**60


@dataclass(frozen=True)
class Memory:
    """What this process may still bring into memory and the most it may use, in bytes.

    `available` counts reclaimable page cache (our own mapped weights included) as available;
    `source` names the figure that gave the smallest `available`, for logs.
    """

    available: int
    limit: int
    source: str


def read_memory(root: str | os.PathLike[str] = "/") -> Memory:
    """Read the memory this process may use now: `/proc/meminfo` and each cgroup on its path, the smallest binding.

    Cheap enough to call every second (a few small file reads, no subprocess); never raises:
    files that are missing or malformed are skipped (logged at DEBUG).

    Args:
        root: prefix of every path read (`/proc/self/cgroup`, `/proc/meminfo`, `/sys/fs/cgroup`);
            tests point it at a fake tree.

    Returns:
        `Memory`: `available` is the smallest of MemAvailable and, for each cgroup with a limit (the
        process's own and every ancestor), limit - usage + its reclaimable file pages, clamped to
        `[0, limit]`; `limit` is the smallest of MemTotal and those limits.

    >>> m = read_memory()
    >>> m.available <= m.limit
    True
    """
    base = Path(root)
    best = _machine(base)
    limit = best.limit
    for group in _cgroups(base):
        limit = min(limit, group.limit)
        if group.available < best.available:
            best = group
    return Memory(available=max(0, min(best.available, limit)), limit=limit, source=best.source)


def _read(path: Path) -> str | None:
    # Every figure comes from a small kernel file that may be absent (no controller, no /proc): None, not an error.
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        logger.debug("cannot read `%s`: %s", path, e)
        return None


def _int(text: str | None, path: Path) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        logger.debug("`%s` is not an integer: %r", path, text[:80])
        return None


def _fields(text: str) -> dict[str, int]:
    """`key value [kB]` lines (/proc/meminfo, memory.stat) -> bytes by key; malformed lines are skipped."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        try:
            value = int(parts[1])
        except ValueError:
            continue
        out[parts[0].rstrip(":")] = value * 1024 if parts[2:3] == ["kB"] else value
    return out


def _machine(root: Path) -> Memory:
    # The whole machine's figure, the starting point every cgroup can only lower.
    text = _read(root / "proc/meminfo")
    info = _fields(text) if text is not None else {}
    if "MemAvailable" in info and "MemTotal" in info:
        return Memory(info["MemAvailable"], info["MemTotal"], "/proc/meminfo MemAvailable")
    if text is not None:
        logger.debug("no MemAvailable or MemTotal in `%s`", root / "proc/meminfo")
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return Memory(sys.maxsize, sys.maxsize, "unknown (no /proc/meminfo, no sysconf)")
    return Memory(total, total, "os.sysconf SC_PHYS_PAGES (no usable /proc/meminfo)")


def _cgroups(root: Path) -> Iterator[Memory]:
    """Each cgroup with a memory limit on this process's path, v2 and v1 (hybrid hosts list both)."""
    text = _read(root / "proc/self/cgroup")
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            for d in _ancestors(root, "sys/fs/cgroup", path):
                yield from _v2(root, d)
        elif "memory" in controllers.split(","):
            for d in _ancestors(root, "sys/fs/cgroup/memory", path):
                yield from _v1(root, d)


def _ancestors(root: Path, mount: str, path: str) -> list[Path]:
    """The group's directory and each parent up to the mount root; the root alone if the directory is not there.

    Inside a container the listed path is often the host's (or `/` under a cgroup namespace) and the
    mount root is the container's own group.
    """
    parts = [p for p in path.strip().split("/") if p]
    top = root / mount
    if not parts or ".." in parts or not top.joinpath(*parts).is_dir():
        return [top]
    return [top.joinpath(*parts[:i]) for i in range(len(parts), -1, -1)]


def _v2(root: Path, group: Path) -> Iterator[Memory]:
    text = _read(group / "memory.max")
    if text is None or text.strip() == "max":
        return
    limit = _int(text, group / "memory.max")
    current = _int(_read(group / "memory.current"), group / "memory.current")
    if limit is None or current is None or limit >= _UNLIMITED:
        return
    stat = _fields(_read(group / "memory.stat") or "")
    reclaimable = stat.get("active_file", 0) + stat.get("inactive_file", 0)
    yield Memory(limit - current + reclaimable, limit, f"cgroup v2 {_shown(root, group)}: memory.max {_gib(limit)}")


def _v1(root: Path, group: Path) -> Iterator[Memory]:
    limit = _int(_read(group / "memory.limit_in_bytes"), group / "memory.limit_in_bytes")
    if limit is None or limit >= _UNLIMITED:
        return
    usage = _int(_read(group / "memory.usage_in_bytes"), group / "memory.usage_in_bytes")
    if usage is None:
        return
    # usage_in_bytes counts the whole subtree (use_hierarchy=1), and so do the total_* figures;
    # the plain ones are this group's own, the best there is where total_* are missing.
    stat = _fields(_read(group / "memory.stat") or "")
    reclaimable = stat.get("total_active_file", stat.get("active_file", 0)) + stat.get(
        "total_inactive_file", stat.get("inactive_file", 0)
    )
    source = f"cgroup v1 {_shown(root, group)}: memory.limit_in_bytes {_gib(limit)}"
    yield Memory(limit - usage + reclaimable, limit, source)


def _shown(root: Path, path: Path) -> str:
    # Logs name the path as the kernel shows it, without the test tree's prefix.
    return "/" + path.relative_to(root).as_posix()


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"
