"""Mixture-of-experts decoding: per-expert paging, int4 experts, per-layer paging, accelerate, in memory.

Contenders: in memory (and quantized in memory), accelerate, per-layer paging, per-expert paging that waits
for each router or guesses ahead (the default), int4 experts (with and without the LM head quantized),
expert caches of 25 / 50 %, and the defaults. Two random models, each ~0.9 GB fp32, 8 layers:
Mixtral-shaped (8 experts of 10.5 MiB, top-2) and Qwen3-MoE-shaped (64 experts of 1.5 MiB, top-8: many small reads). Greedy generate() of 32 tokens from
a fixed 16-token prompt. Each contender in a fresh process: its files evicted after loading, one
generate() (cold), then another (warm; pylomin's profiled: the share of guessed experts the router
then chose). Per token, a streamer records the time and /proc/self/io read_bytes: prefill, decode tok/s
after the first token, bytes read per decode token against the bytes a token uses (the fp32 manifest:
all but the experts and the embedding table, one embedding row, top-k / experts of the experts):
read/used. Tokens must equal the in-memory model's (int4: the in-memory int4 model's). In the parent,
the runtime's own expert reads (`Store.read_exactly` of the experts random tokens choose, a layer at a
time, cold) against a cold sequential read of the same files. Then the capped contenders under a
cgroup limit of half the model + 300 MiB (page cache dropped), one cold generate(). Random weights
route uniformly: guess accuracy and hit rates on trained routing are `benchmarks.routing`'s.
Writes bench-out/bench_moe.json. `--quick`: 2 layers, 8000-token vocabulary.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.moe [--model mixtral,qwen3] [--quick] [--only per-expert,dense]
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

import pylomin
from benchmarks.harness import cgroup, internals, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.measure import TokenClock, cold_read_bandwidth, evict
from benchmarks.harness.paths import MIB, OUT

PROMPT_TOKENS, NEW_TOKENS = 16, 32
CAP_BASE = 300 * MIB  # the interpreter, torch and transformers under the cap, on top of half the model
CONTENDERS = {  # the table's name: the harness's contender
    "memory": "memory",  # transformers from_pretrained
    "memory-int4": "memory-int4",  # ... then pylomin.quantize_(model, "int4"): the int4 rows' reference
    "accelerate": "accelerate",  # accelerate's disk offload
    "dense": "budget0-dense",  # memory_budget=0, a layer's experts read whole with it (expert_paging=False)
    "waits": "budget0-unguessed",  # memory_budget=0, each layer's experts read once its router chose
    "per-expert": "budget0",  # memory_budget=0: experts guessed from the layer before and read ahead
    "int4": "budget0-int4",  # the int4 conversion (experts too), memory_budget=0
    "int4-head": "budget0-int4-head",  # ... with the LM head quantized too (--quantize-head), memory_budget=0
    "cache-25": "share25",  # memory_budget = 25 % of the model
    "cache-50": "share50",
    "default": "default",  # no options
}
CAPPED = ("memory", "accelerate", "dense", "per-expert", "int4", "default")
MODELS = {"mixtral": (models.MIXTRAL, models.MIXTRAL_SMALL), "qwen3": (models.QWEN3_MOE, models.QWEN3_MOE_SMALL)}
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


def measure(child: Child) -> None:
    """Load, evict, generate cold; unless `capped`, generate again warm (profiled for pylomin)."""
    r = child.result
    prompt = torch.randint(0, child.vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    kw.update(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    with child.phase("load"):
        model = child.load()
    with child.phase("cold"):
        evict(child.files())
        clock = TokenClock()
        r["tokens"] = model.generate(prompt, streamer=clock, **kw)[0, PROMPT_TOKENS:].tolist()
        r["cold"] = clock.summary()
    if child.spec.get("capped"):
        return
    with child.phase("warm"):
        clock = TokenClock()
        if child.contender.how == "pylomin":
            with pylomin.profile(model) as prof:
                out = model.generate(prompt, streamer=clock, **kw)
            r.update(verdict=prof.verdict(), profile=prof.totals())
        else:
            out = model.generate(prompt, streamer=clock, **kw)
        r.update(warm=clock.summary(), warm_tokens=out[0, PROMPT_TOKENS:].tolist())


def token_bytes(folder: str, top_k: int, experts: int) -> tuple[int, int, int]:
    """(bytes of the model, bytes a decode token uses, bytes it uses with every expert) from the manifest."""
    m = internals.manifest(folder)
    used = dense = 0
    for unit in m.units:
        for name, info in unit.tensors.items():
            if name.endswith("embed_tokens.weight"):
                used += info.shape[-1] * 4  # one row of the fp32 table per token
            elif name.endswith(EXPERT_TENSORS):
                used += info.length * top_k // experts
                dense += info.length
            else:
                used += info.length
                dense += info.length
    return m.nbytes, used, dense


def expert_reads(folder: str, top_k: int, experts: int, tokens: int = 8) -> float:
    """Bytes/second of the runtime's own expert reads, cold: for `tokens` random tokens, each layer's top-k
    experts read with `Store.read_exactly` (all of a layer's ranges in one call, as an experts module does)."""
    Store, _, _ = internals.staging()
    m = internals.manifest(folder)
    layers: dict[str, list[str]] = {}  # experts module -> its fused tensors
    for n in (n for u in m.units for n in u.tensors if n.endswith(EXPERT_TENSORS)):
        layers.setdefault(n.rsplit(".", 1)[0], []).append(n)
    g = torch.Generator().manual_seed(0)
    total, seconds = 0, 0.0
    with Store(folder, m, drop_page_cache=True) as store:
        for _ in range(tokens):
            evict(models.unit_files(folder))
            for names in layers.values():
                chosen = sorted(torch.randperm(experts, generator=g)[:top_k].tolist())
                ranges = []
                for name in names:
                    file, offset, length = store.location(name)
                    stride = length // experts
                    ranges += internals.expert_ranges(file, offset, stride, experts, chosen)
                t0 = time.perf_counter()
                store.read_exactly(ranges)
                seconds += time.perf_counter() - t0
                total += sum(r[2] for r in ranges)
                for r in ranges:
                    store.release(r)
    return total / seconds


def table(rows: dict[str, dict[str, Any]], used: int) -> str:
    lines = []
    for key, r in rows.items():
        quantized = key.startswith(("int4", "memory-int4"))
        ref = rows.get("memory-int4" if quantized else "memory", {}).get("tokens") if key != "int4-head" else None
        cold, warm = r["cold"], r["warm"]
        cells = [f"{cold['prefill_s']:.2f}", f"{cold['decode_tps']:.2f}", f"{warm['decode_tps']:.2f}"]
        cells += [f"{cold['read_per_token'] / MIB:.1f}", f"{cold['read_per_token'] / used:.2f}"]
        prof = r.get("profile") or {}
        guessed = prof.get("expert_guessed_bytes", 0.0)
        cells.append(f"{1 - prof['expert_wasted_bytes'] / guessed:.0%}" if guessed else "-")
        cap = r.get("capped") or {}
        capped = f"{cap['reason']} ({cap['seconds']:.0f} s)" if cap and not cap["ok"] else "-"
        capped = f"{cap['cold']['decode_tps']:.2f}" if cap.get("ok") else capped
        outputs = [r.get("tokens"), r.get("warm_tokens"), cap.get("tokens")]
        same = "ok" if all(o == ref for o in outputs if o is not None) else "DIFFERENT"
        lines.append([key, *cells, capped, "-" if key.startswith("memory") or ref is None else same])
    header = ["contender", "cold prefill s", "cold decode tok/s", "warm decode tok/s", "read MiB/token (cold)"]
    header += ["read/used", "guesses chosen", "capped decode tok/s", "same tokens"]
    return report.table(header, "lrrrrrrrc", lines)


def ratios(rows: dict[str, dict[str, Any]], used: int, reads: float, bandwidth: float, many: bool) -> list[str]:
    def cold(key: str, field: str = "decode_tps") -> float:
        return float(rows[key]["cold"][field]) if "cold" in rows.get(key, {}) else float("nan")

    def line(what: str, x: float, target: float, higher: bool = True) -> str:
        ok = "-" if x != x else "ok" if (x >= target if higher else x <= target) else "MISSED"
        return f"{what}: {x:.2f} (target {'>=' if higher else '<='} {target:g}: {ok})"

    lines = [
        line("cold decode per-expert / dense (whole layers)", cold("per-expert") / cold("dense"), 3.0),
        line("cold decode per-expert / waits (no guessing)", cold("per-expert") / cold("waits"), 1.3),
        line("cold decode per-expert / accelerate", cold("per-expert") / cold("accelerate"), 5.0),
        line(
            "int4 bytes per token / per-expert's",
            cold("int4", "read_per_token") / cold("per-expert", "read_per_token"),
            0.25,
            False,
        ),
        line("cold decode int4 / per-expert", cold("int4") / cold("per-expert"), 3.0),
        line("read/used, per-expert (cold)", cold("per-expert", "read_per_token") / used, 1.2, False),
    ]
    if many:
        lines.append(line("expert reads / cold sequential read", reads / bandwidth, 0.8))
    return lines


def run_model(name: str, model: models.Model, contenders: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Every contender on one model; prints its table and returns what bench_moe.json keeps of it."""
    spec = {**model.spec("block", "int4", "int4+head"), "measure": "benchmarks.moe:measure"}
    folder = spec["folders"]["block"]
    top_k = model.config["num_experts_per_tok"]
    experts = model.config.get("num_local_experts") or model.config["num_experts"]
    total, used, dense = token_bytes(folder, top_k, experts)
    bandwidth = cold_read_bandwidth(models.unit_files(folder))
    reads = expert_reads(folder, top_k, experts)
    limit = total // 2 + CAP_BASE
    cap_note = "--no-caps" if args.no_caps else cgroup.unavailable()
    print(
        f"\n### {model.name}: {total / MIB:.0f} MiB fp32, generate() {NEW_TOKENS} from {PROMPT_TOKENS}, batch 1\n\n"
        f"{os.cpu_count()} CPUs; cold sequential read of the unit files {bandwidth / MIB:.0f} MiB/s; the runtime's "
        f"cold expert reads (top-{top_k} of {experts}, a layer at a time) {reads / MIB:.0f} MiB/s\na decode token "
        f"uses {used / MIB:.1f} MiB (I/O floor {bandwidth / used:.2f} tok/s cold); "
        f"with every expert (dense) {dense / MIB:.1f} MiB ({bandwidth / dense:.2f} tok/s)\n",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for key in contenders:
            r = rows[key] = runner.spawn({**spec, "contender": CONTENDERS[key]}, Path(tmp), name=key)
            for note in r["notes"]:
                print(f"  {key}: {note}", flush=True)
            tps = f"cold {r['cold']['decode_tps']:.2f} tok/s, warm {r['warm']['decode_tps']:.2f} tok/s"
            print(f"  {key}: {tps} ({r['wall_s']:.0f} s)" + (f"; warm: {r['verdict']}" if "verdict" in r else ""))
        capped = [k for k in CAPPED if k in contenders]
        if capped and cap_note is not None:
            print(f"  capped runs: skipped ({cap_note})", flush=True)
        for key in capped if cap_note is None else ():
            timeout = min(args.cap_timeout, 60 + 10 * rows[key]["wall_s"])
            child = {**spec, "contender": CONTENDERS[key], "capped": True}
            r = rows[key]["capped"] = runner.spawn_capped(child, Path(tmp), limit, timeout, name=key)
            result = f"{r['cold']['decode_tps']:.2f} tok/s" if r["ok"] else r["reason"]
            print(f"  {key} capped at {limit / MIB:.0f} MiB: {result} ({r['seconds']:.0f} s)", flush=True)
    print(f"\n{table(rows, used)}\n\n" + "\n".join(ratios(rows, used, reads, bandwidth, experts > 8)))
    print(
        f"\nread/used: over the {used / MIB:.1f} MiB a decode token uses; guesses chosen: of the experts read ahead "
        f"on a guess (warm run, random weights); capped: under {limit / MIB:.0f} MiB; --help"
    )
    dump = dict(model=model.name, config=model.config, model_bytes=total, used_bytes=used, dense_bytes=dense)
    dump.update(bandwidth=bandwidth, expert_reads=reads, cap=limit if cap_note is None else cap_note, rows=rows)
    return dump


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=",".join(MODELS), help=f"comma-separated subset of {list(MODELS)}")
    p.add_argument("--quick", action="store_true", help="2 layers and an 8000-token vocabulary (smoke test)")
    p.add_argument("--only", help=f"comma-separated subset of {list(CONTENDERS)}")
    p.add_argument("--no-caps", action="store_true", help="skip the capped runs")
    p.add_argument("--cap-timeout", type=float, default=900.0, help="most seconds a capped run may take")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    contenders = [c.strip() for c in (args.only or ",".join(CONTENDERS)).split(",") if c.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    names = [n.strip() for n in args.model.split(",") if n.strip()]
    if unknown := set(names) - set(MODELS):
        p.error(f"unknown models {sorted(unknown)}; choose from {list(MODELS)}")
    dumps = {name: run_model(name, MODELS[name][int(args.quick)], contenders, args) for name in names}
    (OUT / "bench_moe.json").write_text(json.dumps(dumps, indent=1))
    print(f"\nwrote {OUT / 'bench_moe.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
