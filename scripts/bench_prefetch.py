"""Prefetching and memory budgets, measured: streamed latency against compute and disk, and generation speed.

Part A, the 1.6 GiB BERT at batch 1 x 128 and 8 x 128: in-memory compute time, then the streamed
model with `prefetch=0` and with the default prefetch, warm (`drop_page_cache=False`) and cold
(every unit file evicted from the page cache before each timed forward). A cold forward cannot beat
max(compute, bytes it needs / disk bandwidth); the bandwidth is measured in the same run.

Part B, a GPT-2-large-sized decoder (~3 GB fp32, random weights): greedy `generate()` of 32 tokens,
in memory and streamed with `memory_budget` = 0, 25 %, 50 %, 100 % of the parameters.

Each contender runs in a fresh process. `--quick` swaps in small models (under a minute).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ENV,
    GPT2_LARGE,
    GPT2_SMALL,
    MIB,
    MODELS,
    benchmark_bert,
    cold_read_bandwidth,
    ensure_converted,
    ensure_gpt2,
    evict,
    forward_bytes,
    unit_files,
)

SEQ = 128
BATCHES = (1, 8)
PROMPT_TOKENS = NEW_TOKENS = 32
PREFETCH_BYTES = 256 * MIB  # load_streaming's default `prefetch_bytes`
BUDGETS = (0.0, 0.25, 0.5, 1.0)


def stream_bounds(folder: Path) -> tuple[int, int, int]:
    """(bytes a forward reads, bound with prefetch=0, bound with the default prefetch) for `folder`."""
    from pylomin import manifest

    m = manifest.read(folder)
    streamed = sorted((u.nbytes for u in m.units if not u.name.endswith("word_embeddings")), reverse=True)
    largest = streamed[0]
    return forward_bytes(folder), 2 * largest, min(PREFETCH_BYTES, sum(streamed[:2])) + largest


# --- children -----------------------------------------------------------------------------------------


def _timed(model: Any, x: Any, runs: int, before: Callable[[], None] | None = None) -> tuple[float, int]:
    """Median latency and max peak RSS (above entry) over `runs` forwards after one warm-up."""
    import torch

    from pylomin.memory import PeakRss

    with torch.no_grad():
        model(x)
        times, peaks = [], []
        for _ in range(runs):
            if before is not None:
                before()
            with PeakRss(interval=0.01) as p:  # peak total from the kernel's high-water mark; rare samples
                t0 = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t0)
            peaks.append(p.total)
    return statistics.median(times), max(peaks)


def bert_child(kind: str, src: Path, folder: Path, batch: int, prefetch: int, runs: int) -> dict[str, Any]:
    import torch
    import transformers

    import pylomin

    transformers.logging.set_verbosity_error()
    transformers.BertModel  # noqa: B018  (resolve the lazy import before measuring)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (batch, SEQ))
    if kind == "memory":
        model = transformers.BertModel.from_pretrained(src, dtype=torch.float32).eval()
        latency, peak = _timed(model, x, runs)
        return {"memory": {"latency": latency, "peak": peak}}
    files = unit_files(folder)
    result = {}
    for cache in ("warm", "cold"):
        cold = cache == "cold"
        evict(files)
        model = pylomin.load_streaming(
            folder, transformers.BertModel, drop_page_cache=cold, prefetch=prefetch, memory_budget=0
        )
        latency, peak = _timed(model, x, runs, before=(lambda: evict(files)) if cold else None)
        pylomin.unload_(model)
        del model
        gc.collect()
        result[cache] = {"latency": latency, "peak": peak}
    return result


def gpt2_child(src: Path, folder: Path, budget: int | None, runs: int) -> dict[str, Any]:
    import torch
    import transformers

    import pylomin
    from pylomin.memory import PeakRss, rss

    transformers.logging.set_verbosity_error()
    transformers.GPT2LMHeadModel  # noqa: B018
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    prompt = torch.randint(0, vocab, (1, PROMPT_TOKENS))
    base = rss()
    if budget is None:
        model = transformers.GPT2LMHeadModel.from_pretrained(src, dtype=torch.float32).eval()
    else:
        model = pylomin.load_streaming(
            folder, transformers.GPT2LMHeadModel, drop_page_cache=False, memory_budget=budget
        )
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    times, peak, tokens = [], 0, None
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up: kernels, prefetch order
        for _ in range(runs):
            with PeakRss(interval=0.01) as p:
                t0 = time.perf_counter()
                out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **kw)
                times.append(time.perf_counter() - t0)
            peak = max(peak, (p.start - base).total + p.total)
            tokens = out[0, PROMPT_TOKENS:].tolist()
    assert tokens is not None
    return {"tokens_per_s": len(tokens) / statistics.median(times), "peak": peak, "tokens": tokens}


# --- parent -------------------------------------------------------------------------------------------


def spawn(*args: str) -> dict[str, Any]:
    res = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=ENV)
    if res.returncode != 0:
        raise SystemExit(f"child {' '.join(args)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def part_a(src: Path, runs: int) -> None:
    folder = ensure_converted(src, MODELS / f"{src.name}-pylomin-block")
    files = unit_files(folder)
    needed, bound0, bound2 = stream_bounds(folder)
    bandwidth = cold_read_bandwidth(files)
    floor = needed / bandwidth
    print(f"\n## Part A: {src.name}, input batch x {SEQ} tokens, {os.cpu_count()} CPUs, median of {runs} forwards\n")
    print(f"cold sequential read of the unit files: {bandwidth / MIB:.0f} MiB/s (median of 3)")
    print(f"bytes a forward reads (all but the word embeddings): {needed / MIB:.0f} MiB -> I/O floor {floor:.3f} s\n")
    print("| batch | variant | cache | latency s | ratio | target | peak RSS per forward MiB | bound MiB | within |")
    print("|---:|---|---|---:|---:|---|---:|---:|:---:|")
    for batch in BATCHES:
        common = ["--src", str(src), "--folder", str(folder), "--batch", str(batch), "--runs", str(runs)]
        mem = spawn("--child", "bert", "memory", *common)["memory"]
        compute = mem["latency"]
        print(f"| {batch} | in memory | - | {compute:.3f} | 1.00 | - | {mem['peak'] / MIB:.0f} | - | - |", flush=True)
        for label, prefetch, bound in (("prefetch=0", 0, bound0), ("prefetch=2 (default)", 2, bound2)):
            res = spawn("--child", "bert", "stream", *common, "--prefetch", str(prefetch))
            for cache, limit, ref in (("warm", 1.10, compute), ("cold", 1.15, max(compute, floor))):
                r = res[cache]
                ratio = r["latency"] / ref
                target = f"≤ {limit:.2f} {'ok' if ratio <= limit else 'MISSED'}"
                limit_bytes = bound + mem["peak"]  # parameters in flight + the activations in-memory needs
                print(
                    f"| {batch} | {label} | {cache} | {r['latency']:.3f} | {ratio:.2f} | {target} | "
                    f"{r['peak'] / MIB:.0f} | {limit_bytes / MIB:.0f} | {'yes' if r['peak'] <= limit_bytes else 'NO'} |",
                    flush=True,
                )
    print(
        "\nratio: warm = latency / in-memory latency; cold = latency / max(in-memory latency, I/O floor).\n"
        "peak RSS per forward: max over the timed forwards of the peak above the RSS before the forward.\n"
        "bound: prefetch=0 -> 2 largest streamed units; prefetch=2 -> min(prefetch_bytes, 2 largest streamed "
        "units) + 1 largest (the word embeddings are never read ahead, so not counted), plus the activations: "
        "the in-memory row's peak per forward."
    )


def part_b(config: dict[str, int], name: str, runs: int) -> None:
    src = ensure_gpt2(config, name)
    folder = ensure_converted(src, MODELS / f"{name}-pylomin")
    from pylomin import manifest

    total = manifest.read(folder).nbytes
    print(f"\n## Part B: {name}, {total / 2**30:.2f} GiB fp32; greedy generate() of {NEW_TOKENS} tokens\n")
    common = ["--src", str(src), "--folder", str(folder), "--runs", str(runs)]
    ref = spawn("--child", "gpt2", *common)
    print("| budget | tokens/s | vs in memory | peak RSS MiB | identical |")
    print("|---|---:|---:|---:|:---:|")
    print(f"| in memory (transformers) | {ref['tokens_per_s']:.2f} | 1.00 | {ref['peak'] / MIB:.0f} | - |", flush=True)
    for frac in BUDGETS:
        budget = int(total * frac)
        r = spawn("--child", "gpt2", *common, "--budget", str(budget))
        label = f"{frac:.0%} ({budget / MIB:.0f} MiB)" if budget else "0 (everything streams)"
        print(
            f"| {label} | {r['tokens_per_s']:.2f} | {r['tokens_per_s'] / ref['tokens_per_s']:.2f} | "
            f"{r['peak'] / MIB:.0f} | {'yes' if r['tokens'] == ref['tokens'] else 'NO'} |",
            flush=True,
        )
    print(
        f"\ntokens/s: {NEW_TOKENS} new tokens / median time of {runs} generate() calls after a 2-token warm-up; "
        "streamed with drop_page_cache=False.\npeak RSS: highest resident set during generate(), above the RSS "
        "before the model was loaded (so resident weights count)."
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small BERT and GPT-2 (under a minute)")
    p.add_argument("--runs", type=int, default=3, help="timed forwards / generate() calls per contender")
    p.add_argument("--skip-gpt2", action="store_true", help="skip Part B")
    p.add_argument("--skip-bert", action="store_true", help="skip Part A")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--prefetch", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child[0] == "bert":
            res = bert_child(args.child[1], args.src, args.folder, args.batch, args.prefetch, args.runs)
        else:
            res = gpt2_child(args.src, args.folder, args.budget, args.runs)
        print(json.dumps(res))
        return 0
    if not args.skip_bert:
        src = benchmark_bert(args.quick)
        part_a(src, args.runs)
    if not args.skip_gpt2:
        if args.quick:
            part_b(GPT2_SMALL, "gpt2-small-random", args.runs)
        else:
            part_b(GPT2_LARGE, "gpt2-large-random", args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
