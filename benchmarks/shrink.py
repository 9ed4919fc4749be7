"""The memory limit lowered mid-run: does pylomin's default follow it, without an OOM kill, and come back?

The ladder's Llama (1426 MiB fp32), loaded with no options by one child in a cgroup of its own (page
cache dropped first; root), which runs batch-1 x 128 forwards when told to. Between phases this
process writes the cgroup's limit: `high` (allowance + 150 % of the model, 4 forwards), `low`
(lowered to allowance + 40 %, 6), `back` (150 % again, 6); each phase waits until pylomin re-reads the
memory figure. Then a fresh child at 40 % (6 forwards; steady state: the median of the last 4). Every
forward reports its time, the bytes kept resident, pylomin's memory note and the cgroup's usage; its
logits must equal the first's. Per phase: the cgroup's peak, `failcnt`, the OOM kills. Targets: no
OOM kill or error; from the 2nd forward after lowering within 1.2x of the fresh child; after raising,
the speed of before. Writes bench-out/bench_shrink.json. `--quick`: the 28 MiB Llama (a smoke test).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.shrink [--quick] [--high 150] [--low 40]
        [--timeout 900]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import cgroup, internals, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.paths import MIB, OUT

SEQ = 128
PHASES = (("high", 4), ("low", 6), ("back", 6))  # (name, forwards); high and back at --high, low at --low
FRESH_FORWARDS, STEADY = 6, 4  # the fresh child's steady state: the median of its last 4 forwards
TARGET = 1.2  # after lowering vs fresh at the low limit


def measure(child: Child) -> int:
    """Load with the defaults, then run the forwards each stdin line asks for (`run PHASE N`), until `quit`.

    Each event (`loaded`, each `forward`, `phase done`) goes into the result's `events`, saved at once. Exit 3
    when a forward's logits differ from the first's, 4 when stdin closes without `quit`.
    """
    child.result["events"] = events = []

    def emit(**fields: Any) -> None:
        events.append(fields)
        child.save()  # what the parent waits for
        if fields["event"] == "forward":  # (this process's stdout is the parent's)
            e, same = fields, "" if fields["same"] else ", LOGITS DIFFER"
            print(
                f"  {child.spec['name']} {e['phase']:4s} forward {e['k'] + 1}: {e['seconds']:.3f} s, resident "
                f"{e['resident'] / MIB:.0f} MiB, charged {e['usage'] / MIB:.0f} MiB{same}",
                flush=True,
            )

    x = torch.randint(0, child.vocab, (1, SEQ), generator=torch.Generator().manual_seed(0))
    model = child.load()
    policy = internals.memory_policy(model)
    load_s, resident, note = child.result["load_s"], policy["resident_bytes"], policy["memory_note"]
    emit(event="loaded", load_s=load_s, resident=resident, note=note, usage=cgroup.own_usage())
    first, index, recheck = None, 0, internals.recheck_s()
    began = time.monotonic()  # when the last forward began: pylomin re-reads memory at most every `recheck` s
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["quit"]:
            return 0
        if not words:
            continue
        phase, n = words[1], int(words[2])
        child.save(phase)
        time.sleep(max(0.0, recheck + 0.05 - (time.monotonic() - began)))  # so that this phase re-reads it
        for k in range(n):
            began, t = time.monotonic(), time.perf_counter()
            logits = model(x, use_cache=False).logits
            seconds = time.perf_counter() - t
            digest = hashlib.sha256(logits.contiguous().numpy().tobytes()).hexdigest()
            del logits
            first = first or digest
            (available, limit), policy = internals.read_memory(), internals.memory_policy(model)
            fields = dict(phase=phase, i=index, k=k, seconds=seconds, resident=policy["resident_bytes"])
            fields.update(note=policy["memory_note"], usage=cgroup.own_usage(), available=available)
            emit(event="forward", **fields, limit_seen=limit, same=digest == first)
            index += 1
            if digest != first:
                print(f"forward {index - 1} ({phase} {k}): logits differ from the first forward's", file=sys.stderr)
                return 3
        emit(event="phase done", phase=phase)
    return 4


def short(note: str) -> str:
    """A memory note without the cgroup's path (the JSON keeps it whole)."""
    return re.sub(r"\(cgroup (v[12]) \S+: ", r"(cgroup \1: ", note)


def session(spec: dict[str, Any], name: str, plan: list[tuple[str, int]], limits: dict, pct: dict, work: Path) -> dict:
    """One child in a cgroup of its own through `plan` [(phase, forwards)], its limit moved to each phase's."""
    run = runner.Driven({**spec, "name": name}, name, limits[plan[0][0]], spec["timeout"], work)
    phases: list[dict[str, Any]] = []
    changes: list[dict[str, Any]] = []
    try:
        load = run.last if run.until("loaded") is not None else None
        if load is not None:
            print(f"  loaded in {load['load_s']:.2f} s: {short(load['note'])}", flush=True)
        for i, (phase, n) in enumerate(plan if load is not None else []):
            if i > 0:
                changes.append(c := {"to": phase, **run.group.set_limit(limits[phase])})
                how = f", EBUSY x{c['ebusy']}" if c["ebusy"] else ""
                how += f", FAILED: {c['error']}" if "error" in c else ""
                print(
                    f"  limit -> {limits[phase] / MIB:.0f} MiB ({pct[phase]} %) in {c['seconds']:.2f} s, charged "
                    f"{c['usage_before'] / MIB:.0f} -> {c['usage_after'] / MIB:.0f} MiB{how}",
                    flush=True,
                )
            run.group.reset_peak()
            forwards = run.until("phase done") if run.send(f"run {phase} {n}") else None
            phases.append({"name": phase, "forwards": forwards or [], "complete": forwards is not None})
            phases[-1].update(run.group.counters())
            if forwards is None:
                break
    finally:
        end = run.close({3: "logits differ"})
    return {"load": load, "phases": phases, "changes": changes, "end": end}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ladder's 4-layer Llama, hidden 256, vocabulary 8000")
    p.add_argument("--high", type=int, default=150, help="the high limit, %% of the model's bytes (+ allowance)")
    p.add_argument("--low", type=int, default=40, help="the lowered limit, %% of the model's bytes (+ allowance)")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds one child may take, all phases")
    args = p.parse_args(argv)
    if not 0 < args.low < args.high:
        p.error("--low and --high: percentages with 0 < low < high")
    if (why := cgroup.unavailable()) is not None:
        print(f"capped runs are not possible here: {why}", file=sys.stderr)
        return 1
    t_start = time.perf_counter()
    model = models.LLAMA_SMALL if args.quick else models.LLAMA
    spec = {**model.spec("block"), "contender": "default", "measure": "benchmarks.shrink:measure"}
    model_bytes = models.nbytes(spec["folders"]["block"])
    extra, extra_run = runner.allowance(model.cls)
    high, low = (extra + model_bytes * pct // 100 for pct in (args.high, args.low))
    pct = {"high": args.high, "low": args.low, "back": args.high, "fresh": args.low}
    limits = {"high": high, "low": low, "back": high, "fresh": low}
    print(
        f"\n### {model.name}: {model_bytes / MIB:.0f} MiB fp32; forward 1 x {SEQ}; {os.cpu_count()} CPUs; allowance "
        f"{extra / MIB:.0f} MiB; limits: high {high / MIB:.0f} MiB ({args.high} %), low {low / MIB:.0f} MiB "
        f"({args.low} %)\n",
        flush=True,
    )
    OUT.mkdir(exist_ok=True)
    spec["timeout"] = args.timeout
    with tempfile.TemporaryDirectory(prefix="shrink-", dir=OUT) as tmp:
        shrink = session(spec, "shrink", list(PHASES), limits, pct, Path(tmp))
        fresh = session(spec, "fresh", [("fresh", FRESH_FORWARDS)], limits, pct, Path(tmp))
    ends = {"shrink": shrink["end"], "fresh": fresh["end"]}
    by = {ph["name"]: ph for ph in shrink["phases"] + fresh["phases"]}

    def times(phase: str, skip: int) -> list[float]:
        return [e["seconds"] for e in by[phase]["forwards"][skip:]] if phase in by else []

    def median(xs: list[float]) -> float | None:
        return report.median(xs) if xs else None

    fresh_steady = median(times("fresh", 0)[-STEADY:]) if len(times("fresh", 0)) >= STEADY else None
    before, after_low, after_back = (median(times(ph, 1)) for ph in ("high", "low", "back"))  # from the 2nd forward
    ratio_low = after_low / fresh_steady if after_low and fresh_steady else None
    ratio_back = after_back / before if after_back and before else None
    # The first forward after lowering from which every one is within TARGET of the fresh child's steady state.
    low_times, target = times("low", 0), TARGET * (fresh_steady or 0)
    settled = next((k + 1 for k in range(len(low_times)) if fresh_steady and max(low_times[k:]) <= target), None)
    errors = [f"{label}: {end['reason']}" for label, end in ends.items() if end["reason"] != "ok"]
    errors += [f"limit -> {c['to']}: {c['error']}" for c in shrink["changes"] if "error" in c]
    oom = sum(end["oom_kills"] for end in ends.values())
    child_of = {name: "fresh" if name == "fresh" else "shrink" for name in by}
    lines = [
        [child_of[name], name, f"{limits[name] / MIB:.0f}", pct[name], e["k"] + 1, f"{e['seconds']:.3f}"]
        + [f"{e['resident'] / MIB:.0f}", f"{e['usage'] / MIB:.0f}", "yes" if e["same"] else "NO", short(e["note"])]
        for name, ph in by.items()
        for e in ph["forwards"]
    ]
    header = ["child", "phase", "limit MiB", "%", "forward", "s", "resident MiB", "charged MiB", "same", "memory note"]
    print("\n" + report.table(header, "llrrrrrrll", lines))
    lines = [
        [child_of[n], n, len(ph["forwards"]), f"{ph['max_usage'] / MIB:.0f}", ph["failcnt"], ph["oom_kills"]]
        for n, ph in by.items()
    ]
    header = ["child", "phase", "forwards", "peak charged MiB", "failcnt", "OOM kills (cumulative)"]
    print("\n" + report.table(header, "llrrrr", lines))
    fmt = report.num
    print(
        f"\nafter lowering (forwards 2-{len(low_times)}, median) {fmt(after_low, '.3f')} s vs fresh at {args.low} % "
        f"(median of the last {STEADY}) {fmt(fresh_steady, '.3f')} s: {fmt(ratio_low, '.2f')}x (target <= {TARGET})"
        + (f"; within {TARGET}x of it from forward {settled} after lowering on" if settled else "")
        + f"\nafter raising back (forwards 2-{len(times('back', 0))}, median) {fmt(after_back, '.3f')} s vs before "
        f"lowering (forwards 2-{len(times('high', 0))}) {fmt(before, '.3f')} s: {fmt(ratio_back, '.2f')}x"
        f"\nOOM kills: {oom}; errors: {', '.join(errors) if errors else 'none'}"
        + "".join(f"\n  {e['reason']}: {e['stderr_tail'].strip()[-600:]}" for e in ends.values() if e["stderr_tail"]),
        flush=True,
    )
    summary = dict(before_s=before, after_low_s=after_low, fresh_low_s=fresh_steady, after_back_s=after_back)
    summary.update(low_vs_fresh=ratio_low, low_target=TARGET, low_settled_from_forward=settled, errors=errors)
    summary.update(back_vs_before=ratio_back, oom_kills=oom)
    dump = dict(model=model.name, config=model.config, model_bytes=model_bytes, allowance=extra, cpus=os.cpu_count())
    dump.update(allowance_run=extra_run, command=" ".join(["python -m benchmarks.shrink", *sys.argv[1:]]))
    dump.update(limits=limits, percent=pct, load=shrink["load"], limit_changes=shrink["changes"])
    dump.update(phases=shrink["phases"], shrink_end=ends["shrink"], fresh_load=fresh["load"])
    dump.update(fresh=by.get("fresh"), fresh_end=ends["fresh"], summary=summary)
    (OUT / "bench_shrink.json").write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {OUT / 'bench_shrink.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0 if not errors and not oom else 2


if __name__ == "__main__":
    sys.exit(main())
