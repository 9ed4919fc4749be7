"""How much memory this process may use: the machine's figure from /proc/meminfo, capped by every cgroup above it."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

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
