"""Hard memory limits for child processes: a cgroup of their own, v1 or v2, whichever holds the memory controller.

Each capped run gets a cgroup under this process's (whatever limit applies to us still applies), removed
once the child exits. The child joins it before it execs the command, so every page it allocates or
reads in is charged there. A page is charged to the cgroup that first read it, and one an earlier run
left cached is free to a capped run: so every capped run starts with the whole page cache dropped. The
limit is on RAM and swap together (v1: `memory.memsw.limit_in_bytes`; v2: `memory.swap.max` = 0). Needs
root; v2 also the memory controller in our group's `cgroup.controllers`, and `memory.peak` (Linux 5.19).
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness.measure import DROP_CACHES, drop_page_cache

# The kernel's files (v1, v2): the limit; the swap limit (v1: RAM + swap, v2: swap alone); usage now; the peak;
# the event counters (`oom_kill`; v2 also `max`, the times the limit was hit).
FILES = {
    "limit": ("memory.limit_in_bytes", "memory.max"),
    "swap": ("memory.memsw.limit_in_bytes", "memory.swap.max"),
    "usage": ("memory.usage_in_bytes", "memory.current"),
    "peak": ("memory.max_usage_in_bytes", "memory.peak"),
    "events": ("memory.oom_control", "memory.events"),
}
_JOIN = 'echo $$ > "$0" && exec "$@"'
EBUSY_ATTEMPTS = 5
EBUSY_WAIT_S = 0.5


@dataclass(frozen=True)
class Hierarchy:
    """The memory controller this process is under: the cgroup version and this process's group folder."""

    version: int
    own: Path

    @property
    def files(self) -> dict[str, str]:
        return {key: names[self.version - 1] for key, names in FILES.items()}


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _group(mount: Path, path: str) -> Path:
    # Inside a container the listed path is often the host's: the mount root is then our own group.
    folder = mount / path.strip().lstrip("/")
    return folder if folder.is_dir() else mount


def find(root: Path = Path("/")) -> Hierarchy | str:
    """This process's memory cgroup: v1 where a v1 hierarchy holds the memory controller, else v2; or why none.

    The hierarchies at their usual mounts: v1 `/sys/fs/cgroup/memory`, v2 `/sys/fs/cgroup` (or
    `/sys/fs/cgroup/unified` on a hybrid host). `root` prefixes every path read: tests point it at a fake tree.
    """
    found: Hierarchy | None = None
    for line in _read(root / "proc/self/cgroup").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        v1 = root / "sys/fs/cgroup/memory"
        if "memory" in controllers.split(",") and (_group(v1, path) / "memory.limit_in_bytes").is_file():
            return Hierarchy(1, _group(v1, path))
        for v2 in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified") if controllers == "" else ():
            if "memory" in _read(_group(v2, path) / "cgroup.controllers").split():
                found = found or Hierarchy(2, _group(v2, path))
    return found or "no memory controller: none in cgroup v1, none in our cgroup v2 group's cgroup.controllers"


def unavailable(root: Path = Path("/")) -> str | None:
    """Why capped runs cannot be made here, or None when they can."""
    hierarchy = find(root)
    if isinstance(hierarchy, str):
        return hierarchy
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    if not os.access(DROP_CACHES, os.W_OK):
        return f"cannot write {DROP_CACHES}: a cap would not bind on pages already in the page cache"
    try:
        probe = Group("probe", hierarchy)
    except OSError as e:
        return f"cannot create a cgroup under {hierarchy.own}: {e}"
    peak = (probe.folder / hierarchy.files["peak"]).is_file()
    probe.remove()
    return None if peak else f"no {hierarchy.files['peak']} in a new cgroup (cgroup v2 before Linux 5.19): no peak"


class Group:
    """A memory cgroup of our own under this process's group: its limit, its counters; a child joins it at exec.

    v2 cannot reset its peak before Linux 6.12 (a write to `memory.peak` resets it for the writer's
    descriptor): `reset_peak` then leaves the peak since the group began.
    """

    def __init__(self, name: str, hierarchy: Hierarchy | None = None):
        found = hierarchy or find()
        if isinstance(found, str):
            raise OSError(errno.ENOENT, found)
        self.version, self.files = found.version, found.files
        if self.version == 2 and "memory" not in _read(found.own / "cgroup.subtree_control").split():
            (found.own / "cgroup.subtree_control").write_text("+memory")  # EBUSY where processes sit in our group
        self.folder = found.own / f"pylomin-{name}-{os.getpid()}"
        self.folder.mkdir()
        self._peak_fd: int | None = None
        self._max0 = 0  # v2: memory.events `max` at the last reset_peak

    def number(self, key: str) -> int:
        """The number in the kernel file `key` ("limit", "usage", "peak", ...); `max` (v2, no limit) is -1."""
        if key == "peak" and self._peak_fd is not None:
            os.lseek(self._peak_fd, 0, os.SEEK_SET)
            text = os.read(self._peak_fd, 64).decode()
        else:
            text = (self.folder / self.files.get(key, key)).read_text()
        return -1 if text.strip() == "max" else int(text)

    def event(self, name: str) -> int:
        """A counter of the events file (`oom_kill`; v2's `max`, times the limit was hit)."""
        lines = (self.folder / self.files["events"]).read_text().splitlines()
        return next((int(line.split()[1]) for line in lines if line.startswith(f"{name} ")), 0)

    def counters(self) -> dict[str, int]:
        """Usage now, the peak since the last reset, the times the limit was hit since then, the OOM kills."""
        failcnt = self.number("memory.failcnt") if self.version == 1 else self.event("max") - self._max0
        usage, peak, kills = self.number("usage"), self.number("peak"), self.event("oom_kill")
        return {"usage": usage, "max_usage": peak, "failcnt": failcnt, "oom_kills": kills}

    def reset_peak(self) -> None:
        if self.version == 1:
            for name in (self.files["peak"], "memory.failcnt"):
                (self.folder / name).write_text("0")
            return
        self._max0 = self.event("max")
        try:
            if self._peak_fd is None:
                self._peak_fd = os.open(self.folder / self.files["peak"], os.O_RDWR)
            os.write(self._peak_fd, b"reset\n")
        except OSError:
            if self._peak_fd is not None:
                os.close(self._peak_fd)
            self._peak_fd = None  # before Linux 6.12: the peak since the group began

    def _write(self, key: str, value: int) -> int:
        """Write `value`; EBUSY (v1: the kernel could not reclaim down to it) retried. Returns the EBUSY count."""
        busy = 0
        while True:
            fd = os.open(self.folder / self.files[key], os.O_WRONLY | os.O_TRUNC)
            try:
                os.write(fd, str(value).encode())
                return busy
            except OSError as e:
                if e.errno != errno.EBUSY or busy + 1 >= EBUSY_ATTEMPTS:
                    raise
                busy += 1
                time.sleep(EBUSY_WAIT_S)
            finally:
                os.close(fd)

    def set_limit(self, limit: int) -> dict[str, Any]:
        """Limit RAM + swap to `limit` bytes; what it took, or `error`. v1 keeps memsw >= limit at every step."""
        keys = ["limit"]
        if self.version == 1 and (self.folder / self.files["swap"]).exists():
            old = self.number("limit")  # lowering: the limit first, then memsw; raising: memsw first
            keys = ["limit", "swap"] if limit < old else ["swap", "limit"]
        steps = [(key, limit) for key in keys]
        if self.version == 2 and (self.folder / self.files["swap"]).exists():
            steps.insert(0, ("swap", 0))  # no swapping out instead of failing
        r: dict[str, Any] = {"limit": limit, "usage_before": self.number("usage"), "ebusy": 0}
        t0 = time.perf_counter()
        try:
            for key, value in steps:
                r["ebusy"] += self._write(key, value)
        except OSError as e:
            r["error"] = f"{e.strerror} writing {self.files[key]} = {value}" + (
                f" after {EBUSY_ATTEMPTS} tries" if e.errno == errno.EBUSY else ""
            )
        r.update(seconds=time.perf_counter() - t0, usage_after=self.number("usage"), limit_now=self.number("limit"))
        return r

    def popen(self, cmd: list[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start `cmd` in this group: it joins before it execs, so all it allocates or reads in is charged here."""
        return subprocess.Popen(["sh", "-c", _JOIN, str(self.folder / "cgroup.procs"), *cmd], **kwargs)

    def remove(self, attempts: int = 50) -> None:
        if self._peak_fd is not None:
            os.close(self._peak_fd)
        self._peak_fd = None
        for _ in range(attempts):
            try:
                self.folder.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)  # tasks still exiting
        self.folder.rmdir()


@dataclass
class CappedRun:
    """How a capped run ended: `ok` if it exited 0 within its time limit."""

    ok: bool
    reason: str  # "ok", "OOM killed", "timeout", "exit N"
    seconds: float
    max_usage: int  # bytes charged to the cgroup at the peak


def run_capped(
    cmd: list[str],
    limit: int,
    timeout: float,
    env: dict[str, str] | None = None,
    *,
    drop: Callable[[], None] = drop_page_cache,
) -> CappedRun:
    """Run `cmd` with at most `limit` bytes of memory (RAM + swap) charged to it, killed after `timeout` s.

    `drop` runs first (default: the whole page cache dropped), so that whatever the command reads is charged to it.
    """
    group = Group("bench")
    proc = None
    try:
        first = group.set_limit(limit)
        if "error" in first:
            raise OSError(errno.EINVAL, f"cannot limit {group.folder}: {first['error']}")
        drop()
        t0 = time.perf_counter()
        proc = group.popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            rc = proc.wait(timeout=timeout)
            reason = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, reason = -1, "timeout"
        seconds = time.perf_counter() - t0
        if rc != 0 and reason != "timeout" and group.event("oom_kill"):
            reason = "OOM killed"
        return CappedRun(rc == 0, reason, seconds, group.number("peak"))
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        group.remove()


def own_usage() -> int:
    """Bytes charged to this process's memory cgroup now (a capped child's: its group's usage)."""
    found = find()
    if isinstance(found, str):
        raise OSError(errno.ENOENT, found)
    return int((found.own / found.files["usage"]).read_text())
