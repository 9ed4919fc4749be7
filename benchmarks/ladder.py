"""The memory ladder: one Llama-shaped decoder under cgroup memory limits from a quarter of its bytes to 1.5x.

The ladder's Llama (1426 MiB fp32) under limits of 25-150 % of its bytes, each plus the allowance (what
a capped child that imports torch, transformers, accelerate and pylomin and builds nothing is charged,
measured once). Each contender at each limit in one fresh child under it, page cache dropped first:
load, a 1 x 128 forward, a second if time allows (reported), a greedy generate() of 16 tokens from 16
(decode tok/s over the tokens after the first); written after every step, so a killed child still
reports. A contender that failed is not run at the smaller limits (`--no-skip`). The floor: what does
not fit beside the allowance, read once per token at the cold read bandwidth. The prediction: pylomin's
speed estimate (`pylomin.estimate`) for its defaults at the memory the child read before loading, with the
cold read bandwidth and a compute probe run here once, against the measured decode. Writes
bench-out/bench_ladder.json and docs/ladder.png. `--model bert`: the 1.6 GiB BERT, forward only
(docs/ladder-bert.png). `--limits-mib 384,512`: absolute limits, the allowance not added, and plain
transformers under 8 GiB as the reference of the ratios. `--quick`: a 28 MiB model (a smoke test, written to
bench-out/bench_ladder_quick.json).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.ladder [--quick] [--limits 25,50]
        [--only memory,pylomin] [--timeout 600] [--no-png]
    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.ladder --model bert --limits-mib 384,512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import cgroup, models, report, runner
from benchmarks.harness.measure import cold_read_bandwidth
from benchmarks.harness.paths import MIB, OUT, ROOT

SEQ, PROMPT_TOKENS, NEW_TOKENS = 128, 16, 16
LIMITS = (25, 50, 75, 100, 150)  # % of the model's bytes, on top of the allowance
LABELS = {
    "memory": "in memory (transformers from_pretrained)",
    "accelerate": "accelerate disk offload",
    "pylomin": "pylomin load_streaming, no options",
    "least": "pylomin least memory: leaf units, memory_budget=0, prefetch=0",
    "int8": "pylomin load_streaming of an int8 folder (--quantize int8), no options",
    "int4": "pylomin load_streaming of an int4 folder (--quantize int4, groups of 64), no options",
}
CONTENDER = {"pylomin": "default"}  # the harness's contender of a row, where its name differs
QUANTIZED = ("int8", "int4")  # their tokens differ from the fp32 model's by design (accuracy: benchmarks.quant)


def where(r: dict[str, Any]) -> str:
    """The row's limit in words: "25 %", "384 MiB", "the reference"."""
    return "the reference" if r.get("reference") else f"{r['limit_mib']} MiB" if r["pct"] is None else f"{r['pct']} %"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("llama", "bert"), default="llama", help="the Llama decoder or the 1.6 GiB BERT")
    p.add_argument("--quick", action="store_true", help="a 4-layer Llama or the small BERT (smoke test)")
    p.add_argument("--limits", help=f"limits in %% of the model (+ allowance); default {','.join(map(str, LIMITS))}")
    p.add_argument("--limits-mib", help="absolute limits in MiB, the allowance not added (e.g. 384,512)")
    p.add_argument("--only", help=f"comma-separated subset of {list(LABELS)}")
    p.add_argument("--timeout", type=float, default=600.0, help="most seconds one capped child may take")
    p.add_argument("--no-skip", action="store_true", help="run a contender at smaller limits after it failed")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    args = p.parse_args(argv)
    t_start, bert = time.perf_counter(), args.model == "bert"
    contenders = [c.strip() for c in (args.only or ",".join(LABELS)).split(",") if c.strip()]
    if unknown := set(contenders) - set(LABELS):
        p.error(f"unknown contenders {sorted(unknown)}; choose from {list(LABELS)}")
    percents = args.limits if args.limits is not None else "" if args.limits_mib else ",".join(map(str, LIMITS))
    try:
        limits = sorted({int(s) for s in percents.split(",") if s.strip()}, reverse=True)
        absolute = sorted({int(s) for s in (args.limits_mib or "").split(",") if s.strip()}, reverse=True)
    except ValueError:
        p.error(f"--limits and --limits-mib take whole numbers, comma-separated: {args.limits!r}, {args.limits_mib!r}")
    if not limits and not absolute or min(limits + absolute) <= 0:
        p.error("--limits / --limits-mib: at least one limit, each above 0")
    if (why := cgroup.unavailable()) is not None:
        print(f"capped runs are not possible here: {why}", file=sys.stderr)
        return 1

    small, full = (models.BERT_SMALL, models.BERT) if bert else (models.LLAMA_SMALL, models.LLAMA)
    model = small if args.quick else full
    spec = model.spec("block", "leaf", *(set(QUANTIZED) & set(contenders)))
    spec.update(measure="benchmarks.harness.child:load_forward_generate", seq=SEQ, kind=args.model)
    spec.update(prompt_tokens=PROMPT_TOKENS, new_tokens=NEW_TOKENS)
    block = spec["folders"]["block"]
    model_bytes = models.nbytes(block)
    # What one pass reads when nothing is resident: the model, for BERT all but the word embeddings' table.
    pass_bytes = models.forward_bytes(block) if bert else model_bytes
    bandwidth = cold_read_bandwidth(models.unit_files(block))
    extra, extra_run = runner.allowance(model.cls)
    work_done = f"forward 1 x {SEQ}" + (" (no generate)" if bert else f"; generate() {NEW_TOKENS} from {PROMPT_TOKENS}")
    print(
        f"\n### {model.name}: {model_bytes / MIB:.0f} MiB fp32; {work_done}\n\n{os.cpu_count()} CPUs; cold sequential "
        f"read of the unit files {bandwidth / MIB:.0f} MiB/s; allowance (charged to a child that imports torch, "
        f"transformers, accelerate and pylomin) {extra / MIB:.0f} MiB ({extra_run['seconds']:.1f} s)\n",
        flush=True,
    )
    # (label, limit bytes, % of the model or None for an absolute limit), largest first.
    steps: list[tuple[str, int, int | None]] = [(str(pct), model_bytes * pct // 100 + extra, pct) for pct in limits]
    steps += [(f"{mib}MiB", mib * MIB, None) for mib in absolute]
    if reference := bool(absolute) and "memory" in contenders:
        steps.append(("reference", runner.BASELINE_LIMIT, None))
    steps.sort(key=lambda step: step[1], reverse=True)
    floors = {  # per limit label: s per pass to read what does not fit beside the allowance
        label: max(0, pass_bytes - (model_bytes * pct // 100 if pct is not None else max(0, limit - extra))) / bandwidth
        for label, limit, pct in sorted(steps, key=lambda step: step[1])
        if label != "reference"
    }
    predict = Predictor(block, model.cls, bandwidth) if not bert and "pylomin" in contenders else None
    rows: list[dict[str, Any]] = []
    failed_at: dict[str, str] = {}
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for label, limit, pct in steps:  # largest first: a contender that fails is not run at the smaller limits
            at = f"{pct} %" if pct is not None else label
            for key in contenders if label != "reference" else ["memory"]:
                head: dict[str, Any] = {"pct": pct, "limit": limit, "contender": key}
                if pct is None:
                    head.update({"reference": True} if label == "reference" else {"limit_mib": limit // MIB})
                if key in failed_at and not args.no_skip:
                    rows.append({**head, "ok": False, "skipped": f"skipped (failed at {failed_at[key]})"})
                    continue
                child = {**spec, "contender": CONTENDER.get(key, key)}
                r = {**head, **runner.spawn_capped(child, Path(tmp), limit, args.timeout, name=key)}
                rows.append(r)
                if not r["ok"]:
                    failed_at.setdefault(key, at)
                for note in r.get("notes", []):
                    print(f"  {key} at {at}: {note}", flush=True)
                shown = f"{pct:3d} %" if pct is not None else "ref" if label == "reference" else "abs"
                decode = "" if bert else f"decode {report.num(r.get('decode_tps'), '.2f')} tok/s, "
                print(
                    f"  {limit / MIB:6.0f} MiB ({shown}) {key:10s} forward {report.num(r.get('forward_s'), '.3f')} s, "
                    f"{decode}charged {r['max_usage'] / MIB:.0f} MiB: {report.status(r)} ({r['seconds']:.0f} s)",
                    flush=True,
                )
                if r.get("memory_note"):
                    print(f"    {r['resident_bytes'] / MIB:.0f} MiB resident; {r['memory_note']}", flush=True)
                if predict is not None and key == "pylomin":
                    r["predicted"] = predict(r, max(0, limit - extra))
                    print(f"    predicted: {predict.line(r)}", flush=True)
    rows.sort(key=lambda r: (r["limit"], contenders.index(r["contender"])))
    guesses = ["predicted tok/s", "error"] if predict is not None else []
    header = ["limit MiB", "% of model", "contender", "forward s", *([] if bert else ["decode tok/s"]), *guesses]
    lines = []
    for r in rows:
        pct = "ref" if r.get("reference") else "abs" if r["pct"] is None else r["pct"]
        speeds = [report.num(r.get("forward_s"), ".3f")] + ([] if bert else [report.num(r.get("decode_tps"), ".2f")])
        guessed = [report.num(r.get("predicted", {}).get("tps"), ".2f"), Predictor.error(r)] if guesses else []
        charged = f"{r['max_usage'] / MIB:.0f}" if "max_usage" in r else "-"
        lines.append([f"{r['limit'] / MIB:.0f}", pct, r["contender"], *speeds, *guessed, charged, report.status(r)])
    align = "rrlr" + "r" * (not bert) + "rr" * bool(guesses) + "rl"
    print("\n" + report.table([*header, "charged MiB", "status"], align, lines))
    unit, rate = ("forward", "forwards/s") if bert else ("token", "tok/s")
    floor_lines = []
    for label, s in floors.items():
        limit = next(limit for lb, limit, _ in steps if lb == label)
        shown_label = label if not absolute else f"{label} %" if label.isdigit() else label
        floor_lines.append([shown_label, f"{limit / MIB:.0f}", f"{s:.3f}", f"{1 / s:.2f}" if s else "- (all fits)"])
    first = "limit" if absolute else "% of model"  # the percentage alone when every limit is one
    print("\n" + report.table([first, "limit MiB", f"floor s/{unit}", f"floor {rate}"], "rrrr", floor_lines))
    ref = next((r["tokens"] for r in rows if r["contender"] == "memory" and "tokens" in r), None)
    compared = [r for r in rows if ref and "tokens" in r]
    differ = [
        f"{r['contender']} at {where(r)}" for r in compared if r["tokens"] != ref and r["contender"] not in QUANTIZED
    ]
    agree = [
        f"{r['contender']} at {where(r)} {sum(a == b for a, b in zip(r['tokens'], ref, strict=True))}/{len(ref)}"
        for r in compared
        if r["contender"] in QUANTIZED
    ]
    what = f"forward s: the second 1 x {SEQ} forward (the first where the status says one forward)."
    if not bert:
        what += f" decode tok/s: greedy generate() of {NEW_TOKENS} from {PROMPT_TOKENS}, the tokens after the first."
    if predict is not None:
        what += f" predicted: pylomin.estimate for the defaults ({predict.how}); error: predicted / measured - 1."
    what += " charged: the cgroup's high-water mark over the child's life. floor: max(0, model"
    what += f"{' - word embeddings' if bert else ''} - (limit - allowance)) / {bandwidth / MIB:.0f} MiB/s per {unit}."
    if not bert and not ref:
        what += "\nno in-memory run finished: tokens not compared"
    elif not bert:
        same = "every generate() that finished gave the in-memory model's tokens"
        what += "\n" + (f"tokens that differ from the in-memory model's: {', '.join(differ)}" if differ else same)
    if agree:
        what += "\nquantized models' greedy tokens equal to the in-memory fp32 model's: " + ", ".join(agree)
    absolutes = ", or absolute (abs: the allowance not added; ref: plain transformers under 8 GiB)" if absolute else ""
    print(
        f"\nlimit: % of the model's {model_bytes / MIB:.0f} MiB + the {extra / MIB:.0f} MiB allowance{absolutes} "
        f"(cgroup, RAM + swap, page cache charged, dropped before each child). {what}",
        flush=True,
    )
    ratios = reference_ratios(rows) if reference else []
    if reference:
        print("\n" + "\n".join(ratios) if ratios else "\nno reference ratios: plain transformers under 8 GiB failed")
    dump = dict(model=model.name, kind=args.model, config=model.config, model_bytes=model_bytes, allowance=extra)
    dump.update(allowance_run=extra_run, bandwidth=bandwidth, cpus=os.cpu_count(), timeout=args.timeout, runs=rows)
    dump.update(command=" ".join(["python -m benchmarks.ladder", *sys.argv[1:]]), floors=floors)
    dump.update(dict(limits_mib=absolute, reference_ratios=ratios) if absolute else {})
    dump.update(dict(estimate=predict.figures) if predict is not None else {})
    # A smoke test never replaces the ladder's results.
    wrote = [OUT / f"bench_ladder{'_bert' * bert}{'_quick' * args.quick}.json"]
    wrote[0].write_text(json.dumps(dump, indent=1))
    if not args.no_png and not limits:
        print("no chart: the chart shows the percentage limits, and there are none")
    elif not args.no_png:
        name = "ladder-bert" if bert else "ladder"
        wrote.append(OUT / f"{name}-quick.png" if args.quick else ROOT / "docs" / f"{name}.png")
        report.ladder_chart(dump, LABELS, wrote[-1], SEQ)
    print(f"\nwrote {' and '.join(map(str, wrote))}; total {time.perf_counter() - t_start:.0f} s")
    return 0


class Predictor:
    """pylomin's speed estimate for its defaults at each limit: the disk the ladder's cold read, the compute a probe
    run here once (uncapped), the memory what the child read before loading (else the limit less the allowance)."""

    def __init__(self, folder: str, cls: str, bandwidth: float):
        import pylomin

        self.folder, self.cls, self.bandwidth = folder, f"transformers.{cls}", bandwidth
        self.context = PROMPT_TOKENS + NEW_TOKENS
        first = pylomin.estimate(folder, self.cls, memory=0, context=self.context, disk_bytes_per_s=bandwidth)
        self.compute_s = first.compute_s
        self.how = f"compute {self.compute_s:.3f} s per token: {first.notes[-1].removeprefix('compute: ')}"
        self.figures = {"compute_s": self.compute_s, "disk_bytes_per_s": bandwidth, "notes": list(first.notes)}
        print(f"speed estimate: {self.how}", flush=True)

    def __call__(self, r: dict[str, Any], beside_allowance: int) -> dict[str, Any]:
        """The estimate at the memory the child `r` read before loading, and at the limit less the allowance."""
        import pylomin

        given = dict(context=self.context, disk_bytes_per_s=self.bandwidth, compute_s=self.compute_s)
        e = pylomin.estimate(self.folder, self.cls, memory=r.get("available_seen", beside_allowance), **given)
        other = pylomin.estimate(self.folder, self.cls, memory=beside_allowance, **given)
        return {
            "memory": e.memory,
            "tps": e.tokens_per_s,
            "resident_bytes": e.resident_bytes,
            "read_per_token": e.read_per_token,
            "tps_beside_allowance": other.tokens_per_s,
        }

    @staticmethod
    def error(r: dict[str, Any]) -> str:
        """Predicted over measured tok/s, less 1, in %; "-" without both."""
        guess, measured = r.get("predicted", {}).get("tps"), r.get("decode_tps")
        return f"{guess / measured - 1:+.0%}" if guess and measured else "-"

    def line(self, r: dict[str, Any]) -> str:
        """The prediction for the child `r`, in words."""
        p = r["predicted"]
        return (
            f"{p['tps']:.2f} tok/s ({self.error(r)}) at {p['memory'] / MIB:.0f} MiB read by the child: "
            f"{p['resident_bytes'] / MIB:.0f} MiB resident, {p['read_per_token'] / MIB:.0f} MiB read per token; "
            f"at the limit less the allowance {p['tps_beside_allowance']:.2f} tok/s"
        )


def reference_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Each contender's forward time and charged memory at each absolute limit, over plain transformers' under 8 GiB."""
    ref = next((r for r in rows if r.get("reference") and r["ok"]), None)
    if ref is None:
        return []
    head = f"reference: plain transformers under {ref['limit'] / MIB:.0f} MiB, forward {ref['forward_s']:.3f} s, "
    return [head + f"charged {ref['max_usage'] / MIB:.0f} MiB"] + [
        f"{r['contender']} at {r['limit_mib']} MiB: forward {r['forward_s'] / ref['forward_s']:.2f}x the reference's, "
        f"charged {r['max_usage'] / ref['max_usage']:.2f}x"
        for r in rows
        if "limit_mib" in r and r["ok"]
    ]


if __name__ == "__main__":
    sys.exit(main())
