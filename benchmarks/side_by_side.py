"""Every contender side by side: in-memory transformers, accelerate's disk offload, pylomin's default and its modes.

The 1.6 GiB BERT (one forward, batch 1 x 128 and 8 x 128) and a GPT-2-large-sized decoder (greedy
generate() of 32 tokens from 32). Per contender, in a fresh process on the same input: median time
warm and cold (its files evicted before each timed run; pylomin's explicit modes drop_page_cache
False warm, True cold; its default takes no options), over the in-memory warm time and, cold, over
max(that, the I/O floor: the bytes a run reads at the disk's cold read bandwidth); peak RSS of the
whole process above the RSS after the imports; whether the output equals the in-memory model's; for
BERT batch 1 the smallest cgroup limit (RAM + swap, page cache charged) under which loading and two
runs exit 0 within 30 s + 10x the unlimited load, warm-up and cold run: binary search in 32 MiB steps,
with ✗ the largest that failed and the wall time at the cap. Prints a table per case, writes
bench-out/bench.png and bench-out/bench.json (results: docs/benchmarks.md). `--quick`: small models.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.side_by_side [--quick] [--no-caps]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import pylomin
from benchmarks.harness import cgroup, internals, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.measure import cold_read_bandwidth, evict, peak_above
from benchmarks.harness.paths import MIB, OUT

SEQ = 128
PROMPT_TOKENS = NEW_TOKENS = 32
CAP_FLOOR, CAP_MARGIN = 128 * MIB, 256 * MIB  # the search's lower end; above the unlimited peak: its upper end
LABELS = {
    "memory": "in memory (transformers)",
    "accelerate": "accelerate disk offload",
    "default": "pylomin, default (auto)",
    "stream": "pylomin, streaming (memory_budget=0)",
    "prefetch0": "pylomin, streaming, prefetch=0",
    "leaf": "pylomin, streaming, leaf units",
    "budget50": "pylomin, memory_budget=50 %",
    "int8": "pylomin, int8 folder, default",
    "int4": "pylomin, int4 folder, default",
}
QUANTIZED = ("int8", "int4")  # outputs close to, not equal to, the fp32 model's


def measure(child: Child) -> None:
    """Warm: load, a warm-up, the timed runs; cold: a fresh pylomin model, the files evicted before each run.
    With `trial` (the cap search): load as for a cold run and run twice."""
    spec, r = child.spec, child.result
    gen = spec["kind"] == "gpt2"
    torch.manual_seed(0)
    x = torch.randint(0, child.vocab, (spec["batch"], spec["seq"]))
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0) if gen else {}

    def run(model: Any, tokens: int) -> tuple[Any, float]:
        t0 = time.perf_counter()
        y = model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, **kw) if gen else model(x).last_hidden_state
        return y, time.perf_counter() - t0

    def within(per_token: float) -> int:  # new tokens to time: all unless that takes over --max-generate-s
        fits = per_token * spec["new_tokens"] <= spec["max_generate_s"]
        return spec["new_tokens"] if fits else max(2, int(spec["max_generate_s"] / per_token))

    base, full = internals.rss(), spec["new_tokens"] if gen else 1
    r.update(tokens={"warm": full, "cold": full}, warm=[], cold=[], peaks={}, memory_note="", output=None, api="")
    r.update(base_anon=base.anon, base_total=base.total)
    if spec.get("trial"):
        model = child.load(drop=True)
        for _ in range(2):
            run(model, 2)
        return
    with child.phase("warm"):
        with internals.peak_rss(0.01) as p:
            model = child.load(drop=False)
            load_s, first_s = r["load_s"], run(model, 2)[1]  # kernels, the recorded order, the page cache
            # A warm token from a second short run: the first also faults in the default's resident model.
            per_token = run(model, 2)[1] / 2 if gen else 0.0
            tokens, runs = full, spec["runs_warm"]
            if gen and (n := within(per_token)) < full:
                tokens, runs = n, 1
                cut = f"~{per_token * full:.0f} s > --max-generate-s {spec['max_generate_s']:g}"
                child.notes.append(f"warm: {full} tokens would take {cut}: timed once on {n} new tokens; cold skipped")
            for _ in range(runs):
                y, seconds = run(model, tokens)
                r["warm"].append(seconds)
        r["tokens"]["warm"], r["peaks"]["warm"] = tokens, peak_above(p, base)
        r["trial_s"] = load_s + first_s
        r["memory_note"] = internals.memory_policy(model).get("memory_note", "")  # what "auto" chose
        if gen:
            r["output"] = y[0, spec["seq"] :].tolist()
        else:
            child.save_tensor(y)
    if tokens < full or not spec["runs_cold"]:
        return
    with child.phase("cold"):
        fresh = child.contender.how == "pylomin"  # a fresh model: drop_page_cache=True for the explicit modes
        if fresh:
            pylomin.unload_(model)
            del model
            gc.collect()
        with internals.peak_rss(0.01) as p:
            if fresh:
                model = child.load(drop=True)
                load_s, first_s = r["load_s"], run(model, 2)[1]
            if gen and (n := within(first_s / 2)) < full:
                r["tokens"]["cold"] = n
                child.notes.append(f"cold: ~{first_s / 2:.1f} s per token: timed on {n} new tokens, not {full}")
            files = child.files()
            for _ in range(spec["runs_cold"]):
                evict(files)
                r["cold"].append(run(model, r["tokens"]["cold"])[1])
        r["peaks"]["cold"] = peak_above(p, base)
        r["trial_s"] = load_s + first_s + r["cold"][0]  # the cap search's time scale: load, warm-up, a cold run


def per_unit(r: dict[str, Any], phase: str) -> float:
    """Median seconds per forward, or per generated token; nan when the phase was not run."""
    return report.median(r[phase]) / r["tokens"][phase]


def speed(r: dict[str, Any], phase: str, gen: bool, unit: str = "") -> str:
    t, n = per_unit(r, phase), r["tokens"][phase]
    if t != t:
        return "skipped"
    return f"{1 / t:.2f}{unit}" + (f" ({n} tokens)" if n != NEW_TOKENS else "") if gen else f"{t:.3f} s"


def table(rows: dict[str, dict[str, Any]], gen: bool, floor: float, work: Path) -> str:
    """The markdown table of one case; "same output" compares with the in-memory model's (tokens, or torch.equal)."""
    ref = per_unit(rows["memory"], "warm") if "memory" in rows else float("nan")
    lines = []
    for key, r in rows.items():
        if "memory" not in rows or key in ("memory", *QUANTIZED):
            same = "-"
        elif gen:
            n = min(len(r["output"]), len(rows["memory"]["output"]))  # fewer tokens where timed on fewer
            same = "yes" if r["output"][:n] == rows["memory"]["output"][:n] else "NO"
        else:
            same = "yes" if torch.equal(torch.load(work / f"{key}.pt"), torch.load(work / "memory.pt")) else "NO"
        peak, warm, cold = r["peak"], per_unit(r, "warm"), per_unit(r, "cold")
        vs_cold, vs_floor = (f"{cold / ref:.2f}x", f"{cold / max(ref, floor):.2f}x") if cold == cold else ("-", "-")
        mib = f"{peak['total'] / MIB:.0f} ({peak['anon'] / MIB:.0f} + {peak['file'] / MIB:.0f})"
        lines.append([LABELS[key], speed(r, "warm", gen), speed(r, "cold", gen), f"{warm / ref:.2f}x / {vs_cold}"])
        lines[-1] += [vs_floor, mib, report.smallest_cap(r.get("cap")), same]
    what = "tokens/s" if gen else "latency"
    header = ["contender", f"warm {what}", f"cold {what}", "vs in memory (warm / cold)"]
    header += ["cold vs max(in memory, I/O floor)", "peak RSS MiB (anon + file)", "min cap MiB", "same output"]
    return report.table(header, "lrrrrrrc", lines)


def run_case(title: str, spec: dict[str, Any], args: argparse.Namespace, work: Path, caps: str | None) -> dict:
    """Every contender on one case, then (if `caps` is None) the smallest-cap search; prints the table."""
    t_case, gen, block = time.perf_counter(), spec["kind"] == "gpt2", spec["folders"]["block"]
    bandwidth, needed = cold_read_bandwidth(models.unit_files(block)), models.forward_bytes(block)
    floor = needed / bandwidth
    print(
        f"\n### {title}\n\n{models.nbytes(block) / 2**30:.2f} GiB fp32; {os.cpu_count()} CPUs; cold sequential read of "
        f"the unit files {bandwidth / MIB:.0f} MiB/s; a {'token' if gen else 'forward'} reads {needed / MIB:.0f} MiB (all "
        f"but the word embeddings' lookup) -> I/O floor {floor:.3f} s"
        + (f" per token ({1 / floor:.2f} tokens/s)" if gen else ""),
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    for key in args.contenders:
        r = rows[key] = runner.spawn({**spec, "contender": key}, work)
        r["peak"] = max(r["peaks"].values(), key=lambda p: p["total"])  # warm or cold, whichever is higher
        for note in r["notes"] + ([f"chose: {r['memory_note']}"] if r["memory_note"] else []):
            print(f"  {LABELS[key]}: {note}", flush=True)
        speeds = f"warm {speed(r, 'warm', gen, ' tokens/s')}, cold {speed(r, 'cold', gen, ' tokens/s')}"
        print(f"  {LABELS[key]}: {speeds}, peak {r['peak']['total'] / MIB:.0f} MiB ({r['wall_s']:.0f} s)", flush=True)
    for key, r in rows.items() if spec["caps"] and caps is None else ():
        print(f"  min cap, {LABELS[key]}:", flush=True)
        # Below the memory the imports alone take, nothing runs; the unlimited peak plus a margin should pass.
        lo = max(CAP_FLOOR, r["base_anon"] // runner.CAP_STEP * runner.CAP_STEP)
        hi = -(-(r["base_total"] + r["peak"]["total"] + CAP_MARGIN) // runner.CAP_STEP) * runner.CAP_STEP
        trial = {**spec, "contender": key, "trial": True}
        r["cap"] = runner.smallest_cap(trial, work, lo, hi, 30 + 10 * r["trial_s"], args.cap_steps)
    if spec["caps"] and caps is not None:
        print(f"  min cap: skipped ({caps})", flush=True)
    print("\n" + table(rows, gen, floor, work))
    took = time.perf_counter() - t_case
    print(f"\nwarm: median of {spec['runs_warm']} runs, cold: of {spec['runs_cold']}; columns: --help ({took:.0f} s)")
    for r in rows.values():
        r["floor_s"], r["bandwidth"] = floor, bandwidth
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small BERT and GPT-2, 2 runs (a few minutes)")
    p.add_argument("--runs", type=int, help="timed runs per contender, warm and cold (default: per case)")
    p.add_argument("--no-caps", action="store_true", help="skip the memory-cap search (BERT batch 1)")
    p.add_argument("--cap-steps", type=int, help="most capped runs per contender (default 5, --quick 2)")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--contenders", default=",".join(LABELS), help=f"comma-separated subset of {list(LABELS)}")
    p.add_argument("--max-generate-s", type=float, default=60.0, help="a longer generate() is timed on fewer tokens")
    p.add_argument("--accelerate-api", choices=("auto", "disk_offload"), default="auto", help="auto: device_map first")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    args.contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := set(args.contenders) - set(LABELS):
        p.error(f"unknown contenders {sorted(unknown)}")
    args.cap_steps = args.cap_steps or (2 if args.quick else 5)
    caps = "--no-caps" if args.no_caps else cgroup.unavailable()

    def runs(warm: int, cold: int) -> dict[str, int]:
        warm, cold = (args.runs, args.runs) if args.runs else (2, 2) if args.quick else (warm, cold)
        return {"runs_warm": warm, "runs_cold": cold}

    common = dict(max_generate_s=args.max_generate_s, accelerate_api=args.accelerate_api, new_tokens=NEW_TOKENS)
    common.update(measure="benchmarks.side_by_side:measure", batch=1, caps=False)
    bert, gpt2 = (models.BERT_SMALL, models.GPT2_SMALL) if args.quick else (models.BERT, models.GPT2_LARGE)
    cases = []
    if not args.skip_bert:
        spec = {**bert.spec("block", "leaf", *QUANTIZED), **common, "kind": "bert", "seq": SEQ}
        name = "small BERT" if args.quick else "BERT 1.6 GiB"
        cases.append((f"{name}, batch 1 x {SEQ}", {**spec, **runs(3, 3), "caps": True}))
        cases.append((f"{name}, batch 8 x {SEQ}", {**spec, **runs(2, 2), "batch": 8}))
    if not args.skip_gpt2:
        spec = {**gpt2.spec("block", "leaf", *QUANTIZED), **common, "kind": "gpt2", "seq": PROMPT_TOKENS}
        name = "small GPT-2" if args.quick else "GPT-2-large-sized"
        cases.append((f"{name}, generate() {NEW_TOKENS} from {PROMPT_TOKENS}", {**spec, **runs(2, 1)}))
    results = []
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for title, spec in cases:
            results.append((title, spec, run_case(title, spec, args, Path(tmp), caps)))
    if results:
        report.latency_chart([(t, s["kind"] == "gpt2", rows) for t, s, rows in results], LABELS, OUT / "bench.png")
        dump = [{"case": t, "kind": s["kind"], "batch": s["batch"], "rows": rows} for t, s, rows in results]
        (OUT / "bench.json").write_text(json.dumps(dump, indent=1))
        print(f"\nwrote {OUT / 'bench.png'} and {OUT / 'bench.json'}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
