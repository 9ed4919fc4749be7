"""Mixture-of-experts decoding: per-expert paging against per-layer paging, accelerate and the in-memory model.

A random Mixtral (~830 MiB fp32: 8 layers, 8 experts, top-2), greedy generate() of 32 tokens from a
fixed 16-token prompt. Each contender in a fresh process: its files evicted after loading, one
generate() (cold), then another (warm; pylomin's profiled). Per token, a streamer records the time and
/proc/self/io read_bytes: prefill, decode tok/s after the first token, bytes read per decode token
against the bytes a token uses (the manifest: all but the experts and the embedding table, one
embedding row, top-k / experts of the experts): read/used. Tokens must equal the in-memory model's. Then six
contenders under a cgroup limit of half the model + 300 MiB (page cache dropped), one cold
generate(). Writes bench-out/bench_moe.json. `--quick`: 2 layers.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.moe [--quick] [--only per-expert,dense]
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
    "accelerate": "accelerate",  # accelerate's disk offload
    "dense": "budget0-dense",  # memory_budget=0, a layer's experts read whole with it (expert_paging=False)
    "per-expert": "budget0",  # memory_budget=0
    "cache-25": "share25",  # memory_budget = 25 % of the model
    "cache-50": "share50",
    "default": "default",  # no options
}
CAPPED = ("memory", "accelerate", "dense", "per-expert", "cache-25", "default")
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


def table(rows: dict[str, dict[str, Any]], used: int) -> str:
    ref = rows.get("memory", {}).get("tokens")
    lines = []
    for key, r in rows.items():
        cold, warm = r["cold"], r["warm"]
        cells = [f"{cold['prefill_s']:.2f}", f"{cold['decode_tps']:.2f}", f"{warm['decode_tps']:.2f}"]
        cells += [f"{cold['read_per_token'] / MIB:.1f}", f"{cold['read_per_token'] / used:.2f}"]
        cap = r.get("capped") or {}
        capped = f"{cap['reason']} ({cap['seconds']:.0f} s)" if cap and not cap["ok"] else "-"
        capped = f"{cap['cold']['decode_tps']:.2f}" if cap.get("ok") else capped
        outputs = [r.get("tokens"), r.get("warm_tokens"), cap.get("tokens")]
        same = "ok" if all(o == ref for o in outputs if o is not None) else "DIFFERENT"
        lines.append([key, *cells, capped, "-" if key == "memory" or ref is None else same])
    header = ["contender", "cold prefill s", "cold decode tok/s", "warm decode tok/s", "read MiB/token (cold)"]
    return report.table([*header, "read/used", "capped decode tok/s", "same tokens"], "lrrrrrrc", lines)


def ratios(rows: dict[str, dict[str, Any]], used: int) -> list[str]:
    def cold(key: str, field: str = "decode_tps") -> float:
        return rows[key]["cold"][field] if "cold" in rows.get(key, {}) else float("nan")

    def ok(value: float, target: float, higher: bool) -> str:
        return "-" if value != value else "ok" if (value >= target if higher else value <= target) else "MISSED"

    lines = []
    for other, target in (("dense", 2.5), ("accelerate", 5.0)):
        x = cold("per-expert") / cold(other)
        lines.append(f"cold decode per-expert / {other}: {x:.2f} (target >= {target:g}: {ok(x, target, True)})")
    x = cold("per-expert", "read_per_token") / used
    return [*lines, f"read/used, per-expert (cold): {x:.2f} (target <= 1.2: {ok(x, 1.2, False)})"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-layer Mixtral with an 8000-token vocabulary (smoke test)")
    p.add_argument("--only", help=f"comma-separated subset of {list(CONTENDERS)}")
    p.add_argument("--no-caps", action="store_true", help="skip the capped runs")
    p.add_argument("--cap-timeout", type=float, default=900.0, help="most seconds a capped run may take")
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    contenders = [c.strip() for c in (args.only or ",".join(CONTENDERS)).split(",") if c.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    model = models.MIXTRAL_SMALL if args.quick else models.MIXTRAL
    spec = {**model.spec("block"), "measure": "benchmarks.moe:measure"}
    folder = spec["folders"]["block"]
    top_k, experts = model.config["num_experts_per_tok"], model.config["num_local_experts"]
    total, used, dense = token_bytes(folder, top_k, experts)
    bandwidth = cold_read_bandwidth(models.unit_files(folder))
    limit = total // 2 + CAP_BASE
    cap_note = "--no-caps" if args.no_caps else cgroup.unavailable()
    print(
        f"\n### {model.name}: {total / MIB:.0f} MiB fp32, generate() {NEW_TOKENS} from {PROMPT_TOKENS}, batch 1\n\n"
        f"{os.cpu_count()} CPUs; cold sequential read of the unit files {bandwidth / MIB:.0f} MiB/s\na decode token "
        f"uses {used / MIB:.1f} MiB (top-{top_k} of {experts} experts; I/O floor {bandwidth / used:.2f} tok/s cold); "
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
    print(f"\n{table(rows, used)}\n\n" + "\n".join(ratios(rows, used)))
    print(
        f"\nread/used: over the {used / MIB:.1f} MiB a decode token uses; capped: under {limit / MIB:.0f} MiB; --help"
    )
    dump = dict(model=model.name, config=model.config, model_bytes=total, used_bytes=used, dense_bytes=dense)
    dump.update(bandwidth=bandwidth, cap=limit if cap_note is None else cap_note, rows=rows)
    (OUT / "bench_moe.json").write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {OUT / 'bench_moe.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
