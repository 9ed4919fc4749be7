"""The harness without a model: cgroup v1 / v2 on fake trees (and v1 for real where root), a killed child's result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.harness import cgroup, runner
from benchmarks.harness.child import Child
from benchmarks.harness.paths import ENV, MIB, harness_cmd

V1 = {"memory.limit_in_bytes": str(2**63 - 4096)}  # a v1 memory group's file


def tree(root: Path, cgroups: str, folders: dict[str, dict[str, str]]) -> Path:
    """A fake /proc/self/cgroup and /sys/fs/cgroup under `root`: `folders` maps a group folder to its files."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/self/cgroup").write_text(cgroups)
    for folder, files in folders.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for name, text in {"cgroup.subtree_control": "", **files}.items():
            (root / folder / name).write_text(text)
    return root


def test_v1_is_found_on_a_hybrid_host(tmp_path: Path) -> None:
    cgroups = "4:memory:/user/bench\n3:cpu,cpuacct:/\n0::/\n"
    folders = {"sys/fs/cgroup/memory/user/bench": V1, "sys/fs/cgroup/unified": {"cgroup.controllers": "hugetlb"}}
    root = tree(tmp_path, cgroups, folders)
    assert cgroup.find(root) == cgroup.Hierarchy(1, root / "sys/fs/cgroup/memory/user/bench")
    assert cgroup.find(root).files["peak"] == "memory.max_usage_in_bytes"  # type: ignore[union-attr]


def test_v2_is_found_where_the_group_has_the_memory_controller(tmp_path: Path) -> None:
    controllers = {"cgroup.controllers": "cpu io memory pids"}
    root = tree(tmp_path, "0::/user.slice/bench\n", {"sys/fs/cgroup/user.slice/bench": controllers})
    found = cgroup.find(root)
    assert found == cgroup.Hierarchy(2, root / "sys/fs/cgroup/user.slice/bench")
    assert isinstance(found, cgroup.Hierarchy) and found.files["limit"] == "memory.max"


def test_no_memory_controller_says_why(tmp_path: Path) -> None:
    # This machine's unified hierarchy without its v1 memory mount: cgroup2 with no memory controller.
    root = tree(tmp_path, "0::/\n", {"sys/fs/cgroup/unified": {"cgroup.controllers": "hugetlb"}})
    assert cgroup.find(root).startswith("no memory controller")  # type: ignore[union-attr]
    assert cgroup.unavailable(root).startswith("no memory controller")  # type: ignore[union-attr]


def test_a_path_from_outside_the_namespace_falls_back_to_the_mount_root(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/host/path/we/cannot/see\n", {"sys/fs/cgroup": {"cgroup.controllers": "memory"}})
    assert cgroup.find(root) == cgroup.Hierarchy(2, root / "sys/fs/cgroup")


def test_a_v2_group_writes_the_v2_files(tmp_path: Path) -> None:
    root = tree(tmp_path, "0::/bench\n", {"sys/fs/cgroup/bench": {"cgroup.controllers": "memory"}})
    found = cgroup.find(root)
    assert isinstance(found, cgroup.Hierarchy)
    group = cgroup.Group("test", found)
    assert (found.own / "cgroup.subtree_control").read_text() == "+memory"  # delegated to the child groups
    kernel = {"memory.max": "max\n", "memory.swap.max": "max\n", "memory.current": "1000\n", "memory.peak": "5000\n"}
    kernel["memory.events"] = "low 0\nhigh 0\nmax 7\noom 1\noom_kill 1\n"
    for name, text in kernel.items():
        (group.folder / name).write_text(text)
    r = group.set_limit(64 * MIB)
    assert "error" not in r and r["limit_now"] == 64 * MIB and r["usage_before"] == 1000
    assert (group.folder / "memory.swap.max").read_text() == "0"  # RAM + swap: no swap at all
    assert group.counters() == {"usage": 1000, "max_usage": 5000, "failcnt": 7, "oom_kills": 1}
    group.reset_peak()  # (a regular file takes the write; the kernel resets the peak for this descriptor)
    (group.folder / "memory.peak").write_text("2000\n")
    (group.folder / "memory.events").write_text("max 9\noom_kill 1\n")
    assert group.counters() == {"usage": 1000, "max_usage": 2000, "failcnt": 2, "oom_kills": 1}
    for path in group.folder.iterdir():  # the kernel's files go with the group; a fake tree's must go first
        path.unlink()
    group.remove()
    assert not group.folder.exists()


def test_a_v1_group_keeps_memsw_at_or_above_the_limit(tmp_path: Path) -> None:
    root = tree(tmp_path, "4:memory:/\n", {"sys/fs/cgroup/memory": V1})
    found = cgroup.find(root)
    assert isinstance(found, cgroup.Hierarchy)
    group = cgroup.Group("test", found)
    unlimited = str(2**63 - 4096)
    for name in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
        (group.folder / name).write_text(unlimited)
    (group.folder / "memory.usage_in_bytes").write_text("0")
    written = []
    real = group._write
    group._write = lambda key, value: written.append(key) or real(key, value)  # type: ignore[method-assign]
    group.set_limit(100 * MIB)  # lowering: the limit first
    group.set_limit(200 * MIB)  # raising: memsw first
    assert written == ["limit", "swap", "swap", "limit"]
    assert (group.folder / "memory.memsw.limit_in_bytes").read_text() == str(200 * MIB)


def test_a_capped_run_on_this_machine(tmp_path: Path) -> None:
    if (why := cgroup.unavailable()) is not None:
        pytest.skip(why)
    grow = [sys.executable, "-c", "b = bytearray(200 * 2**20); b[::4096] = b'1' * len(b[::4096])"]
    keep = lambda: None  # noqa: E731  (the limit, not the page cache, is under test: nothing dropped)
    ok = cgroup.run_capped(grow, 512 * MIB, 60, drop=keep)
    assert ok.ok and ok.reason == "ok" and 200 * MIB < ok.max_usage <= 512 * MIB
    killed = cgroup.run_capped(grow, 128 * MIB, 60, drop=keep)
    assert not killed.ok and killed.reason == "OOM killed" and killed.max_usage <= 128 * MIB


def test_a_killed_child_reports_the_phases_it_finished(tmp_path: Path) -> None:
    out = tmp_path / "child.json"
    spec = {"contender": "memory", "cls": "BertModel", "src": str(tmp_path), "out": str(out)}
    spec.update(offload=str(tmp_path / "offload"), measure="benchmarks.tests.test_harness:two_phases")
    proc = subprocess.Popen(harness_cmd("child", json.dumps(spec)), env=ENV, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.is_file() or json.loads(out.read_text())["step"] != "second"):
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:] if proc.stderr else ""
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = json.loads(out.read_text())
    assert r["step"] == "second" and r["first"] == 1 and "second" not in r


def two_phases(child: Child) -> None:
    """The measure of the test above: a phase that finishes, then one that waits to be killed."""
    with child.phase("first") as r:
        r["first"] = 1
    with child.phase("second") as r:
        time.sleep(600)
        r["second"] = 2


def test_smallest_cap_bisects_to_the_cap_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake(spec: dict, work: Path, cap: int, timeout: float, name: str | None = None) -> dict:
        return {"ok": cap >= 300 * MIB, "reason": "ok" if cap >= 300 * MIB else "OOM killed", "seconds": 1.0}

    monkeypatch.setattr(runner, "spawn_capped", lambda *a, **k: {**fake(*a, **k), "max_usage": a[2]})
    r = runner.smallest_cap({}, tmp_path, 128 * MIB, 1024 * MIB, 60, max_steps=10)
    assert r["cap"] == 320 * MIB and r["fails"] == 288 * MIB  # 32 MiB steps: the first multiple at or above 300
