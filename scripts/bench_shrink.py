"""The memory limit lowered mid-run: does pylomin's default follow it, without an OOM kill, and come back?

Model: the random-weight Llama of `scripts/bench_ladder.py` (hidden 1024, 24 layers, vocab 32000;
~1.5 GB fp32; built and converted into block units on first use), loaded with
`pylomin.load_streaming(folder, LlamaForCausalLM)` and no options (`memory_budget="auto"`).

One child process in a cgroup of its own (cgroup v1, RAM + swap, page cache charged; the whole page
cache dropped before it starts; root only, see `scripts/_cgroup.py`) loads the model and then runs
batch-1 x 128-token forwards of one fixed input when told to, phase by phase. Between phases this
process writes the cgroup's limit from outside, with the child alive and the model loaded:

1. `high`: limit = allowance + 150 % of the model's bytes: 4 forwards (the model fits);
2. `low`:  lowered to allowance + 40 %: 6 forwards (the kernel reclaims at the write; pylomin
   re-reads the figure before the next forward and gives resident units back);
3. `back`: raised to allowance + 150 % again: 6 forwards (pylomin takes the units back).

The allowance is `bench_ladder`'s: what a capped child that imports torch, transformers, accelerate
and pylomin and builds nothing is charged. A v1 limit below the group's usage makes the kernel reclaim
at the write, and the write fails with EBUSY when it cannot: retried a few times, reported.
`memory.memsw.limit_in_bytes` must stay at or above `memory.limit_in_bytes`, so a lower limit is
written before memsw and a higher one after it.

pylomin re-reads the memory figure in a forward pre-hook at most once a second: before each phase the
child waits until a second has passed since its last forward began, so that the phase's first
forward re-reads it (the full model's forwards take longer than that anyway; the `--quick` model's
take milliseconds).

Then a fresh child in a fresh cgroup at allowance + 40 % from the start (page cache dropped): 6
forwards, its steady state the median of the last 4.

Every forward reports its time, the bytes pylomin keeps resident (`plan.resident_bytes`) and its
`memory_note`, and the cgroup's usage; its logits must be bit-identical to the first forward's (the
child exits 3 if not). Per phase: the cgroup's peak (`memory.max_usage_in_bytes`, reset at each
phase), `failcnt` (times the limit was hit) and the OOM kills (`memory.oom_control` `oom_kill`).

Targets (the issue's): no OOM kill and no error; from the 2nd forward after lowering, median forward
time within 1.2x of the fresh child's at 40 %; after raising back, the speed of before lowering.

Prints a table and writes `bench-out/bench_shrink.json`. `--quick` swaps in bench_ladder's 4-layer
28 MiB Llama (a smoke test: its percentages are a few MiB, inside the allowance's own variation).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_shrink.py [--quick] [--high 150]
        [--low 40] [--timeout 900]
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import queue
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cgroup  # noqa: E402
import bench_ladder  # noqa: E402
from _common import ENV, MIB, MODELS, ROOT, ensure_converted  # noqa: E402

OUT = ROOT / "bench-out"
SEQ = bench_ladder.SEQ  # the forward's tokens
PHASES = (("high", 4), ("low", 6), ("back", 6))  # (name, forwards); high and back at --high, low at --low
FRESH_FORWARDS = 6
STEADY = 4  # the fresh child's steady state: the median of its last 4 forwards
TARGET = 1.2  # after lowering vs fresh at the low limit
EBUSY_ATTEMPTS = 5
EBUSY_WAIT_S = 0.5


# --- the child ----------------------------------------------------------------------------------------


def own_usage() -> int:
    """Bytes charged to this process's memory cgroup now."""
    return int((_cgroup._own_cgroup() / "memory.usage_in_bytes").read_text())


def child(spec: dict[str, Any]) -> int:
    """Load with the defaults, then run the forwards each stdin line asks for (`run PHASE N`), until `quit`.

    One JSON line on stdout per event: `loaded`, each `forward`, `phase done`. Exit 3 when a
    forward's logits differ from the first's, 4 when stdin closes without `quit`.
    """
    import torch
    import transformers

    import pylomin
    from pylomin.adapt import RECHECK_S
    from pylomin.limits import read_memory
    from pylomin.streaming import stream_of

    transformers.logging.set_verbosity_error()

    def emit(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    x = torch.randint(0, spec["vocab"], (1, SEQ), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model = pylomin.load_streaming(spec["folder"], transformers.LlamaForCausalLM)
    manager = stream_of(model).manager
    emit(
        event="loaded",
        load_s=time.perf_counter() - t0,
        resident=manager.plan.resident_bytes,
        note=manager.memory_note,
        usage=own_usage(),
    )
    first: str | None = None
    index = 0
    began = time.monotonic()  # when the last forward began: pylomin re-reads memory at most once a second
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "quit":
            return 0
        phase, n = words[1], int(words[2])
        wait = RECHECK_S + 0.05 - (time.monotonic() - began)
        if wait > 0:
            time.sleep(wait)  # so that the phase's first forward re-reads the memory figure
        for k in range(n):
            began = time.monotonic()
            t = time.perf_counter()
            with torch.no_grad():
                logits = model(x, use_cache=False).logits
            seconds = time.perf_counter() - t
            digest = hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()
            del logits
            first = first or digest
            memory = read_memory()
            emit(
                event="forward",
                phase=phase,
                i=index,
                k=k,
                seconds=seconds,
                resident=manager.plan.resident_bytes,
                note=manager.memory_note,
                usage=own_usage(),
                available=memory.available,
                limit_seen=memory.limit,
                same=digest == first,
            )
            index += 1
            if digest != first:
                print(f"forward {index - 1} ({phase} {k}): logits differ from the first forward's", file=sys.stderr)
                return 3
        emit(event="phase done", phase=phase)
    return 4


# --- the cgroup, kept under control -------------------------------------------------------------------


class Group:
    """A memory cgroup of our own whose limit this process moves while a child runs in it."""

    def __init__(self, name: str):
        self.folder = _cgroup._own_cgroup() / f"pylomin-shrink-{os.getpid()}-{name}"
        self.folder.mkdir()
        self.memsw = (self.folder / "memory.memsw.limit_in_bytes").exists()

    def read(self, name: str) -> str:
        return (self.folder / name).read_text()

    def number(self, name: str) -> int:
        return int(self.read(name))

    def oom_kills(self) -> int:
        lines = self.read("memory.oom_control").splitlines()
        return next((int(line.split()[1]) for line in lines if line.startswith("oom_kill ")), 0)

    def counters(self) -> dict[str, int]:
        """Usage now, the peak since the last reset, the times the limit was hit, the OOM kills."""
        return {
            "usage": self.number("memory.usage_in_bytes"),
            "max_usage": self.number("memory.max_usage_in_bytes"),
            "failcnt": self.number("memory.failcnt"),
            "oom_kills": self.oom_kills(),
        }

    def reset_peak(self) -> None:
        for name in ("memory.max_usage_in_bytes", "memory.failcnt"):
            (self.folder / name).write_text("0")

    def _write(self, name: str, value: int) -> int:
        """Write `value`; EBUSY (the kernel could not reclaim down to it) retried. Returns the EBUSY count."""
        busy = 0
        while True:
            fd = os.open(self.folder / name, os.O_WRONLY)
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
        """RAM and RAM + swap limits to `limit`, in the order v1 accepts (memsw >= limit at every step)."""
        old = self.number("memory.limit_in_bytes")
        names = ["memory.limit_in_bytes"]
        if self.memsw:
            # Lowering: the limit first, then memsw; raising: memsw first.
            names = names + ["memory.memsw.limit_in_bytes"] if limit < old else ["memory.memsw.limit_in_bytes", *names]
        r: dict[str, Any] = {"limit": limit, "usage_before": self.number("memory.usage_in_bytes"), "ebusy": 0}
        t0 = time.perf_counter()
        try:
            for name in names:
                r["ebusy"] += self._write(name, limit)
        except OSError as e:
            r["error"] = f"{e.strerror} writing {name} = {limit}" + (
                f" after {EBUSY_ATTEMPTS} tries" if e.errno == errno.EBUSY else ""
            )
        r["seconds"] = time.perf_counter() - t0
        r["usage_after"] = self.number("memory.usage_in_bytes")
        r["limit_now"] = self.number("memory.limit_in_bytes")
        return r

    def remove(self) -> None:
        _cgroup._remove(self.folder)


# --- a child under control ----------------------------------------------------------------------------


class Session:
    """One child in its own cgroup: started at `limit` (page cache dropped first), driven over stdin/stdout."""

    def __init__(self, name: str, limit: int, spec: dict[str, Any], timeout: float, work: Path):
        self.name = name
        self.group = Group(name)
        self.events: list[dict[str, Any]] = []
        self.failure: str | None = None
        self.deadline = time.monotonic() + timeout
        self.stderr_path = work / f"{name}.stderr"
        try:
            first = self.group.set_limit(limit)
            if "error" in first:
                raise RuntimeError(f"cannot set the {name} child's limit: {first['error']}")
            _cgroup._drop_page_cache()
            cmd = [sys.executable, __file__, "--child", "--spec", json.dumps(spec)]
            with open(self.stderr_path, "w") as stderr:  # the child holds its own copy of the descriptor
                self.proc = subprocess.Popen(
                    ["sh", "-c", _cgroup._JOIN, str(self.group.folder / "cgroup.procs"), *cmd],
                    env=ENV,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    bufsize=1,
                )
        except BaseException:
            self.group.remove()
            raise
        self._lines: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def until(self, event: str) -> list[dict[str, Any]] | None:
        """The forward events up to `event`; None (and `failure` set) if the child ended or ran out of time first."""
        forwards = []
        while True:
            left = self.deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.01))
            except queue.Empty:
                self.failure = "timeout"
                return None
            if line is None:
                self.failure = "ended"
                return None
            if not line.startswith("{"):
                continue  # something else printed to stdout
            e = json.loads(line)
            self.events.append(e)
            if e["event"] == "forward":
                forwards.append(e)
                print(
                    f"  {self.name} {e['phase']:4s} forward {e['k'] + 1}: {e['seconds']:.3f} s, resident "
                    f"{e['resident'] / MIB:.0f} MiB, charged {e['usage'] / MIB:.0f} MiB"
                    + ("" if e["same"] else ", LOGITS DIFFER"),
                    flush=True,
                )
            if e["event"] == event:
                return forwards

    def send(self, line: str) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
            return True
        except BrokenPipeError:
            self.failure = "ended"
            return False

    def phase(self, name: str, n: int) -> dict[str, Any]:
        """Run `n` forwards as phase `name`: their events and the cgroup's counters over the phase."""
        self.group.reset_peak()
        forwards = self.until("phase done") if self.send(f"run {name} {n}") else None
        return {"name": name, "forwards": forwards or [], "complete": forwards is not None, **self.group.counters()}

    def close(self) -> dict[str, Any]:
        """Tell the child to quit (or kill it), then how it ended; the cgroup is removed."""
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
        kills = self.group.oom_kills()
        self.group.remove()
        if self.failure == "timeout":
            reason = "timeout"
        elif rc == 0 and self.failure is None:
            reason = "ok"
        elif kills:
            reason = "OOM killed"
        elif rc == 3:
            reason = "logits differ"
        else:
            reason = f"exit {rc}"
        tail = self.stderr_path.read_text()[-2000:] if reason != "ok" else ""
        return {"reason": reason, "rc": rc, "oom_kills": kills, "stderr_tail": tail}


# --- the parent ---------------------------------------------------------------------------------------


def short(note: str) -> str:
    """A memory note without the cgroup's path (the JSON keeps it whole)."""
    return re.sub(r"\(cgroup (v[12]) \S+: ", r"(cgroup \1: ", note)


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="bench_ladder's 4-layer Llama, hidden 256, vocabulary 8000")
    p.add_argument("--high", type=int, default=150, help="the high limit, %% of the model's bytes (+ allowance)")
    p.add_argument("--low", type=int, default=40, help="the lowered limit, %% of the model's bytes (+ allowance)")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds one child may take, all phases")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(json.loads(args.spec))
    if not 0 < args.low < args.high:
        p.error("--low and --high: percentages with 0 < low < high")
    if (why := _cgroup.unavailable()) is not None:
        print(f"capped runs are not possible here: {why}", file=sys.stderr)
        return 1

    from pylomin import manifest

    t_start = time.perf_counter()
    config = bench_ladder.LLAMA_SMALL if args.quick else bench_ladder.LLAMA
    name = "llama-small-random" if args.quick else "llama-1.5g-random"
    src = bench_ladder.ensure_llama(config, name)
    folder = ensure_converted(src, MODELS / f"{name}-pylomin")
    model_bytes = manifest.read(folder).nbytes
    extra, extra_run = bench_ladder.allowance(bench_ladder.BASELINE_TIMEOUT)
    high, low = (extra + model_bytes * pct // 100 for pct in (args.high, args.low))
    pct = {"high": args.high, "low": args.low, "back": args.high, "fresh": args.low}
    limits = {"high": high, "low": low, "back": high, "fresh": low}
    spec = {"folder": str(folder), "vocab": config["vocab_size"]}
    command = " ".join(["scripts/bench_shrink.py", *sys.argv[1:]])
    print(
        f"\n### {name}: {model_bytes / MIB:.0f} MiB fp32; forward 1 x {SEQ}; {os.cpu_count()} CPUs; allowance "
        f"{extra / MIB:.0f} MiB; limits: high {high / MIB:.0f} MiB ({args.high} %), low {low / MIB:.0f} MiB "
        f"({args.low} %)\n",
        flush=True,
    )
    OUT.mkdir(exist_ok=True)
    phases: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="shrink-", dir=OUT) as tmp:
        run = Session("shrink", high, spec, args.timeout, Path(tmp))
        try:
            loaded = run.until("loaded")
            load_event = next((e for e in run.events if e["event"] == "loaded"), None)
            if load_event is not None:
                print(f"  loaded in {load_event['load_s']:.2f} s: {short(load_event['note'])}", flush=True)
            for phase, n in PHASES if loaded is not None else ():
                if phase != "high":
                    change = {"to": phase, **run.group.set_limit(limits[phase])}
                    changes.append(change)
                    print(
                        f"  limit -> {limits[phase] / MIB:.0f} MiB ({pct[phase]} %) in {change['seconds']:.2f} s, "
                        f"charged {change['usage_before'] / MIB:.0f} -> {change['usage_after'] / MIB:.0f} MiB"
                        + (f", EBUSY x{change['ebusy']}" if change["ebusy"] else "")
                        + (f", FAILED: {change['error']}" if "error" in change else ""),
                        flush=True,
                    )
                phases.append(run.phase(phase, n))
                if not phases[-1]["complete"]:
                    break
        finally:
            shrink_end = run.close()
        fresh = Session("fresh", low, spec, args.timeout, Path(tmp))
        try:
            fresh_loaded = fresh.until("loaded")
            fresh_phase = fresh.phase("fresh", FRESH_FORWARDS) if fresh_loaded is not None else None
        finally:
            fresh_end = fresh.close()
        fresh_load = next((e for e in fresh.events if e["event"] == "loaded"), None)

    by = {ph["name"]: ph for ph in phases}

    def times(phase: str, skip: int) -> list[float]:
        return [e["seconds"] for e in by[phase]["forwards"][skip:]] if phase in by else []

    fresh_times = [e["seconds"] for e in fresh_phase["forwards"]] if fresh_phase else []
    fresh_steady = median(fresh_times[-STEADY:]) if len(fresh_times) >= STEADY else None
    before = median(times("high", 1))  # the first forward after the load is not the steady state
    after_low = median(times("low", 1))  # from the 2nd forward after lowering
    after_back = median(times("back", 1))
    ratio_low = after_low / fresh_steady if after_low and fresh_steady else None
    ratio_back = after_back / before if after_back and before else None
    # The first forward after lowering from which every one is within TARGET of the fresh child's steady state.
    settled = None
    if fresh_steady:
        low_times = times("low", 0)
        for k in range(len(low_times)):
            if all(s <= TARGET * fresh_steady for s in low_times[k:]):
                settled = k + 1
                break
    errors = [
        f"{label}: {end['reason']}"
        for label, end in (("shrink", shrink_end), ("fresh", fresh_end))
        if end["reason"] != "ok"
    ]
    errors += [f"limit -> {c['to']}: {c['error']}" for c in changes if "error" in c]
    oom = shrink_end["oom_kills"] + fresh_end["oom_kills"]

    rows = [*phases, *([fresh_phase] if fresh_phase else [])]
    lines = [
        "| child | phase | limit MiB | % | forward | s | resident MiB | charged MiB | same | memory note |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for ph in rows:
        for e in ph["forwards"]:
            lines.append(
                f"| {'fresh' if ph['name'] == 'fresh' else 'shrink'} | {ph['name']} | {limits[ph['name']] / MIB:.0f} | {pct[ph['name']]} | {e['k'] + 1} | "
                f"{e['seconds']:.3f} | {e['resident'] / MIB:.0f} | {e['usage'] / MIB:.0f} | {'yes' if e['same'] else 'NO'} | "
                f"{short(e['note'])} |"
            )
    print()
    print("\n".join(lines))
    print(
        "\n| child | phase | forwards | peak charged MiB | failcnt | OOM kills (cumulative) |\n|---|---|---:|---:|---:|---:|"
    )
    for ph in rows:
        print(
            f"| {'fresh' if ph['name'] == 'fresh' else 'shrink'} | {ph['name']} | {len(ph['forwards'])} | "
            f"{ph['max_usage'] / MIB:.0f} | {ph['failcnt']} | {ph['oom_kills']} |"
        )
    print(
        f"\nafter lowering (forwards 2-{len(times('low', 0))}, median) {fmt(after_low)} s vs fresh at {args.low} % "
        f"(median of the last {STEADY}) {fmt(fresh_steady)} s: {fmt(ratio_low, '.2f')}x (target <= {TARGET})"
        + (f"; within {TARGET}x of it from forward {settled} after lowering on" if settled else "")
        + f"\nafter raising back (forwards 2-{len(times('back', 0))}, median) {fmt(after_back)} s vs before lowering "
        f"(forwards 2-{len(times('high', 0))}) {fmt(before)} s: {fmt(ratio_back, '.2f')}x"
        f"\nOOM kills: {oom}; errors: {', '.join(errors) if errors else 'none'}"
        + "".join(
            f"\n  {end['reason']}: {end['stderr_tail'].strip()[-600:]}"
            for end in (shrink_end, fresh_end)
            if end["stderr_tail"]
        ),
        flush=True,
    )
    dump = {
        "model": name,
        "config": config,
        "model_bytes": model_bytes,
        "allowance": extra,
        "allowance_run": extra_run,
        "cpus": os.cpu_count(),
        "command": command,
        "limits": limits,
        "percent": pct,
        "load": load_event,
        "limit_changes": changes,
        "phases": phases,
        "shrink_end": shrink_end,
        "fresh_load": fresh_load,
        "fresh": fresh_phase,
        "fresh_end": fresh_end,
        "summary": {
            "before_s": before,
            "after_low_s": after_low,
            "fresh_low_s": fresh_steady,
            "after_back_s": after_back,
            "low_vs_fresh": ratio_low,
            "low_target": TARGET,
            "low_settled_from_forward": settled,
            "back_vs_before": ratio_back,
            "oom_kills": oom,
            "errors": errors,
        },
    }
    (OUT / "bench_shrink.json").write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {OUT / 'bench_shrink.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0 if not errors and not oom else 2


if __name__ == "__main__":
    sys.exit(main())
