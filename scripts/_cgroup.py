"""Hard memory caps for child processes with the cgroup v1 memory controller (needs root).

Each capped run gets its own cgroup, created under this process's memory cgroup (so whatever limit
already applies to us still applies to the child), removed once the child has exited. The child
joins the cgroup itself before it execs the command (`sh -c 'echo $$ > cgroup.procs; exec ...'`),
so every page it allocates or reads in is charged there. A page is charged to the cgroup that first
read it, and one that an earlier run left in the page cache is free to a capped run: so every capped
run starts with the whole page cache dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`), the
interpreter's and the libraries' files included, not only the model's.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

MOUNT = Path("/sys/fs/cgroup/memory")
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
_JOIN = 'echo $$ > "$0" && exec "$@"'


def _own_cgroup() -> Path:
    """This process's memory cgroup folder, or the mount root when it cannot be found under the mount."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if "memory" in controllers.split(","):
                folder = MOUNT / path.lstrip("/")
                if folder.is_dir():
                    return folder
    except OSError:
        pass
    return MOUNT


def unavailable() -> str | None:
    """Why capped runs cannot be made here, or None when they can."""
    if not (MOUNT / "memory.limit_in_bytes").is_file():
        return f"no cgroup v1 memory controller at {MOUNT}"
    if os.geteuid() != 0:
        return "creating cgroups needs root"
    if not os.access(DROP_CACHES, os.W_OK):
        return f"cannot write {DROP_CACHES}: a cap would not bind on pages already in the page cache"
    probe = _own_cgroup() / f"pylomin-bench-{os.getpid()}-probe"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as e:
        return f"cannot create a cgroup under {probe.parent}: {e}"
    return None


@dataclass
class CappedRun:
    """How a capped run ended: `ok` if it exited 0 within its time limit."""

    ok: bool
    reason: str  # "ok", "OOM killed", "timeout", "exit N"
    seconds: float
    max_usage: int  # bytes charged to the cgroup at the peak


def _drop_page_cache() -> None:
    """`sync; echo 3 > /proc/sys/vm/drop_caches`: dirty pages written back, then every clean cached page dropped."""
    os.sync()
    DROP_CACHES.write_text("3")


def _remove(folder: Path, attempts: int = 50) -> None:
    for _ in range(attempts):
        try:
            folder.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.1)  # tasks still exiting
    folder.rmdir()


def run_capped(cmd: list[str], limit: int, timeout: float, env: dict[str, str] | None = None) -> CappedRun:
    """Run `cmd` with at most `limit` bytes of memory (RAM + swap) charged to it, killed after `timeout` s.

    The page cache is dropped first, so that whatever the command reads is charged to it.
    """
    folder = _own_cgroup() / f"pylomin-bench-{os.getpid()}"
    folder.mkdir()
    proc = None
    try:
        (folder / "memory.limit_in_bytes").write_text(str(limit))
        memsw = folder / "memory.memsw.limit_in_bytes"
        if memsw.exists():  # no swapping out instead of failing
            memsw.write_text(str(limit))
        _drop_page_cache()
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            ["sh", "-c", _JOIN, str(folder / "cgroup.procs"), *cmd],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            rc = proc.wait(timeout=timeout)
            reason = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc, reason = -1, "timeout"
        seconds = time.perf_counter() - t0
        oom = (folder / "memory.oom_control").read_text().splitlines()
        kills = next((int(line.split()[1]) for line in oom if line.startswith("oom_kill ")), 0)
        if rc != 0 and reason != "timeout" and kills:
            reason = "OOM killed"
        max_usage = int((folder / "memory.max_usage_in_bytes").read_text())
        return CappedRun(rc == 0, reason, seconds, max_usage)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        _remove(folder)
