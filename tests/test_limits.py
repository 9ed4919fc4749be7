"""read_memory on fake /proc and /sys/fs/cgroup trees built from real files, and once on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pylomin._os import Memory, read_memory

MiB, GiB = 2**20, 2**30
MEMINFO = "MemTotal:       16777216 kB\nMemFree:         1048576 kB\nMemAvailable:    8388608 kB\nBuffers:  12 kB\n"
MACHINE = Memory(available=8 * GiB, limit=16 * GiB, source="/proc/meminfo MemAvailable")
V1_NO_LIMIT = str(9223372036854771712)  # what the kernel writes in memory.limit_in_bytes


def tree(root: Path, files: dict[str, str | int | bytes]) -> Path:
    """Write `files` (path under root -> contents, bytes as they are) and return root."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else f"{text}\n".encode())
    return root


def v2(group: str, limit: str | int, current: int, active: int = 0, inactive: int = 0) -> dict[str, str | int | bytes]:
    d = f"sys/fs/cgroup/{group}".rstrip("/")
    stat = f"anon 0\nfile {active + inactive}\nactive_file {active}\ninactive_file {inactive}"
    return {f"{d}/memory.max": limit, f"{d}/memory.current": current, f"{d}/memory.stat": stat}


def v1(group: str, limit: str | int, usage: int, stat: str = "cache 0") -> dict[str, str | int | bytes]:
    d = f"sys/fs/cgroup/memory/{group}".rstrip("/")
    return {f"{d}/memory.limit_in_bytes": limit, f"{d}/memory.usage_in_bytes": usage, f"{d}/memory.stat": stat}


def test_meminfo_only(tmp_path: Path) -> None:
    assert read_memory(tree(tmp_path, {"proc/meminfo": MEMINFO})) == MACHINE


def test_v2_limit(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/user.slice/x", **v2("user.slice/x", GiB, 600 * MiB)},
    )
    assert read_memory(root) == Memory(424 * MiB, GiB, "cgroup v2 /sys/fs/cgroup/user.slice/x: memory.max 1.0 GiB")


def test_v2_parent_limit_binds_when_leaf_has_none(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "0::/user.slice/x",
        **v2("user.slice/x", "max", 100 * MiB),
        **v2("user.slice", 2 * GiB, 1536 * MiB),
        "sys/fs/cgroup/cgroup.procs": "1",  # the real root group has no memory.max
    }
    assert read_memory(tree(tmp_path, files)) == Memory(
        512 * MiB, 2 * GiB, "cgroup v2 /sys/fs/cgroup/user.slice: memory.max 2.0 GiB"
    )


def test_v2_smallest_available_binds_and_smallest_limit_is_the_limit(tmp_path: Path) -> None:
    # The leaf has the larger limit but less room; the parent has the smaller limit.
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "0::/a/b",
        **v2("a/b", 3 * GiB, 2816 * MiB),
        **v2("a", 2 * GiB, 1 * GiB),
    }
    assert read_memory(tree(tmp_path, files)) == Memory(
        256 * MiB, 2 * GiB, "cgroup v2 /sys/fs/cgroup/a/b: memory.max 3.0 GiB"
    )


def test_v2_page_cache_counts_as_available(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "0::/x",
        **v2("x", GiB, GiB, active=300 * MiB, inactive=100 * MiB),
    }
    assert read_memory(tree(tmp_path, files)).available == 400 * MiB


def test_v1_limit_prefers_hierarchical_file_pages(tmp_path: Path) -> None:
    stat = f"active_file 0\ninactive_file 0\ntotal_active_file {256 * MiB}\ntotal_inactive_file {128 * MiB}"
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "9:name=systemd:/\n4:memory:/process_api/abc\n0::/",
        **v1("process_api/abc", 2 * GiB, GiB, stat),
        **v1("process_api", V1_NO_LIMIT, GiB),
        **v1("", V1_NO_LIMIT, 5 * GiB),
    }
    assert read_memory(tree(tmp_path, files)) == Memory(
        1408 * MiB, 2 * GiB, "cgroup v1 /sys/fs/cgroup/memory/process_api/abc: memory.limit_in_bytes 2.0 GiB"
    )


def test_v1_falls_back_to_own_file_pages(tmp_path: Path) -> None:
    stat = f"active_file {64 * MiB}\ninactive_file {64 * MiB}"
    files = {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/x", **v1("x", GiB, GiB, stat)}
    assert read_memory(tree(tmp_path, files)).available == 128 * MiB


def test_v1_parent_limit_binds(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "4:memory:/a/b",
        **v1("a/b", V1_NO_LIMIT, 10 * MiB),
        **v1("a", GiB, 768 * MiB),
    }
    assert read_memory(tree(tmp_path, files)) == Memory(
        256 * MiB, GiB, "cgroup v1 /sys/fs/cgroup/memory/a: memory.limit_in_bytes 1.0 GiB"
    )


def test_v1_no_limit(tmp_path: Path) -> None:
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "4:memory:/x",
        **v1("x", V1_NO_LIMIT, 20 * GiB),
        **v1("", V1_NO_LIMIT, 20 * GiB),
    }
    assert read_memory(tree(tmp_path, files)) == MACHINE


def test_v1_combined_controllers(tmp_path: Path) -> None:
    # Only the line naming `memory` counts: the cpu line's path has a tiny limit under the memory mount.
    files = {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "3:cpu,cpuacct:/decoy\n2:memoryless:/decoy\n4:cpu,memory:/x",
        **v1("x", GiB, 512 * MiB),
        **v1("decoy", MiB, 0),
    }
    assert read_memory(tree(tmp_path, files)) == Memory(
        512 * MiB, GiB, "cgroup v1 /sys/fs/cgroup/memory/x: memory.limit_in_bytes 1.0 GiB"
    )


@pytest.mark.parametrize(
    ("line", "files", "source"),
    [
        (
            "0::/host/path/gone",
            {**v2("", GiB, 256 * MiB), **v2("host", MiB, 0)},
            "cgroup v2 /sys/fs/cgroup: memory.max 1.0 GiB",
        ),
        (
            "4:memory:/docker/abc",
            {**v1("", GiB, 256 * MiB), **v1("docker", MiB, 0)},
            "cgroup v1 /sys/fs/cgroup/memory: memory.limit_in_bytes 1.0 GiB",
        ),
    ],
    ids=["v2", "v1"],
)
def test_missing_group_directory_uses_mount_root(
    tmp_path: Path, line: str, files: dict[str, str | int | bytes], source: str
) -> None:
    # A directory part-way down the listed path (a host group of the same name) is not ours: it must not count.
    root = tree(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/cgroup": line, **files})
    assert read_memory(root) == Memory(768 * MiB, GiB, source)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"proc/self/cgroup": "garbage\n\n0::/x", **v2("x", "lots", 0)}, MACHINE),
        ({"proc/self/cgroup": "0::/x", **v2("x", GiB, 0), "sys/fs/cgroup/x/memory.current": ""}, MACHINE),
        ({"proc/self/cgroup": "4:memory:/x", **v1("x", "-", 0)}, MACHINE),
        ({"proc/self/cgroup": b"0::/x\xff\xfe\n", **v2("", GiB, 0)}, MACHINE),
        # A malformed stat line is skipped, the rest still counts.
        (
            {
                "proc/self/cgroup": "0::/x",
                **v2("x", GiB, GiB),
                "sys/fs/cgroup/x/memory.stat": "active_file x\ninactive_file 5\nbad",
            },
            Memory(5, GiB, "cgroup v2 /sys/fs/cgroup/x: memory.max 1.0 GiB"),
        ),
        # No memory.stat at all: no file pages are counted as reclaimable.
        (
            {"proc/self/cgroup": "0::/x", "sys/fs/cgroup/x/memory.max": GiB, "sys/fs/cgroup/x/memory.current": 0},
            Memory(GiB, GiB, "cgroup v2 /sys/fs/cgroup/x: memory.max 1.0 GiB"),
        ),
        ({"proc/meminfo": "MemTotal: 16777216 kB\nMemTotal\nMemAvailable: many kB\nMemAvailable: 8388608 kB"}, MACHINE),
    ],
    ids=[
        "v2-max-not-a-number",
        "v2-current-empty",
        "v1-limit-not-a-number",
        "cgroup-file-binary",
        "stat-bad-line",
        "no-stat",
        "meminfo-bad-lines",
    ],
)
def test_malformed_files_are_skipped(tmp_path: Path, files: dict[str, str | int | bytes], expected: Memory) -> None:
    assert read_memory(tree(tmp_path, {"proc/meminfo": MEMINFO, **files})) == expected


def test_usage_over_limit_clamps_at_zero(tmp_path: Path) -> None:
    # v1 usage can run past the limit for a moment while the kernel reclaims.
    files = {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/x", **v1("x", GiB, GiB + 4096)}
    assert read_memory(tree(tmp_path, files)) == Memory(
        0, GiB, "cgroup v1 /sys/fs/cgroup/memory/x: memory.limit_in_bytes 1.0 GiB"
    )


def test_no_meminfo_uses_physical_pages(tmp_path: Path) -> None:
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    machine = read_memory(tmp_path)
    assert machine == Memory(physical, physical, "os.sysconf SC_PHYS_PAGES (no usable /proc/meminfo)")
    # A cgroup still binds on top of it.
    limited = read_memory(tree(tmp_path, {"proc/self/cgroup": "0::/x", **v2("x", GiB, 0)}))
    assert limited == Memory(GiB, GiB, "cgroup v2 /sys/fs/cgroup/x: memory.max 1.0 GiB")


def test_this_machine() -> None:
    m = read_memory()
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < m.available <= m.limit <= physical, m
    assert isinstance(m.source, str) and m.source, m
