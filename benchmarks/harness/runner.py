"""The parent side: each contender in a fresh child process, capped or not, and what is built on capped runs."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import cgroup
from benchmarks.harness.measure import drop_page_cache
from benchmarks.harness.paths import ENV, MIB, harness_cmd

CAP_STEP = 32 * MIB  # the resolution of the smallest-cap search
BASELINE_LIMIT = 8 * 2**30  # the allowance child's limit: far above what importing takes


def _child(spec: dict[str, Any], work: Path, name: str) -> tuple[dict[str, Any], Path, list[str]]:
    # The child's own spec (its result file, a fresh offload folder) and its command line.
    out, offload = work / f"{name}.json", work / f"offload-{name}"
    out.unlink(missing_ok=True)
    shutil.rmtree(offload, ignore_errors=True)
    offload.mkdir(parents=True)
    spec = {**spec, "out": str(out), "offload": str(offload)}
    return spec, out, harness_cmd("child", json.dumps(spec))


def spawn(spec: dict[str, Any], work: Path, name: str | None = None) -> dict[str, Any]:
    """Run one child to its end: its result and `wall_s`; SystemExit with its stderr if it failed."""
    name = name or spec["contender"]
    spec, out, cmd = _child(spec, work, name)
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    shutil.rmtree(spec["offload"], ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{name} failed ({res.returncode}):\n{res.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "wall_s": wall}


def spawn_capped(
    spec: dict[str, Any], work: Path, limit: int, timeout: float, name: str | None = None
) -> dict[str, Any]:
    """One child under a `limit`-byte cgroup limit, page cache dropped first: what it finished and how it ended."""
    spec, out, cmd = _child({**spec, "timeout": timeout}, work, f"cap-{name or spec['contender']}")
    run = cgroup.run_capped(cmd, limit, timeout, ENV)
    shutil.rmtree(spec["offload"], ignore_errors=True)
    r: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"step": "start"}
    r.update(ok=run.ok, reason=run.reason, seconds=run.seconds, max_usage=run.max_usage)
    return r


def allowance(cls: str, timeout: float = 300.0) -> tuple[int, dict[str, Any]]:
    """Memory charged to a capped child that imports what every contender imports and builds nothing."""
    run = cgroup.run_capped(harness_cmd("baseline", cls), BASELINE_LIMIT, timeout, ENV)
    if not run.ok:
        raise SystemExit(f"the allowance child failed: {run.reason} after {run.seconds:.0f} s")
    return run.max_usage, {"seconds": run.seconds, "max_usage": run.max_usage}


def smallest_cap(
    spec: dict[str, Any], work: Path, lo: int, hi: int, timeout: float, max_steps: int, name: str | None = None
) -> dict[str, Any]:
    """Binary-search the smallest cap, a multiple of CAP_STEP in (lo, hi], under which the child exits 0 in time.

    Returns the cap and the run's seconds (None if none passed), `fails`: the largest cap tried that
    failed below it, and every trial. `hi` itself is tried when no smaller cap passed.
    """
    trials: list[dict[str, Any]] = []

    def trial(cap: int) -> dict[str, Any]:
        r = spawn_capped(spec, work, cap, timeout, name)
        print(f"    cap {cap / MIB:5.0f} MiB: {r['reason']} after {r['seconds']:.1f} s", flush=True)
        return {"cap": cap, "ok": r["ok"], "reason": r["reason"], "s": r["seconds"], "max_usage": r["max_usage"]}

    while hi - lo > CAP_STEP and len(trials) < max_steps:
        mid = lo + (hi - lo) // 2 // CAP_STEP * CAP_STEP
        trials.append(trial(mid))
        lo, hi = (lo, mid) if trials[-1]["ok"] else (mid, hi)
    if not any(t["ok"] for t in trials):
        trials.append(trial(hi))
    best = min((t for t in trials if t["ok"]), key=lambda t: t["cap"], default=None)
    failed = [t["cap"] for t in trials if not t["ok"] and (best is None or t["cap"] < best["cap"])]
    return {
        "cap": best["cap"] if best else None,
        "seconds": best["s"] if best else None,
        "fails": max(failed, default=None),
        "timeout": timeout,
        "trials": trials,
    }


class Driven:
    """A child in a cgroup of its own whose limit this process moves, told what to do in lines on its stdin.

    Its result's `events` are what it reports; `until` waits for them up to a named one, within its deadline.
    """

    def __init__(self, spec: dict[str, Any], name: str, limit: int, timeout: float, work: Path):
        self.name, self.group = name, cgroup.Group(name)
        self.seen, self.last, self.failure = 0, None, None  # events taken, the one `until` waited for, why it ended
        self.deadline = time.monotonic() + timeout
        self.stderr_path = work / f"{name}.stderr"
        try:
            first = self.group.set_limit(limit)
            if "error" in first:
                raise RuntimeError(f"cannot set the {name} child's limit: {first['error']}")
            drop_page_cache()
            _, self.out, cmd = _child(spec, work, name)
            with open(self.stderr_path, "w") as stderr:  # the child holds its own copy of the descriptor
                self.proc = self.group.popen(cmd, env=ENV, stdin=subprocess.PIPE, stderr=stderr, text=True, bufsize=1)
        except BaseException:
            self.group.remove()
            raise

    def until(self, event: str) -> list[dict[str, Any]] | None:
        """The events before the next `event` (kept as `last`); None, with `failure` set, if the child ended or ran
        out of time first."""
        got: list[dict[str, Any]] = []
        while time.monotonic() < self.deadline:
            ended = self.proc.poll() is not None  # before reading: what it wrote before it ended is read
            events = json.loads(self.out.read_text()).get("events", []) if self.out.is_file() else []
            for e in events[self.seen :]:
                self.seen += 1
                if e["event"] == event:
                    self.last = e
                    return got
                got.append(e)
            if ended:
                self.failure = "ended"
                return None
            time.sleep(0.05)
        self.failure = "timeout"
        return None

    def send(self, line: str) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            self.failure = "ended"
            return False

    def close(self, codes: dict[int, str] | None = None) -> dict[str, Any]:
        """Tell the child to quit (or kill it); how it ended (`codes` names exit codes); the cgroup is removed."""
        if self.failure is None:
            self.send("quit")
        try:
            rc = self.proc.wait(timeout=30.0 if self.failure is None else 1.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
            self.failure = self.failure or "timeout"
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        kills = self.group.event("oom_kill")
        self.group.remove()
        reason = "OOM killed" if kills else (codes or {}).get(rc, f"exit {rc}")
        reason = "timeout" if self.failure == "timeout" else "ok" if rc == 0 and self.failure is None else reason
        tail = self.stderr_path.read_text()[-2000:] if reason != "ok" else ""
        return {"reason": reason, "rc": rc, "oom_kills": kills, "stderr_tail": tail}
