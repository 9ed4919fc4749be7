"""Compressed units against fp32: bytes read per cold forward, decode speed warm, cold and under a limit, accuracy.

The ladder's Llama (1426 MiB fp32) converted fp32, int8 and int4 (groups of 64; embeddings, norms and
the LM head fp32), and both again with the LM head quantized (`+head`). Each row a fresh child.
Warm: in memory (transformers, and quantized in memory with `pylomin.quantize_`) and pylomin's
defaults: a 1 x 128 forward (its logits against the in-memory fp32 model's: relative error), a greedy
generate() of 64 tokens (how many equal the reference's, where the first differs), then one of 32
from 16 (decode tok/s over the tokens after the first). Cold: pylomin with `memory_budget=0`, the unit
files evicted first: bytes read by load + one forward, decode tok/s. Under a limit (root): the page
cache dropped, pylomin's defaults under the allowance + 25 % of the fp32 model, the memory ladder's
run (16 tokens from 16). Prints the tables, writes bench-out/bench_quant.json. `--quick`: 28 MiB model.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.quant [--quick] [--no-limit]
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

import torch

from benchmarks.harness import cgroup, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.measure import TokenClock, evict, read_bytes
from benchmarks.harness.paths import MIB, OUT

SEQ, PROMPT, NEW, AGREE = 128, 16, 32, 64
SCHEMES = ("fp32", "int8", "int4", "int8+head", "int4+head")  # +head: --quantize-head too
WARM = [("memory", "fp32", "memory"), ("memory", "int8", "memory-int8"), ("memory", "int4", "memory-int4")]
WARM += [("pylomin", scheme, "default") for scheme in SCHEMES]  # (how, scheme, the harness's contender)


def measure(child: Child) -> None:
    """Load, a forward (logits, bytes read since the load began); warm: the agreement run; then the decode run."""
    r = child.result
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, child.vocab, (1, SEQ), generator=g)
    prompt = torch.randint(0, child.vocab, (1, PROMPT), generator=g)

    def generate(model: Any, n: int) -> tuple[list[int], dict[str, Any]]:
        clock = TokenClock()
        kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
        y = model.generate(prompt, streamer=clock, max_new_tokens=n, min_new_tokens=n, **kw)
        return y[0, PROMPT:].tolist(), clock.summary()

    read0 = read_bytes()
    with child.phase("load"):
        model = child.load()
    with child.phase("forward"):
        t0 = time.perf_counter()
        logits = model(x, use_cache=False).logits
        r.update(forward_s=time.perf_counter() - t0, forward_read=read_bytes() - read0)
    if child.spec["mode"] == "warm":
        with child.phase("agreement"):
            generate(model, 4)  # everything touched once
            r["tokens"], _ = generate(model, AGREE)
            child.save_tensor(logits)
    with child.phase("decode"):
        _, timing = generate(model, NEW)
        r.update(decode_tps=timing["decode_tps"], read_per_token=timing["read_per_token"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ladder's small Llama (smoke test)")
    p.add_argument("--no-limit", action="store_true", help="skip the runs under a cgroup limit")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    model = models.LLAMA_SMALL if args.quick else models.LLAMA
    spec = {**model.spec("block", *SCHEMES[1:]), "measure": "benchmarks.quant:measure"}
    spec["folders"]["fp32"] = spec["folders"]["block"]
    sizes = {s: models.nbytes(spec["folders"][s]) for s in SCHEMES}
    print(f"\n### {model.name}: {', '.join(f'{s} {sizes[s] / MIB:.0f} MiB' for s in SCHEMES)}; {os.cpu_count()} CPUs\n")
    OUT.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    limited: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quant-", dir=OUT) as tmp:
        work = Path(tmp)
        for how, scheme, contender in WARM:
            name = f"{how}-{scheme}-warm"
            child = {**spec, "contender": contender, "folder": scheme, "mode": "warm"}
            r = runner.spawn(child, work, name=name)
            r.update(how=how, scheme=scheme, mode="warm", seconds=r["wall_s"], logits=torch.load(work / f"{name}.pt"))
            rows.append(r)
            print(f"  warm {how:8s} {scheme}: decode {r['decode_tps']:.2f} tok/s ({r['seconds']:.0f} s)", flush=True)
        for scheme in SCHEMES:
            evict(models.unit_files(spec["folders"][scheme]))
            child = {**spec, "contender": "budget0", "folder": scheme, "mode": "cold"}
            r = runner.spawn(child, work, name=f"pylomin-{scheme}-cold")
            r.update(how="pylomin", scheme=scheme, mode="cold", seconds=r["wall_s"])
            rows.append(r)
            read = f"forward read {r['forward_read'] / MIB:.0f} MiB"
            print(
                f"  cold pylomin  {scheme}: {read}, decode {r['decode_tps']:.2f} tok/s ({r['seconds']:.0f} s)",
                flush=True,
            )
        why = "--no-limit" if args.no_limit else cgroup.unavailable()
        if why is None:
            extra, _ = runner.allowance(model.cls)
            limit = extra + sizes["fp32"] * 25 // 100
            ladder = dict(measure="benchmarks.harness.child:load_forward_generate", contender="default", seq=SEQ)
            ladder.update(prompt_tokens=16, new_tokens=16)
            for scheme in SCHEMES:
                child = {**spec, **ladder, "folder": scheme}
                r = runner.spawn_capped(child, work, limit, 600.0, name=f"limit-{scheme}")
                r.update(scheme=scheme, limit=limit, allowance=extra)
                limited.append(r)
                decode, charged = report.num(r.get("decode_tps"), ".2f"), f"{r['max_usage'] / MIB:.0f} MiB"
                print(
                    f"  limit {limit / MIB:.0f} MiB {scheme}: decode {decode} tok/s, charged {charged}: {report.status(r)}"
                )
        elif not args.no_limit:
            print(f"  no runs under a limit: {why}")

    ref = next(r for r in rows if r["how"] == "memory" and r["scheme"] == "fp32")
    lines = []
    for r in (r for r in rows if r["mode"] == "warm"):
        r["error"] = ((r["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
        r["agree"] = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=True))
        pairs = enumerate(zip(r["tokens"], ref["tokens"], strict=True))
        r["first_differs"] = next((i for i, (a, b) in pairs if a != b), None)
        lines.append([f"{r['how']} {r['scheme']}", f"{sizes[r['scheme']] / MIB:.0f} MiB", f"{r['decode_tps']:.2f}"])
        lines[-1] += [f"{r['decode_tps'] / ref['decode_tps']:.2f}x", f"{r['error']:.2e}", f"{r['agree']}/{AGREE}"]
        lines[-1].append("-" if r["first_differs"] is None else r["first_differs"])
    header = ["model", "bytes", "warm decode tok/s", "vs memory fp32", "logits rel. error", "greedy tokens equal"]
    print("\n" + report.table([*header, "first differs"], "lrrrrrr", lines))
    cold = {r["scheme"]: r for r in rows if r["mode"] == "cold"}
    lines = [
        [scheme, f"{r['forward_read'] / MIB:.0f} MiB", f"{r['forward_read'] / cold['fp32']['forward_read']:.2f}x"]
        + [f"{r['decode_tps']:.2f}", f"{r['decode_tps'] / cold['fp32']['decode_tps']:.2f}x"]
        for scheme, r in cold.items()
    ]
    header = ["pylomin, cold (memory_budget=0)", "bytes read, one forward", "vs fp32", "decode tok/s", "vs fp32"]
    print("\n" + report.table(header, "lrrrr", lines))
    if limited:
        base = limited[0]  # fp32
        lines = [
            [r["scheme"], report.num(r.get("decode_tps"), ".2f")]
            + [f"{r['decode_tps'] / base['decode_tps']:.2f}x" if "decode_tps" in r and "decode_tps" in base else "-"]
            + [f"{r['max_usage'] / MIB:.0f}", report.status(r)]
            for r in limited
        ]
        what = f"pylomin, no options, under {limited[0]['limit'] / MIB:.0f} MiB (allowance + 25 % of fp32)"
        print("\n" + report.table([what, "decode tok/s", "vs fp32", "charged MiB", "status"], "lrrrl", lines))
    for r in rows:
        r.pop("logits", None)
    dump = {"model": model.name, "sizes": sizes, "rows": rows, "limited": limited, "command": " ".join(sys.argv)}
    (OUT / "bench_quant.json").write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {OUT / 'bench_quant.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
