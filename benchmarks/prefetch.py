"""Prefetching and memory budgets, measured: streamed latency against compute and disk, and generation speed.

Part A, the 1.6 GiB BERT at batch 1 x 128 and 8 x 128: the in-memory compute time, then the model
streamed (`memory_budget=0`) with `prefetch=0` and with the default prefetch, warm (page cache kept)
and cold (every unit file evicted before each timed forward, `drop_page_cache=True`); median of the
timed forwards after a warm-up; ratio: warm over compute, cold over max(compute, the I/O floor: the
bytes a forward reads at the disk's cold read bandwidth, measured in the same run); the peak RSS per
forward (above the RSS before it) within its bound: the parameters in flight (prefetch=0: the 2
largest streamed units; prefetch=2: min(prefetch_bytes, the 2 largest) + the largest) + the in-memory
row's peak per forward (activations).
Part B, a GPT-2-large-sized decoder: greedy generate() of 32 tokens, in memory and streamed with
`memory_budget` = 0, 25 %, 50 %, 100 % of the parameters (page cache kept).
Each contender in a fresh process. `--quick`: small models (under a minute).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.prefetch [--quick] [--skip-gpt2] [--skip-bert]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import pylomin
from benchmarks.harness import internals, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.measure import cold_read_bandwidth, evict
from benchmarks.harness.paths import MIB, OUT

SEQ = 128
BATCHES = (1, 8)
PROMPT_TOKENS = NEW_TOKENS = 32
PREFETCH_BYTES = 256 * MIB  # load_streaming's default `prefetch_bytes`
BUDGETS = (0, 25, 50, 100)  # % of the parameters: the harness's contenders kept0 ... kept100


def forwards(child: Child) -> None:
    """Part A: median latency and max peak RSS (above the RSS before each) of the timed forwards, after a
    warm-up; in memory, or streamed warm then cold (a fresh model each)."""
    spec, r = child.spec, child.result
    torch.manual_seed(0)
    x = torch.randint(0, child.vocab, (spec["batch"], SEQ))

    def timed(model: Any, before: Any = None) -> dict[str, float]:
        model(x)
        times, peaks = [], []
        for _ in range(spec["runs"]):
            if before is not None:
                before()
            with internals.peak_rss(0.01) as p:  # the peak total from the kernel's high-water mark; rare samples
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            peaks.append(p.total)
        return {"latency": report.median(times), "peak": max(peaks)}

    if child.contender.how == "memory":
        with child.phase("memory"):
            r["memory"] = timed(child.load())
        return
    files = child.files()
    for cache in ("warm", "cold"):
        with child.phase(cache):
            evict(files)
            model = child.load(drop=cache == "cold")
            r[cache] = timed(model, (lambda: evict(files)) if cache == "cold" else None)
            pylomin.unload_(model)
            del model
            gc.collect()


def generate(child: Child) -> None:
    """Part B: tokens/s of the timed generate() calls after a 2-token warm-up, the peak RSS above the RSS
    before the model was loaded (resident weights count), the tokens."""
    r = child.result
    torch.manual_seed(0)
    prompt = torch.randint(0, child.vocab, (1, PROMPT_TOKENS))
    base = internals.rss()
    with child.phase("load"):
        model = child.load()
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    times, peak, tokens = [], 0, []
    with child.phase("generate"):
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw)  # kernels, the prefetch order
        for _ in range(child.spec["runs"]):
            with internals.peak_rss(0.01) as p:
                t0 = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kw)
                times.append(time.perf_counter() - t0)
            peak = max(peak, (p.start - base).total + p.total)
            tokens = out[0, PROMPT_TOKENS:].tolist()
        r.update(tokens_per_s=len(tokens) / report.median(times), peak=peak, tokens=tokens)


def part_a(model: models.Model, runs: int, work: Path) -> None:
    spec = {**model.spec("block"), "measure": "benchmarks.prefetch:forwards", "runs": runs}
    folder = spec["folders"]["block"]
    units = internals.manifest(folder).units
    streamed = sorted((u.nbytes for u in units if not u.name.endswith("word_embeddings")), reverse=True)
    window = min(PREFETCH_BYTES, sum(streamed[:2]))  # (row, contender, bound: the parameters that may be in flight)
    variants = [("prefetch=0", "prefetch0", 2 * streamed[0]), ("prefetch=2 (default)", "stream", window + streamed[0])]
    needed, bandwidth = models.forward_bytes(folder), cold_read_bandwidth(models.unit_files(folder))
    floor = needed / bandwidth
    print(f"\n## Part A: {model.name}, input batch x {SEQ} tokens, {os.cpu_count()} CPUs, median of {runs} forwards\n")
    print(f"cold sequential read of the unit files: {bandwidth / MIB:.0f} MiB/s (median of 3)")
    print(f"bytes a forward reads (all but the word embeddings): {needed / MIB:.0f} MiB -> I/O floor {floor:.3f} s\n")
    header = ["batch", "variant", "cache", "latency s", "ratio", "target", "peak RSS per forward MiB", "bound MiB"]
    print(report.table([*header, "within"], "rllrrlrrc", []))
    for batch in BATCHES:
        mem = runner.spawn({**spec, "contender": "memory", "batch": batch}, work)["memory"]
        compute = mem["latency"]
        print(f"| {batch} | in memory | - | {compute:.3f} | 1.00 | - | {mem['peak'] / MIB:.0f} | - | - |", flush=True)
        for label, contender, bound in variants:
            res = runner.spawn({**spec, "contender": contender, "batch": batch}, work)
            for cache, limit, ref in (("warm", 1.10, compute), ("cold", 1.15, max(compute, floor))):
                r, most = res[cache], bound + mem["peak"]  # parameters in flight + the activations in memory needs
                ratio = r["latency"] / ref
                target = f"≤ {limit:.2f} {'ok' if ratio <= limit else 'MISSED'}"
                within = "yes" if r["peak"] <= most else "NO"
                cells = [batch, label, cache, f"{r['latency']:.3f}", f"{ratio:.2f}", target, f"{r['peak'] / MIB:.0f}"]
                print("| " + " | ".join(map(str, [*cells, f"{most / MIB:.0f}", within])) + " |", flush=True)
    print("\nratio: cold over max(in memory, I/O floor); bound: what prefetch may hold + in memory's peak; --help")


def part_b(model: models.Model, runs: int, work: Path) -> None:
    spec = {**model.spec("block"), "measure": "benchmarks.prefetch:generate", "runs": runs}
    total = models.nbytes(spec["folders"]["block"])
    print(f"\n## Part B: {model.name}, {total / 2**30:.2f} GiB fp32; greedy generate() of {NEW_TOKENS} tokens\n")
    ref = runner.spawn({**spec, "contender": "memory"}, work)
    print(report.table(["budget", "tokens/s", "vs in memory", "peak RSS MiB", "identical"], "lrrrc", []))
    print(f"| in memory (transformers) | {ref['tokens_per_s']:.2f} | 1.00 | {ref['peak'] / MIB:.0f} | - |", flush=True)
    for pct in BUDGETS:
        budget = int(total * (pct / 100))
        r = runner.spawn({**spec, "contender": f"kept{pct}"}, work)
        label = f"{pct}% ({budget / MIB:.0f} MiB)" if budget else "0 (everything streams)"
        same = "yes" if r["tokens"] == ref["tokens"] else "NO"
        cells = [label, f"{r['tokens_per_s']:.2f}", f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}"]
        print("| " + " | ".join([*cells, f"{r['peak'] / MIB:.0f}", same]) + " |", flush=True)
    print(
        f"\ntokens/s: {NEW_TOKENS} tokens over the median of {runs} generate() calls; peak RSS: above the RSS before loading"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small BERT and GPT-2 (under a minute)")
    p.add_argument("--runs", type=int, default=3, help="timed forwards / generate() calls per contender")
    p.add_argument("--skip-gpt2", action="store_true", help="skip Part B")
    p.add_argument("--skip-bert", action="store_true", help="skip Part A")
    args = p.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="prefetch-", dir=OUT) as tmp:
        if not args.skip_bert:
            part_a(models.BERT_SMALL if args.quick else models.BERT, args.runs, Path(tmp))
        if not args.skip_gpt2:
            part_b(models.GPT2_SMALL if args.quick else models.GPT2_LARGE, args.runs, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
