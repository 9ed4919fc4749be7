"""The memory ladder: one Llama-shaped decoder under cgroup memory limits from a quarter of its bytes to 1.5x.

Model: a random-weight Llama (`LlamaConfig`: hidden 1024, intermediate 2816, 24 layers, 16 heads,
vocab 32000, untied LM head; ~1.5 GB fp32), built once under `models/` with `save_pretrained` and
converted with `pylomin.convert` into block units and leaf units.

Limits: 25, 50, 75, 100 and 150 % of the model's bytes, each plus a fixed allowance for the
interpreter, torch, transformers, accelerate and pylomin: the memory charged to a capped child
(`memory.max_usage_in_bytes`, page cache included) that imports all of them and builds nothing,
measured once per run and printed.

Contenders, each at each limit in one fresh child under the limit (cgroup v1, RAM + swap, page cache
charged; the whole page cache dropped first; root only, see `scripts/_cgroup.py`):

- memory: `LlamaForCausalLM.from_pretrained(src)` (plain transformers, safetensors mapped);
- accelerate: accelerate's disk offload of the same checkpoint (as in `scripts/bench.py`);
- pylomin: `pylomin.load_streaming(folder, LlamaForCausalLM)` with no options (block units);
- least: pylomin's least memory: leaf units, `memory_budget=0, prefetch=0`.

Each child loads, runs a batch-1 x 128-token forward and, if its time allows, a second one (the
steady state, reported), then a greedy `generate()` of 16 new tokens from a 16-token prompt: decode
tokens/s = the 15 tokens after the first over their time. It writes what it measured after every
step, so a child killed later (OOM, timeout) still reports its earlier steps. Charged memory is the
cgroup's high-water mark over the child's whole life. A contender that failed at a limit is not run at
the smaller ones (`--no-skip` runs them anyway).

The floor per limit: a decode token must read whatever of the model does not fit beside the
allowance, max(0, model bytes - (limit - allowance)) / the cold sequential read bandwidth of the unit
files (measured once), in s per token.

Prints a table, writes `bench-out/bench_ladder.json` and `docs/ladder.png` (decode tokens/s against
the limit). Run it on a quiet machine: the full ladder is 20 children of at most `--timeout` s each
(600 by default), and every capped child drops the whole page cache. `--quick` swaps in a 4-layer
model of 28 MiB (a smoke test: its limits differ by a few MiB, well inside the allowance's own
variation, so its figures mean nothing; its PNG goes to `bench-out/ladder-quick.png`).

`--model bert` runs the 1.6 GiB BERT of `scripts/_common.py` instead (`transformers.BertModel`,
`models/bert-1.6g`, converted into `models/bert-1.6g-pylomin-block` and `-leaf`; `--quick`: the
small BERT), measuring the batch-1 x 128-token forward only (no generate; its floor is per forward:
what does not fit beside the allowance, the word embeddings' rows aside, read once). It writes
`bench-out/bench_ladder_bert.json` and `docs/ladder-bert.png` (forward seconds against the limit).

`--limits-mib 384,512` adds absolute limits in MiB, the allowance NOT added (the issue's BERT targets:
pylomin's default under 384 and 512 MiB); given alone, it replaces the percentage ladder (`--limits`
given too: both). With absolute limits, plain transformers (`memory`, when it is among the
contenders) also runs once under an 8 GiB limit as the reference, and each contender's forward time
and charged memory at each absolute limit are printed as a ratio of the reference's. The chart shows
the percentage limits only (none: no chart).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_ladder.py [--quick] [--limits 25,50]
        [--only memory,pylomin] [--timeout 600] [--no-png]
    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_ladder.py --model bert --limits-mib 384,512
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

T0 = time.monotonic()  # the child's deadline counts from here (imports included)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cgroup  # noqa: E402
from _common import (  # noqa: E402
    BERT_1_6G,
    BERT_SMALL,
    ENV,
    MIB,
    MODELS,
    ROOT,
    TokenClock,
    cold_read_bandwidth,
    ensure_bert,
    ensure_converted,
    forward_bytes,
    unit_files,
)

OUT = ROOT / "bench-out"
SEQ = 128  # the forward's tokens
PROMPT_TOKENS = NEW_TOKENS = 16
LIMITS = (25, 50, 75, 100, 150)  # % of the model's bytes, on top of the allowance
BASELINE_LIMIT = 8 * 2**30  # the allowance child's cgroup limit: far above what importing takes
BASELINE_TIMEOUT = 300.0
CLASSES = {"llama": "LlamaForCausalLM", "bert": "BertModel"}  # --model: the transformers class
LLAMA = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=24,
    num_attention_heads=16,
    num_key_value_heads=16,
    vocab_size=32000,
    max_position_embeddings=2048,
    tie_word_embeddings=False,
)
LLAMA_SMALL = {
    **LLAMA,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "vocab_size": 8000,
}
CONTENDERS = {
    "memory": "in memory (transformers from_pretrained)",
    "accelerate": "accelerate disk offload",
    "pylomin": "pylomin load_streaming, no options",
    "least": "pylomin least memory: leaf units, memory_budget=0, prefetch=0",
    "int8": "pylomin load_streaming of an int8 folder (--quantize int8), no options",
    "int4": "pylomin load_streaming of an int4 folder (--quantize int4, groups of 64), no options",
}
QUANTIZED = ("int8", "int4")  # their tokens differ from the fp32 model's by design (accuracy: bench_quant.py)


# --- the model ----------------------------------------------------------------------------------------


def ensure_llama(config: dict[str, Any], name: str, model: str = "llama") -> Path:
    """The random-weight Llama (or BERT: `model`) `name` under models/, built on first use in a child,
    so this process never holds it."""
    src = MODELS / name
    if not (src / "config.json").is_file():
        print(f"building {src} (random weights, first run only) ...", flush=True)
        cmd = [sys.executable, __file__, "--build", str(src), "--spec", json.dumps(config), "--model", model]
        subprocess.run(cmd, env=ENV, check=True)
    return src


def build_llama(path: Path, config: dict[str, Any]) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(path)


# --- children -----------------------------------------------------------------------------------------


def baseline(cls: str = "LlamaForCausalLM") -> None:
    """What every contender imports, and nothing built: the allowance child."""
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    import transformers

    import pylomin  # noqa: F401
    import pylomin.streaming  # noqa: F401

    transformers.logging.set_verbosity_error()
    _ = getattr(transformers, cls)  # resolves the lazy import


def load(contender: str, spec: dict[str, Any], offload: Path, notes: list[str]) -> Any:
    import torch
    import transformers

    import pylomin

    cls = getattr(transformers, spec.get("cls", "LlamaForCausalLM"))
    src = Path(spec["src"])
    if contender == "memory":
        return cls.from_pretrained(src, dtype=torch.float32).eval()
    if contender == "accelerate":
        from bench import load_accelerate

        model, api = load_accelerate(cls, src, offload, "auto")
        notes.append(f"accelerate loaded with: {api}")
        return model
    if contender == "pylomin":
        return pylomin.load_streaming(spec["block"], cls)
    if contender in QUANTIZED or contender.endswith("+head"):  # (+head: bench_quant.py's folders)
        return pylomin.load_streaming(spec[contender], cls)
    return pylomin.load_streaming(spec["leaf"], cls, memory_budget=0, prefetch=0)


def child(contender: str, spec: dict[str, Any], offload: Path, out: Path) -> None:
    """Load, forward (twice if time allows), generate (not for BERT); `out` rewritten after each step."""
    import torch
    import transformers

    from pylomin.limits import read_memory

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, spec["vocab"], (1, SEQ), generator=g)
    prompt = torch.randint(0, spec["vocab"], (1, PROMPT_TOKENS), generator=g)
    kw: dict[str, Any] = dict(
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        pad_token_id=0,
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
    )
    notes: list[str] = []
    r: dict[str, Any] = {"notes": notes, "step": "load", "limit_seen": read_memory().limit}

    def save(step: str) -> None:
        r["step"] = step  # the step that comes next: where a killed child was
        out.write_text(json.dumps(r))

    save("load")
    bert = spec.get("kind") == "bert"
    with torch.no_grad():
        t0 = time.perf_counter()
        model = load(contender, spec, offload, notes)
        r["load_s"] = time.perf_counter() - t0
        record_memory_policy(model, r)
        save("forward")
        times = []
        for i in range(2):
            t0 = time.perf_counter()
            if bert:
                model(x)
            else:
                model(x, use_cache=False)
            times.append(time.perf_counter() - t0)
            r["forward_s"], r["forwards"] = times[-1], len(times)
            r["forward_times"] = times
            # A second forward only if it and a generate() (~ prefill + 16 tokens, each at most a forward's
            # time when the weights are read again per token) still fit in the time left; for BERT, if it fits.
            left = spec["timeout"] - (time.monotonic() - T0)
            if i == 0 and times[0] * (1.5 if bert else 2 + NEW_TOKENS) > left:
                notes.append(f"one forward only: {times[0]:.1f} s, {left:.0f} s left")
                break
            save("forward 2" if i == 0 else "done" if bert else "generate")
        if bert:
            save("done")
            return
        save("generate")
        clock = TokenClock()
        y = model.generate(prompt, streamer=clock, **kw)
        r.update(clock.summary())
        r["tokens"] = y[0, PROMPT_TOKENS:].tolist()
        record_memory_policy(model, r)
        save("done")


def record_memory_policy(model: Any, r: dict[str, Any]) -> None:
    """For pylomin's contenders: what the memory policy keeps resident now, and its line (auto)."""
    from pylomin.streaming import is_streamed, stream_of

    if is_streamed(model):
        manager = stream_of(model).manager
        r["resident_bytes"] = manager.plan.resident_bytes
        r["memory_note"] = manager.memory_note


# --- parent -------------------------------------------------------------------------------------------


def child_cmd(contender: str, spec: dict[str, Any], offload: Path, out: Path) -> list[str]:
    cmd = [sys.executable, __file__, "--child", contender, "--spec", json.dumps(spec), "--offload", str(offload)]
    return [*cmd, "--out", str(out)]


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def allowance(timeout: float, cls: str = "LlamaForCausalLM") -> tuple[int, dict[str, Any]]:
    """Memory charged to a capped child that imports everything and builds nothing (page cache dropped first)."""
    run = _cgroup.run_capped([sys.executable, __file__, "--baseline", cls], BASELINE_LIMIT, timeout, ENV)
    if not run.ok:
        raise SystemExit(f"the allowance child failed: {run.reason} after {run.seconds:.0f} s")
    return run.max_usage, {"seconds": run.seconds, "max_usage": run.max_usage}


def capped(contender: str, spec: dict[str, Any], work: Path, limit: int, timeout: float) -> dict[str, Any]:
    offload, out = fresh(work / f"offload-{contender}"), work / f"{contender}.json"
    out.unlink(missing_ok=True)
    spec = {**spec, "timeout": timeout}
    run = _cgroup.run_capped(child_cmd(contender, spec, offload, out), limit, timeout, ENV)
    shutil.rmtree(offload, ignore_errors=True)
    r: dict[str, Any] = json.loads(out.read_text()) if out.is_file() else {"step": "start"}
    r.update({"ok": run.ok, "reason": run.reason, "seconds": run.seconds, "max_usage": run.max_usage})
    return r


def status(r: dict[str, Any]) -> str:
    if r.get("skipped"):
        return r["skipped"]
    if r["ok"]:
        return "ok" if r.get("forwards", 2) == 2 else "ok (one forward)"
    return f"{r['reason']} in {r['step']} after {r['seconds']:.0f} s"


def cell(r: dict[str, Any], key: str, fmt: str) -> str:
    return format(r[key], fmt) if key in r else "-"


def shown_pct(r: dict[str, Any]) -> str:
    """The % column: the ladder's percentage; "abs" for an absolute limit, "ref" for the reference run."""
    return "ref" if r.get("reference") else "abs" if r["pct"] is None else str(r["pct"])


def where(r: dict[str, Any]) -> str:
    """The row's limit in words: "25 %", "384 MiB", "the reference"."""
    return "the reference" if r.get("reference") else f"{r['limit_mib']} MiB" if r["pct"] is None else f"{r['pct']} %"


def table(rows: list[dict[str, Any]], model_bytes: int, decode: bool = True) -> str:
    lines = [
        "| limit MiB | % of model | contender | forward s | decode tok/s | charged MiB | status |",
        "|---:|---:|---|---:|---:|---:|---|",
    ]
    if not decode:
        lines = [
            "| limit MiB | % of model | contender | forward s | charged MiB | status |",
            "|---:|---:|---|---:|---:|---|",
        ]
    for r in rows:
        charged = f"{r['max_usage'] / MIB:.0f}" if "max_usage" in r else "-"
        tps = f" {cell(r, 'decode_tps', '.2f')} |" if decode else ""
        lines.append(
            f"| {r['limit'] / MIB:.0f} | {shown_pct(r)} | {r['contender']} | {cell(r, 'forward_s', '.3f')} |{tps} "
            f"{charged} | {status(r)} |"
        )
    return "\n".join(lines)


def chart(dump: dict[str, Any], path: Path) -> None:
    """Decode tokens/s (BERT: forward seconds) against the limit (% of the model), one line per contender,
    the floor dashed; the percentage limits only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {key: plt.get_cmap("tab10")(i) for i, key in enumerate(CONTENDERS)}
    values: list[float] = []
    failed: dict[str, list[int]] = {}
    bert = dump.get("kind") == "bert"
    metric = "forward_s" if bert else "decode_tps"
    percent = [r for r in dump["runs"] if r.get("pct") is not None]
    for key in CONTENDERS:
        runs = [r for r in percent if r["contender"] == key]
        if not runs:
            continue
        good = [(r["pct"], r[metric]) for r in runs if r["ok"]]
        failed[key] = [r["pct"] for r in runs if not r["ok"] and not r.get("skipped")]
        if good:
            xs, ys = zip(*sorted(good), strict=True)
            ax.plot(xs, ys, "o-", color=colors[key], label=f"{key}: {CONTENDERS[key]}")
            values += ys
    floors = {pct: s for pct, s in dump["floors"].items() if pct.isdigit()}  # absolute limits are keyed "384MiB"
    floor = [(int(pct), s if bert else 1 / s) for pct, s in floors.items() if s > 0]
    if floor:
        xs, ys = zip(*sorted(floor), strict=True)
        what = (
            "I/O floor (what does not fit, read once per forward)"
            if bert
            else "1 / I/O floor (what does not fit, read once per token)"
        )
        ax.plot(xs, ys, "k--", label=what)
        values += ys
    cap = next((r for r in percent if r["contender"] == "memory" and r["pct"] == 150 and r["ok"]), None)
    if cap is not None:
        what = "in memory, compute-bound (memory at 150 %)" if bert else "compute-bound cap (memory at 150 %)"
        ax.axhline(cap[metric], color="grey", linestyle=":", label=what)
        values.append(cap[metric])
    log = bool(values) and max(values) / max(min(values), 1e-9) > 20
    if log:
        ax.set_yscale("log")
    bottom = min(values) / 2 if log and values else 0
    for key, pcts in failed.items():  # failures sit on the x axis
        if pcts:
            ax.scatter(pcts, [bottom] * len(pcts), marker="x", s=60, color=colors[key], clip_on=False)
    if values:
        ax.set_ylim(bottom=bottom)
    ax.set_xticks([int(p) for p in floors])
    ax.set_xlabel(
        f"memory limit, % of the model's {dump['model_bytes'] / MIB:.0f} MiB (+ {dump['allowance'] / MIB:.0f} MiB allowance)"
    )
    ax.set_ylabel((f"forward s (1 x {SEQ})" if bert else "decode tokens/s") + (" (log scale)" if log else ""))
    ax.set_title(
        f"{dump['model']} ({dump['model_bytes'] / MIB:.0f} MiB fp32), {dump['cpus']} CPU cores; x on the axis: failed\n"
        f"{dump['command']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    # Below the axes and their label: never over a line.
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(CLASSES), default="llama", help="the Llama decoder or the 1.6 GiB BERT")
    p.add_argument(
        "--quick",
        action="store_true",
        help="a 4-layer Llama, hidden 256, vocabulary 8000; or the small BERT (smoke test)",
    )
    p.add_argument(
        "--limits", help=f"limits in %% of the model's bytes (+ allowance); default {','.join(map(str, LIMITS))}"
    )
    p.add_argument("--limits-mib", help="absolute limits in MiB, the allowance not added (e.g. 384,512)")
    p.add_argument("--only", help=f"comma-separated subset of {list(CONTENDERS)}")
    p.add_argument("--timeout", type=float, default=600.0, help="most seconds one capped child may take")
    p.add_argument("--no-skip", action="store_true", help="run a contender at smaller limits after it failed")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--baseline", nargs="?", const="LlamaForCausalLM", help=argparse.SUPPRESS)
    p.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.build:
        if args.model == "bert":
            ensure_bert(args.build, **json.loads(args.spec))
        else:
            build_llama(args.build, json.loads(args.spec))
        return 0
    if args.baseline:
        baseline(args.baseline)
        return 0
    if args.child:
        child(args.child, json.loads(args.spec), args.offload, args.out)
        return 0

    t_start = time.perf_counter()
    bert = args.model == "bert"
    contenders = list(CONTENDERS)
    if args.only:
        contenders = [c.strip() for c in args.only.split(",") if c.strip()]
        if unknown := set(contenders) - set(CONTENDERS):
            p.error(f"unknown contenders {sorted(unknown)}; choose from {list(CONTENDERS)}")
    percents = args.limits if args.limits is not None else "" if args.limits_mib else ",".join(map(str, LIMITS))
    try:
        limits = sorted({int(s) for s in percents.split(",") if s.strip()}, reverse=True)
        absolute = sorted({int(s) for s in (args.limits_mib or "").split(",") if s.strip()}, reverse=True)
    except ValueError:
        p.error(f"--limits and --limits-mib take whole numbers, comma-separated: {args.limits!r}, {args.limits_mib!r}")
    if not limits and not absolute or min(limits + absolute) <= 0:
        p.error("--limits / --limits-mib: at least one limit, each above 0")
    if (why := _cgroup.unavailable()) is not None:
        print(f"capped runs are not possible here: {why}", file=sys.stderr)
        return 1

    from pylomin import manifest

    if bert:
        config = BERT_SMALL if args.quick else BERT_1_6G
        name = "bert-small" if args.quick else "bert-1.6g"
        src = ensure_llama(config, name, "bert")
        block = ensure_converted(src, MODELS / f"{name}-pylomin-block")
        leaf = ensure_converted(src, MODELS / f"{name}-pylomin-leaf", "leaf")
    else:
        config = LLAMA_SMALL if args.quick else LLAMA
        name = "llama-small-random" if args.quick else "llama-1.5g-random"
        src = ensure_llama(config, name)
        block = ensure_converted(src, MODELS / f"{name}-pylomin")
        leaf = ensure_converted(src, MODELS / f"{name}-pylomin-leaf", "leaf")
    model_bytes = manifest.read(block).nbytes
    spec = {"src": str(src), "block": str(block), "leaf": str(leaf), "vocab": config["vocab_size"]}
    for scheme in set(QUANTIZED) & set(contenders):
        spec[scheme] = str(ensure_converted(src, MODELS / f"{name}-pylomin-{scheme}", quantize=scheme))
    if bert:
        spec.update(kind="bert", cls=CLASSES["bert"])
    # What one pass must read when nothing of it is resident: the whole model, or for BERT the whole
    # model but the word embeddings (a forward reads only the looked-up rows).
    pass_bytes = forward_bytes(block) if bert else model_bytes
    bandwidth = cold_read_bandwidth(unit_files(block))
    extra, extra_run = allowance(BASELINE_TIMEOUT, CLASSES[args.model])
    command = " ".join(["scripts/bench_ladder.py", *sys.argv[1:]])
    work = (
        f"forward 1 x {SEQ} (no generate)"
        if bert
        else f"forward 1 x {SEQ}; generate() {NEW_TOKENS} from {PROMPT_TOKENS}"
    )
    print(
        f"\n### {name}: {model_bytes / MIB:.0f} MiB fp32; {work}\n\n{os.cpu_count()} CPUs; cold sequential read of the "
        f"unit files {bandwidth / MIB:.0f} MiB/s; "
        f"allowance (charged to a child that imports torch, transformers, accelerate and pylomin) "
        f"{extra / MIB:.0f} MiB ({extra_run['seconds']:.1f} s)\n",
        flush=True,
    )
    # (label, limit bytes, % of the model or None for an absolute limit), largest first.
    steps: list[tuple[str, int, int | None]] = [(str(pct), model_bytes * pct // 100 + extra, pct) for pct in limits]
    steps += [(f"{mib}MiB", mib * MIB, None) for mib in absolute]
    reference = bool(absolute) and "memory" in contenders
    if reference:
        steps.append(("reference", BASELINE_LIMIT, None))
    steps.sort(key=lambda step: step[1], reverse=True)
    floors = {
        label: max(0, pass_bytes - (model_bytes * pct // 100 if pct is not None else max(0, limit - extra))) / bandwidth
        for label, limit, pct in sorted(steps, key=lambda step: step[1])
        if label != "reference"
    }
    rows: list[dict[str, Any]] = []
    failed_at: dict[str, str] = {}
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for label, limit, pct in steps:  # largest first: a contender that fails is not run at the smaller limits
            shown = f"{pct:3d} %" if pct is not None else "ref" if label == "reference" else "abs"
            at = f"{pct} %" if pct is not None else label
            for key in contenders:
                if label == "reference" and key != "memory":
                    continue
                head: dict[str, Any] = {"pct": pct, "limit": limit, "contender": key}
                if label == "reference":
                    head["reference"] = True
                elif pct is None:
                    head["limit_mib"] = limit // MIB
                if key in failed_at and not args.no_skip:
                    rows.append({**head, "ok": False, "skipped": f"skipped (failed at {failed_at[key]})"})
                    continue
                r = {**head, **capped(key, spec, Path(tmp), limit, args.timeout)}
                rows.append(r)
                if not r["ok"]:
                    failed_at.setdefault(key, at)
                for note in r.get("notes", []):
                    print(f"  {key} at {at}: {note}", flush=True)
                decode = "" if bert else f"decode {cell(r, 'decode_tps', '.2f')} tok/s, "
                print(
                    f"  {limit / MIB:6.0f} MiB ({shown}) {key:10s} forward {cell(r, 'forward_s', '.3f')} s, "
                    f"{decode}charged {r['max_usage'] / MIB:.0f} MiB: "
                    f"{status(r)} ({r['seconds']:.0f} s)",
                    flush=True,
                )
                if r.get("memory_note"):
                    print(f"    {r['resident_bytes'] / MIB:.0f} MiB resident; {r['memory_note']}", flush=True)
    rows.sort(key=lambda r: (r["limit"], contenders.index(r["contender"])))
    ref = next((r["tokens"] for r in rows if r["contender"] == "memory" and "tokens" in r), None)
    differ = [
        f"{r['contender']} at {where(r)}"
        for r in rows
        if ref and "tokens" in r and r["tokens"] != ref and r["contender"] not in QUANTIZED
    ]
    print()
    print(table(rows, model_bytes, decode=not bert))
    unit, rate = ("forward", "forwards/s") if bert else ("token", "tok/s")
    first = "limit" if absolute else "% of model"  # the percentage alone when every limit is one
    print(f"\n| {first} | limit MiB | floor s/{unit} | floor {rate} |\n|---:|---:|---:|---:|")
    for label, s in floors.items():
        limit = next(limit for lb, limit, _ in steps if lb == label)
        shown_label = label if not absolute else f"{label} %" if label.isdigit() else label
        print(f"| {shown_label} | {limit / MIB:.0f} | {s:.3f} | {f'{1 / s:.2f}' if s else '- (all fits)'} |")
    if bert:
        what = (
            f"forward s: the second 1 x {SEQ} forward (the first where the status says one forward). "
            "charged: the cgroup's high-water mark over the child's life. status: ok, or how the child ended "
            f"and in which step. floor: max(0, model - word embeddings - (limit - allowance)) / {bandwidth / MIB:.0f} "
            "MiB/s per forward."
        )
        outputs = ""
    else:
        what = (
            f"forward s: the second 1 x {SEQ} forward (the first where the status says one forward). decode tok/s: "
            f"greedy generate() of {NEW_TOKENS} from {PROMPT_TOKENS}, the tokens after the first over their time. "
            "charged: the cgroup's high-water mark over the child's life. status: ok, or how the child ended and in "
            f"which step. floor: max(0, model - (limit - allowance)) / {bandwidth / MIB:.0f} MiB/s per decode token."
        )
        outputs = "\n" + (
            f"tokens that differ from the in-memory model's: {', '.join(differ)}"
            if differ
            else "every generate() that finished gave the in-memory model's tokens"
            if ref
            else "no in-memory run finished: tokens not compared"
        )
        agree = [
            f"{r['contender']} at {where(r)} {sum(a == b for a, b in zip(r['tokens'], ref, strict=True))}/{len(ref)}"
            for r in rows
            if ref and "tokens" in r and r["contender"] in QUANTIZED
        ]
        if agree:
            outputs += "\nquantized models' greedy tokens equal to the in-memory fp32 model's: " + ", ".join(agree)
    print(
        f"\nlimit: % of the model's {model_bytes / MIB:.0f} MiB + the {extra / MIB:.0f} MiB allowance"
        + (", or absolute (abs: the allowance not added; ref: plain transformers under 8 GiB)" if absolute else "")
        + " (cgroup v1, RAM + swap, page cache charged, the page cache dropped before each child). "
        + what
        + outputs,
        flush=True,
    )
    ratios = reference_ratios(rows) if reference else []
    if reference:
        print("\n" + "\n".join(ratios) if ratios else "\nno reference ratios: plain transformers under 8 GiB failed")
    dump = {
        "model": name,
        "kind": args.model,
        "config": config,
        "model_bytes": model_bytes,
        "allowance": extra,
        "allowance_run": extra_run,
        "bandwidth": bandwidth,
        "cpus": os.cpu_count(),
        "command": command,
        "timeout": args.timeout,
        "floors": {str(label): s for label, s in floors.items()},
        "runs": rows,
    }
    if not bert:
        del dump["kind"]  # the Llama dump as before
    if absolute:
        dump["limits_mib"] = absolute
        dump["reference_ratios"] = ratios
    json_path = OUT / ("bench_ladder_bert.json" if bert else "bench_ladder.json")
    json_path.write_text(json.dumps(dump, indent=1))
    wrote = [json_path]
    if not args.no_png and not limits:
        print("no chart: the chart shows the percentage limits, and there are none")
    elif not args.no_png:
        if bert:
            png = OUT / "ladder-bert-quick.png" if args.quick else ROOT / "docs" / "ladder-bert.png"
        else:
            png = OUT / "ladder-quick.png" if args.quick else ROOT / "docs" / "ladder.png"
        chart(dump, png)
        wrote.append(png)
    print(f"\nwrote {' and '.join(map(str, wrote))}; total {time.perf_counter() - t_start:.0f} s")
    return 0


def reference_ratios(rows: list[dict[str, Any]]) -> list[str]:
    """Each contender's forward time and charged memory at each absolute limit, over plain transformers' under 8 GiB."""
    ref = next((r for r in rows if r.get("reference") and r["ok"]), None)
    if ref is None:
        return []
    out = [
        f"reference: plain transformers under {ref['limit'] / MIB:.0f} MiB, forward {ref['forward_s']:.3f} s, "
        f"charged {ref['max_usage'] / MIB:.0f} MiB"
    ]
    for r in rows:
        if "limit_mib" not in r or not r["ok"]:
            continue
        out.append(
            f"{r['contender']} at {r['limit_mib']} MiB: forward {r['forward_s'] / ref['forward_s']:.2f}x the reference's, "
            f"charged {r['max_usage'] / ref['max_usage']:.2f}x"
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
