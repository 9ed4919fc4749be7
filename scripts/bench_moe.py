"""Mixture-of-experts decoding: per-expert paging against per-layer paging, accelerate and the in-memory model.

Model: a random-weight Mixtral (`MixtralConfig`: hidden 512, intermediate 1792, 8 layers, 8 experts,
top-2 routing, vocab 32000, untied LM head; ~830 MiB fp32), built once under `models/` with
`save_pretrained` and converted with `pylomin.convert`. Workload: greedy `generate()` of 32 new
tokens from a fixed 16-token prompt (seeded random ids), batch 1.

Contenders, each in a fresh process:

- memory: `MixtralForCausalLM.from_pretrained(src)`;
- accelerate: accelerate's disk offload of the same checkpoint (as in `scripts/bench.py`);
- dense: pylomin with `pylomin.streaming.PER_EXPERT = False` (a layer's experts paged in whole),
  `memory_budget=0`;
- per-expert: pylomin `load_streaming(folder, MixtralForCausalLM, memory_budget=0)`;
- cache-25, cache-50: pylomin with `memory_budget` = 25 % / 50 % of the model's bytes;
- default: pylomin `load_streaming(folder, MixtralForCausalLM)`, no options.

Each child loads its model, evicts the files it reads from the page cache (`posix_fadvise(DONTNEED)`)
and generates once (cold), then generates again in the same process with the page cache as the first
run left it (warm; pylomin keeps its default `drop_page_cache=True`, so its streamed units are not
left cached). A streamer stamps every token with the time and `/proc/self/io` `read_bytes`: prefill =
prompt to first new token; decode tokens/s = the 31 tokens after the first over their time; read per
token = mean `read_bytes` delta over those 31 tokens. pylomin's warm run is wrapped in
`pylomin.profile` and its verdict recorded. Every contender's tokens must equal the in-memory model's.
The in-memory model and accelerate read their evicted files back during prefill and keep them in the
page cache, so their decode tokens read nothing: their cold decode is the page-cache-warm decode.

Bytes a decode token uses (from the converted folder's manifest): every tensor but the fused experts
tensors and the input embedding table, plus one embedding row, plus top-k / experts of every layer's
fused experts tensors. Dense: every tensor but the input embedding table.

Capped: `memory`, `dense`, `per-expert` and `default` again, each under a cgroup v1 memory limit
(RAM + swap, page cache charged; root only, see `scripts/_cgroup.py`) of half the model's bytes plus
300 MiB for the interpreter, torch and transformers (the process baseline is not measured and not
added); the page cache is dropped before each. Reported: decode tokens/s, or why the run failed
(OOM killed, timeout).

Prints one table and the ratios the targets ask for; writes `bench-out/bench_moe.json`. Run it on a
quiet machine (the full model takes many minutes); `--quick` swaps in a 2-layer, 8000-token model.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_moe.py [--quick] [--only per-expert,dense]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cgroup  # noqa: E402
from _common import (  # noqa: E402
    ENV,
    MIB,
    MIXTRAL,
    MODELS,
    ROOT,
    TokenClock,
    build_mixtral,
    cold_read_bandwidth,
    ensure_converted,
    evict,
    unit_files,
)

OUT = ROOT / "bench-out"
PROMPT_TOKENS = 16
NEW_TOKENS = 32
CAP_BASE = 300 * MIB  # the interpreter, torch and transformers under the cap, on top of half the model
MIXTRAL_SMALL = {**MIXTRAL, "num_hidden_layers": 2, "vocab_size": 8000}
CONTENDERS = {
    "memory": "in memory (transformers)",
    "accelerate": "accelerate disk offload",
    "dense": "pylomin, per-layer experts",
    "per-expert": "pylomin, per-expert, memory_budget=0",
    "cache-25": "pylomin, memory_budget=25 %",
    "cache-50": "pylomin, memory_budget=50 %",
    "default": "pylomin, default options",
}
PYLOMIN = ("dense", "per-expert", "cache-25", "cache-50", "default")
CAPPED = ("memory", "accelerate", "dense", "per-expert", "cache-25", "default")
EXPERT_TENSORS = ("experts.gate_up_proj", "experts.down_proj")


# --- the model ----------------------------------------------------------------------------------------


def ensure_mixtral(config: dict[str, Any], name: str) -> Path:
    """The random-weight Mixtral `name` under models/, built on first use in a child, so this process never holds it."""
    src = MODELS / name
    if not (src / "config.json").is_file():
        print(f"building {src} (random weights, first run only) ...", flush=True)
        cmd = [sys.executable, __file__, "--build", str(src), "--spec", json.dumps(config)]
        subprocess.run(cmd, env=ENV, check=True)
    return src


def token_bytes(folder: Path, top_k: int, experts: int) -> tuple[int, int, int]:
    """(bytes of the model, bytes a decode token uses, bytes it uses with every expert) from the manifest."""
    from pylomin import manifest

    m = manifest.read(folder)
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


# --- children -----------------------------------------------------------------------------------------


def load(contender: str, spec: dict[str, Any], offload: Path, notes: list[str]) -> Any:
    import torch
    import transformers

    import pylomin
    import pylomin.streaming

    cls = transformers.MixtralForCausalLM
    src = Path(spec["src"])
    if contender == "memory":
        return cls.from_pretrained(src, dtype=torch.float32).eval()
    if contender == "accelerate":
        from bench import load_accelerate

        model, api = load_accelerate(cls, src, offload, "auto")
        notes.append(f"accelerate loaded with: {api}")
        return model
    if contender == "dense":
        if hasattr(pylomin.streaming, "PER_EXPERT"):
            pylomin.streaming.PER_EXPERT = False
        else:
            notes.append("pylomin.streaming.PER_EXPERT does not exist: dense ran with per-expert paging")
    if contender == "default":
        return pylomin.load_streaming(spec["folder"], cls)
    budget = {"cache-25": spec["model_bytes"] // 4, "cache-50": spec["model_bytes"] // 2}.get(contender, 0)
    return pylomin.load_streaming(spec["folder"], cls, memory_budget=budget)


def files_of(contender: str, spec: dict[str, Any], offload: Path) -> list[Path]:
    """The files a contender reads its weights from: what the cold run evicts first."""
    if contender in ("memory", "accelerate"):
        offloaded = sorted(p for p in offload.rglob("*") if p.is_file())
        return sorted(Path(spec["src"]).glob("*.safetensors")) + offloaded
    return unit_files(Path(spec["folder"]))


def child(contender: str, spec: dict[str, Any], offload: Path, capped: bool) -> dict[str, Any]:
    """Load, evict, generate cold; unless `capped`, generate again warm (profiled for pylomin)."""
    import torch
    import transformers

    import pylomin

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, spec["vocab"], (1, PROMPT_TOKENS), generator=g)
    kw: dict[str, Any] = dict(
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        pad_token_id=0,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    notes: list[str] = []
    result: dict[str, Any] = {"notes": notes}
    with torch.no_grad():
        t0 = time.perf_counter()
        model = load(contender, spec, offload, notes)
        result["load_s"] = time.perf_counter() - t0
        evict(files_of(contender, spec, offload))
        clock = TokenClock()
        out = model.generate(prompt, streamer=clock, **kw)
        result["cold"] = clock.summary()
        result["tokens"] = out[0, PROMPT_TOKENS:].tolist()
        if capped:
            return result
        clock = TokenClock()
        if contender in PYLOMIN:
            with pylomin.profile(model) as prof:
                out = model.generate(prompt, streamer=clock, **kw)
            result["verdict"] = prof.verdict()
            result["profile"] = prof.totals()
        else:
            out = model.generate(prompt, streamer=clock, **kw)
        result["warm"] = clock.summary()
        result["warm_tokens"] = out[0, PROMPT_TOKENS:].tolist()
    return result


# --- parent -------------------------------------------------------------------------------------------


def child_cmd(contender: str, spec: dict[str, Any], offload: Path, out: Path, capped: bool = False) -> list[str]:
    cmd = [sys.executable, __file__, "--child", contender, "--spec", json.dumps(spec), "--offload", str(offload)]
    return [*cmd, "--out", str(out), *(["--capped"] if capped else [])]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def spawn(contender: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    offload, out = fresh(work / f"offload-{contender}"), work / f"{contender}.json"
    t0 = time.perf_counter()
    res = subprocess.run(child_cmd(contender, spec, offload, out), capture_output=True, text=True, env=ENV)
    wall = time.perf_counter() - t0
    shutil.rmtree(offload, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{CONTENDERS[contender]} failed:\n{res.stderr[-4000:]}")
    return {**json.loads(out.read_text()), "wall_s": wall}


def spawn_capped(contender: str, spec: dict[str, Any], work: Path, limit: int, timeout: float) -> dict[str, Any]:
    offload, out = fresh(work / f"offload-cap-{contender}"), work / f"cap-{contender}.json"
    out.unlink(missing_ok=True)
    run = _cgroup.run_capped(child_cmd(contender, spec, offload, out, capped=True), limit, timeout, ENV)
    shutil.rmtree(offload, ignore_errors=True)
    r: dict[str, Any] = {"ok": run.ok, "reason": run.reason, "seconds": run.seconds, "max_usage": run.max_usage}
    if run.ok:
        r.update(json.loads(out.read_text()))
    return r


def ok(value: float, target: float, higher: bool) -> str:
    if value != value:  # nan
        return "-"
    return "ok" if (value >= target if higher else value <= target) else "MISSED"


def table(rows: dict[str, dict[str, Any]], used: int) -> str:
    ref = rows.get("memory", {}).get("tokens")
    lines = [
        "| contender | cold prefill s | cold decode tok/s | warm decode tok/s | read MiB/token (cold) | read/used "
        "| capped decode tok/s | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for key, r in rows.items():
        if "cold" in r:
            cold, warm = r["cold"], r["warm"]
            cells = [
                f"{cold['prefill_s']:.2f}",
                f"{cold['decode_tps']:.2f}",
                f"{warm['decode_tps']:.2f}",
                f"{cold['read_per_token'] / MIB:.1f}",
                f"{cold['read_per_token'] / used:.2f}",
            ]
        else:
            cells = ["-"] * 5
        cap = r.get("capped")
        if cap is None:
            capped = "-"
        elif cap["ok"]:
            capped = f"{cap['cold']['decode_tps']:.2f}"
        else:
            capped = f"{cap['reason']} ({cap['seconds']:.0f} s)"
        outputs = [r.get("tokens"), r.get("warm_tokens"), (cap or {}).get("tokens")]
        if key == "memory" or ref is None:
            same = "-"
        else:
            same = "ok" if all(o == ref for o in outputs if o is not None) else "DIFFERENT"
        lines.append(f"| {key} | {' | '.join(cells)} | {capped} | {same} |")
    return "\n".join(lines)


def ratios(rows: dict[str, dict[str, Any]], used: int) -> list[str]:
    def cold(key: str, field: str = "decode_tps") -> float:
        return rows[key]["cold"][field] if "cold" in rows.get(key, {}) else float("nan")

    lines = []
    for other, target in (("dense", 2.5), ("accelerate", 5.0)):
        r = cold("per-expert") / cold(other)
        lines.append(f"cold decode per-expert / {other}: {r:.2f} (target >= {target:g}: {ok(r, target, True)})")
    r = cold("per-expert", "read_per_token") / used
    lines.append(f"read/used, per-expert (cold): {r:.2f} (target <= 1.2: {ok(r, 1.2, False)})")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a 2-layer Mixtral with an 8000-token vocabulary (smoke test)")
    p.add_argument("--only", help=f"comma-separated subset of {list(CONTENDERS)}")
    p.add_argument("--no-caps", action="store_true", help="skip the capped runs")
    p.add_argument("--cap-timeout", type=float, default=900.0, help="most seconds a capped run may take")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--capped", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        build_mixtral(args.build, json.loads(args.spec))
        return 0
    if args.child:
        args.out.write_text(json.dumps(child(args.child, json.loads(args.spec), args.offload, args.capped)))
        return 0

    t_start = time.perf_counter()
    contenders = list(CONTENDERS)
    if args.only:
        contenders = [c.strip() for c in args.only.split(",") if c.strip()]
        if unknown := set(contenders) - set(CONTENDERS):
            p.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    config = MIXTRAL_SMALL if args.quick else MIXTRAL
    name = "mixtral-small-random" if args.quick else "mixtral-random"
    src = ensure_mixtral(config, name)
    folder = ensure_converted(src, MODELS / f"{name}-pylomin")
    top_k, experts = config["num_experts_per_tok"], config["num_local_experts"]
    total, used, dense = token_bytes(folder, top_k, experts)
    spec = {"src": str(src), "folder": str(folder), "vocab": config["vocab_size"], "model_bytes": total}
    bandwidth = cold_read_bandwidth(unit_files(folder))
    limit = total // 2 + CAP_BASE
    cap_note = "--no-caps" if args.no_caps else _cgroup.unavailable()

    print(f"\n### {name}: {total / MIB:.0f} MiB fp32, generate() {NEW_TOKENS} from {PROMPT_TOKENS}, batch 1\n")
    print(
        f"{os.cpu_count()} CPUs; cold sequential read of the unit files {bandwidth / MIB:.0f} MiB/s\n"
        f"a decode token uses {used / MIB:.1f} MiB (top-{top_k} of {experts} experts; I/O floor "
        f"{bandwidth / used:.2f} tok/s cold); with every expert (dense) {dense / MIB:.1f} MiB "
        f"({bandwidth / dense:.2f} tok/s)\n",
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        work = Path(tmp)
        for key in contenders:
            r = rows[key] = spawn(key, spec, work)
            for note in r["notes"]:
                print(f"  {key}: {note}", flush=True)
            print(
                f"  {key}: cold {r['cold']['decode_tps']:.2f} tok/s, warm {r['warm']['decode_tps']:.2f} tok/s "
                f"({r['wall_s']:.0f} s)" + (f"; warm: {r['verdict']}" if "verdict" in r else ""),
                flush=True,
            )
        capped = [k for k in CAPPED if k in contenders]
        if capped and cap_note is not None:
            print(f"  capped runs: skipped ({cap_note})", flush=True)
        elif capped:
            for key in capped:
                timeout = min(args.cap_timeout, 60 + 10 * rows[key]["wall_s"])
                r = rows[key]["capped"] = spawn_capped(key, spec, work, limit, timeout)
                result = f"{r['cold']['decode_tps']:.2f} tok/s" if r["ok"] else r["reason"]
                print(f"  {key} capped at {limit / MIB:.0f} MiB: {result} ({r['seconds']:.0f} s)", flush=True)
    print()
    print(table(rows, used))
    print()
    print("\n".join(ratios(rows, used)))
    print(
        "\ncold: the contender's files evicted after loading, then one generate(); warm: a second generate() in "
        "the same process (pylomin with its default drop_page_cache=True). decode tok/s: the tokens after the "
        "first over their time; read MiB/token: mean /proc/self/io read_bytes per decode token; read/used: that "
        f"over the {used / MIB:.1f} MiB a decode token uses (memory and accelerate read their files back during "
        "prefill and decode from the page cache). capped: a cgroup memory limit of half the model + "
        f"{CAP_BASE // MIB} MiB = {limit / MIB:.0f} MiB, page cache dropped first, one cold generate()."
    )
    dump = {
        "model": name,
        "config": config,
        "model_bytes": total,
        "used_bytes": used,
        "dense_bytes": dense,
        "bandwidth": bandwidth,
        "cap": limit if cap_note is None else cap_note,
        "rows": rows,
    }
    (OUT / "bench_moe.json").write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {OUT / 'bench_moe.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
