"""Every contender side by side: in-memory transformers, accelerate's disk offload, pylomin's streaming modes.

Models (random weights, built under `models/` on first use): the 1.6 GiB BERT at batch 1 x 128 and
8 x 128 tokens, and a GPT-2-large-sized decoder running a greedy `generate()` of 32 tokens from a
32-token prompt. Contenders, each in a fresh process on the same input:

- in memory: transformers `from_pretrained(dtype=torch.float32)`;
- accelerate's disk offload of the same checkpoint: `from_pretrained(device_map={"": "disk"})`, or
  `accelerate.disk_offload` on an empty model where transformers refuses (the output says which);
- pylomin's default: `load_streaming(folder, cls)` with no options, in both phases: what a user
  gets. It is `memory_budget="auto"`: it reads the memory this process may use (cgroup limits,
  `MemAvailable`) and, when the model fits, keeps all of it resident, faulted in and mapped at load
  (in-memory speed, no reads per forward); else it keeps what fits and streams the rest with
  `drop_page_cache=True`. What it chose is printed under the contender's line;
- pylomin's streaming modes, everything streamed (`memory_budget=0`): prefetch 2 units (the old
  default), `prefetch=0`, and leaf units; and a fixed `memory_budget` of 50 % of the model;
- pylomin's default on the model converted with `--quantize int8` and `--quantize int4` (Linear /
  GPT-2 Conv1D weights compressed; embeddings, norms and tied heads as stored): their outputs are
  close to the fp32 model's, not equal (the "same output" column says "-"; accuracy:
  `scripts/bench_quant.py`).

Per contender: median latency (tokens/s for generate) with a warm page cache (pylomin's explicit
modes with `drop_page_cache=False`) and a cold one (the contender's files evicted with
`posix_fadvise(DONTNEED)` before each timed run; pylomin's explicit modes with `drop_page_cache=True`,
its default with no options again); peak RSS above the RSS after the imports, anonymous +
file-backed; and for BERT batch 1 the smallest hard memory cap (a cgroup v1 memory limit, root only)
under which the contender still loads and runs. The cold sequential read bandwidth of the disk,
measured in the same run, gives the I/O floor of a cold run.

Where the model fits, pylomin's default holds it mapped and resident from the load on, as the
in-memory model does: eviction cannot drop pages that are mapped, so its cold runs read nothing and
come out about as fast as its warm ones. That is the point of the default, not an artefact of the
benchmark; the streaming modes show what a cold read costs. Under a memory cap the default reads the
cgroup limit and keeps only what fits.

Prints a markdown table per model and batch, writes `bench-out/bench.png` (latency against peak
memory) and `bench-out/bench.json`. `--quick` swaps in small models and 2 runs (a few minutes);
the full run is sized for under 20 minutes on 2 cores.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench.py [--quick] [--no-caps]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cgroup  # noqa: E402
from _common import (  # noqa: E402
    ENV,
    GPT2_LARGE,
    GPT2_SMALL,
    MIB,
    MODELS,
    ROOT,
    benchmark_bert,
    cold_read_bandwidth,
    ensure_converted,
    ensure_gpt2,
    evict,
    forward_bytes,
    unit_files,
)

if TYPE_CHECKING:
    from pylomin.memory import PeakRss, Rss

OUT = ROOT / "bench-out"
SEQ = 128
PROMPT_TOKENS = NEW_TOKENS = 32
CAP_STEP = 32 * MIB  # resolution of the cap search
CAP_FLOOR = 128 * MIB
CAP_MARGIN = 256 * MIB  # above the contender's unlimited peak: the search's upper end
CONTENDERS = {
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
PYLOMIN = ("default", "stream", "prefetch0", "leaf", "budget50", "int8", "int4")
QUANTIZED = ("int8", "int4")  # converted with --quantize: outputs close to, not equal to, the fp32 model's


@dataclass
class Case:
    """One model at one input size: what the children run."""

    kind: str  # "bert" (one forward) or "gpt2" (generate)
    title: str
    src: Path  # the Hugging Face checkpoint folder
    block: Path  # converted, block units
    leaf: Path  # converted, leaf units
    batch: int
    runs_warm: int
    runs_cold: int
    caps: bool = False

    @property
    def generate(self) -> bool:
        return self.kind == "gpt2"

    def spec(self, max_generate_s: float, accelerate_api: str) -> dict[str, Any]:
        from pylomin import manifest

        return {
            "kind": self.kind,
            "cls": "GPT2LMHeadModel" if self.generate else "BertModel",
            "src": str(self.src),
            "block": str(self.block),
            "leaf": str(self.leaf),
            **{
                scheme: str(
                    ensure_converted(self.src, self.block.with_name(f"{self.block.name}-{scheme}"), quantize=scheme)
                )
                for scheme in QUANTIZED
            },
            "batch": self.batch,
            "seq": PROMPT_TOKENS if self.generate else SEQ,
            "new_tokens": NEW_TOKENS,
            "runs_warm": self.runs_warm,
            "runs_cold": self.runs_cold,
            "budget": manifest.read(self.block).nbytes // 2,
            "max_generate_s": max_generate_s,
            "accelerate_api": accelerate_api,
        }


# --- children -----------------------------------------------------------------------------------------


def contender_files(spec: dict[str, Any], contender: str, offload: Path) -> list[Path]:
    """The files a contender reads its weights from: what a cold run evicts first."""
    if contender in ("memory", "accelerate"):
        offloaded = sorted(p for p in offload.rglob("*") if p.is_file())
        return sorted(Path(spec["src"]).glob("*.safetensors")) + offloaded
    return unit_files(Path(spec[contender if contender in ("leaf", *QUANTIZED) else "block"]))


def load_accelerate(cls: Any, src: Path, offload: Path, api: str) -> tuple[Any, str]:
    """The checkpoint with every weight offloaded to disk by accelerate; returns (model, how it was loaded)."""
    import torch

    refused = ""
    if api == "auto":
        try:
            model = cls.from_pretrained(src, dtype=torch.float32, device_map={"": "disk"}, offload_folder=offload)
            return model.eval(), 'transformers from_pretrained(device_map={"": "disk"}, offload_folder=...)'
        except (ValueError, NotImplementedError, RuntimeError, KeyError) as e:
            refused = f" (from_pretrained refused: {type(e).__name__}: {str(e)[:120]})"
    import accelerate
    import transformers
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    with accelerate.init_empty_weights():
        model = cls(transformers.AutoConfig.from_pretrained(src))
    model.tie_weights()
    stored = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), path))
    params = dict(model.named_parameters(remove_duplicate=False))
    index: dict[str, Any] = {}
    for name, param in params.items():  # one tensor in memory at a time; tied names read their stored twin
        key = name if name in stored else next(k for k in stored if params.get(k) is param)
        with safe_open(stored[key], framework="pt") as f:
            index = offload_weight(f.get_tensor(key).to(torch.float32), name, offload, index)
    save_offload_index(index, offload)
    model = accelerate.disk_offload(model, offload, execution_device=torch.device("cpu"))
    return model.eval(), f"accelerate.disk_offload(init_empty_weights() model, execution_device='cpu'){refused}"


@dataclass
class Job:
    """One contender on one case's input, as a child process runs it."""

    spec: dict[str, Any]
    contender: str
    cls: Any  # the transformers model class
    x: Any  # input ids: [batch, seq]
    kw: dict[str, Any]  # generate()'s options
    offload: Path

    @property
    def generate(self) -> bool:
        return self.spec["kind"] == "gpt2"

    @property
    def full_tokens(self) -> int:
        """New tokens per timed run when nothing is cut short: all of them for generate(), 1 for a forward."""
        return self.spec["new_tokens"] if self.generate else 1


@dataclass
class Phase:
    """What a child measured warm or cold."""

    times: list[float]  # seconds per timed run
    tokens: int  # new tokens per timed run
    peak: dict[str, int]  # peak RSS above the baseline: total, anon, file
    load_s: float  # loading the model the phase timed
    first_s: float  # its untimed first run, 2 tokens
    note: str | None = None  # why it was cut short
    api: str = ""  # how accelerate loaded the model


def prepare(spec: dict[str, Any], contender: str, offload: Path) -> Job:
    """Import what the contender needs and draw its input, all before the RSS baseline."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, spec["cls"])  # resolves the lazy import before the baseline
    if contender == "accelerate":
        import accelerate  # noqa: F401  (before the baseline, like the other libraries)
    vocab = json.loads((Path(spec["src"]) / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    x = torch.randint(0, vocab, (spec["batch"], spec["seq"]))
    gen = spec["kind"] == "gpt2"
    kw: dict[str, Any] = dict(attention_mask=torch.ones_like(x), do_sample=False, pad_token_id=0) if gen else {}
    return Job(spec, contender, cls, x, kw, offload)


def load(job: Job, drop: bool) -> tuple[Any, str]:
    """The contender's model, and how accelerate loaded it ("" for the others).

    `drop`: pylomin's `drop_page_cache` for its explicit modes (False warm, True cold); the default
    contender takes no options at all, in either phase.
    """
    import torch

    import pylomin

    src = Path(job.spec["src"])
    if job.contender == "memory":
        return job.cls.from_pretrained(src, dtype=torch.float32).eval(), ""
    if job.contender == "accelerate":
        return load_accelerate(job.cls, src, job.offload, job.spec["accelerate_api"])
    folder = job.spec[job.contender if job.contender in ("leaf", *QUANTIZED) else "block"]
    if job.contender in ("default", *QUANTIZED):
        return pylomin.load_streaming(folder, job.cls), ""
    model = pylomin.load_streaming(
        folder,
        job.cls,
        drop_page_cache=drop,
        prefetch=0 if job.contender == "prefetch0" else 2,
        memory_budget=job.spec["budget"] if job.contender == "budget50" else 0,
    )
    return model, ""


def run(job: Job, model: Any, tokens: int) -> Any:
    """One forward's last hidden state (BERT), or a greedy generate() of `tokens` new tokens (GPT-2)."""
    if job.generate:
        return model.generate(job.x, max_new_tokens=tokens, min_new_tokens=tokens, **job.kw)
    return model(job.x).last_hidden_state


def clock(fn: Any, *args: Any) -> tuple[Any, float]:
    """`fn(*args)` and the seconds it took."""
    t0 = time.perf_counter()
    value = fn(*args)
    return value, time.perf_counter() - t0


def above(p: PeakRss, base: Rss) -> dict[str, int]:
    """The peak of the PeakRss window `p` above `base`, the RSS after the imports."""
    start: Rss = p.start - base
    return {"total": start.total + p.total, "anon": start.anon + p.anon, "file": start.file + p.file}


def tokens_within(spec: dict[str, Any], per_token_s: float) -> int:
    """New tokens to time: all of them unless that would take longer than --max-generate-s."""
    if per_token_s * spec["new_tokens"] <= spec["max_generate_s"]:
        return spec["new_tokens"]
    return max(2, int(spec["max_generate_s"] / per_token_s))


def trial_run(job: Job) -> None:
    """What the cap search runs: load as for a cold run, warm-up, one run (prefetch order known)."""
    model, _ = load(job, drop=True)
    run(job, model, 2)
    run(job, model, 2)


def warm_phase(job: Job, base: Rss) -> tuple[Any, Any, Phase]:
    """Load with the page cache kept, run once untimed, then time the runs; returns (model, last output, phase)."""
    from pylomin.memory import PeakRss

    spec = job.spec
    tokens, runs, note = job.full_tokens, spec["runs_warm"], None
    with PeakRss(interval=0.01) as p:
        (model, api), load_s = clock(load, job, False)
        _, first_s = clock(run, job, model, 2)  # kernels, pylomin's recorded order, page cache for warm runs
        # The estimate of a warm token comes from a second short run: the first one also faults in
        # what a warm run finds in memory (the default's resident model: seconds of reading).
        per_token = clock(run, job, model, 2)[1] / 2 if job.generate else 0.0
        if job.generate and (n := tokens_within(spec, per_token)) < spec["new_tokens"]:
            tokens, runs = n, 1
            note = (
                f"warm: ~{per_token:.1f} s per token, a {spec['new_tokens']}-token generate() would take "
                f"~{per_token * spec['new_tokens']:.0f} s > --max-generate-s {spec['max_generate_s']:g}: "
                f"timed once on {n} new tokens; cold skipped"
            )
        times = []
        for _ in range(runs):
            y, seconds = clock(run, job, model, tokens)
            times.append(seconds)
    return model, y, Phase(times, tokens, above(p, base), load_s, first_s, note, api)


def cold_phase(job: Job, model: Any, warm: Phase, base: Rss) -> Phase:
    """Time the runs with the contender's files evicted before each; with no `model`, load a fresh one first."""
    from pylomin.memory import PeakRss

    spec = job.spec
    tokens, note = job.full_tokens, None
    load_s, first_s = warm.load_s, warm.first_s
    with PeakRss(interval=0.01) as p:
        if model is None:
            (model, _), load_s = clock(load, job, True)
            _, first_s = clock(run, job, model, 2)
        if job.generate and (n := tokens_within(spec, first_s / 2)) < spec["new_tokens"]:
            tokens = n
            note = (
                f"cold: ~{first_s / 2:.1f} s per token > --max-generate-s {spec['max_generate_s']:g} for "
                f"{spec['new_tokens']} tokens: timed on {n} new tokens"
            )
        files = contender_files(spec, job.contender, job.offload)
        times = []
        for _ in range(spec["runs_cold"]):
            evict(files)
            _, seconds = clock(run, job, model, tokens)
            times.append(seconds)
    return Phase(times, tokens, above(p, base), load_s, first_s, note)


def child(spec: dict[str, Any], contender: str, offload: Path, trial: bool) -> dict[str, Any]:
    """Load the contender, time it warm then cold; with `trial`, only load and run twice (for the cap search)."""
    import torch

    import pylomin
    from pylomin.memory import rss
    from pylomin.streaming import stream_of

    job = prepare(spec, contender, offload)
    base = rss()
    with torch.no_grad():
        if trial:
            trial_run(job)
            return {}
        model, y, warm = warm_phase(job, base)
        # What memory_budget="auto" chose (pylomin's default only; "" for explicit budgets).
        memory = stream_of(model).manager.memory_note if contender in PYLOMIN else ""
        if job.generate:
            output = y[0, spec["seq"] :].tolist()
        else:
            output = None
            torch.save(y, offload.parent / f"{contender}.pt")
        cold = None
        if warm.tokens == job.full_tokens and spec["runs_cold"]:  # a warm run cut short skips the cold ones
            # A fresh pylomin model: drop_page_cache=True for the explicit modes, no options for the default.
            if contender in PYLOMIN:
                pylomin.unload_(model)
                model = None
                gc.collect()
            cold = cold_phase(job, model, warm, base)
    phases = {"warm": warm} if cold is None else {"warm": warm, "cold": cold}
    last = phases["cold" if cold else "warm"]  # the cap search's time scale: load, warm-up, one cold run
    return {
        "api": warm.api,
        "memory_note": memory,
        "notes": [ph.note for ph in phases.values() if ph.note],
        "tokens": {"warm": warm.tokens, "cold": cold.tokens if cold else job.full_tokens},
        "warm": warm.times,
        "cold": cold.times if cold else [],
        "peaks": {name: ph.peak for name, ph in phases.items()},
        "base_anon": base.anon,
        "base_total": base.total,
        "trial_s": last.load_s + last.first_s + (cold.times[0] if cold else 0.0),
        "output": output,
    }


# --- parent -------------------------------------------------------------------------------------------


def child_cmd(spec: dict[str, Any], contender: str, offload: Path, trial: bool = False) -> list[str]:
    cmd = [sys.executable, __file__, "--child", contender, "--spec", json.dumps(spec), "--offload", str(offload)]
    return [*cmd, "--trial"] if trial else cmd


def fresh_offload_dir(work: Path, name: str) -> Path:
    path = work / name
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def spawn(spec: dict[str, Any], contender: str, work: Path) -> dict[str, Any]:
    offload = fresh_offload_dir(work, f"offload-{contender}")
    res = subprocess.run(child_cmd(spec, contender, offload), capture_output=True, text=True, env=ENV)
    shutil.rmtree(offload, ignore_errors=True)
    if res.returncode != 0:
        raise SystemExit(f"{CONTENDERS[contender]} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def capped_trial(spec: dict[str, Any], contender: str, work: Path, cap: int, timeout: float) -> dict[str, Any]:
    """One trial run of the contender under a `cap`-byte cgroup limit (the page cache dropped first)."""
    offload = fresh_offload_dir(work, f"offload-cap-{contender}")
    res = _cgroup.run_capped(child_cmd(spec, contender, offload, trial=True), cap, timeout, ENV)
    shutil.rmtree(offload, ignore_errors=True)
    print(f"    cap {cap / MIB:5.0f} MiB: {res.reason} after {res.seconds:.1f} s", flush=True)
    return {"cap": cap, "ok": res.ok, "reason": res.reason, "s": res.seconds, "max_usage": res.max_usage}


def min_cap(spec: dict[str, Any], contender: str, r: dict[str, Any], work: Path, max_steps: int) -> dict[str, Any]:
    """Binary-search the smallest cap (multiple of CAP_STEP) under which a trial run exits 0 in time."""
    timeout = 30 + 10 * r["trial_s"]
    peak = max(p["total"] for p in r["peaks"].values())
    # Below the anonymous memory the imports alone take, nothing runs; the contender's own unlimited
    # peak plus a margin is expected to pass (checked below when no tried cap passed).
    lo = max(CAP_FLOOR, r["base_anon"] // CAP_STEP * CAP_STEP)
    hi = -(-(r["base_total"] + peak + CAP_MARGIN) // CAP_STEP) * CAP_STEP
    trials: list[dict[str, Any]] = []
    while hi - lo > CAP_STEP and len(trials) < max_steps:
        mid = lo + (hi - lo) // 2 // CAP_STEP * CAP_STEP
        trials.append(capped_trial(spec, contender, work, mid, timeout))
        if trials[-1]["ok"]:
            hi = mid
        else:
            lo = mid
    if not any(t["ok"] for t in trials):
        trials.append(capped_trial(spec, contender, work, hi, timeout))
    ok = [t for t in trials if t["ok"]]
    best = min(ok, key=lambda t: t["cap"]) if ok else None
    failed = [t["cap"] for t in trials if not t["ok"] and (best is None or t["cap"] < best["cap"])]
    return {
        "cap": best["cap"] if best else None,
        "seconds": best["s"] if best else None,
        "fails": max(failed, default=None),  # the largest cap tried that failed, if any
        "timeout": timeout,
        "trials": trials,
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def fmt_cap(c: dict[str, Any] | None) -> str:
    if c is None:
        return "-"
    if c["cap"] is None:
        return f"> {c['fails'] / MIB:.0f}"
    failed = f"✗ {c['fails'] / MIB:.0f}, " if c["fails"] is not None else ""
    return f"{c['cap'] / MIB:.0f} ({failed}{c['seconds']:.0f} s)"


def per_unit(r: dict[str, Any], phase: str) -> float:
    """Median seconds per forward, or per generated token; nan when the phase was not run."""
    return median(r[phase]) / r["tokens"][phase]


def show(case: Case, r: dict[str, Any], phase: str, unit: str = "") -> str:
    t = per_unit(r, phase)
    if t != t:  # nan
        return "skipped"
    if not case.generate:
        return f"{t:.3f} s"
    n = r["tokens"][phase]
    return f"{1 / t:.2f}{unit}" + (f" ({n} tokens)" if n != NEW_TOKENS else "")


def table(case: Case, rows: dict[str, dict[str, Any]], floor: float, same: dict[str, bool | None]) -> str:
    """The markdown table of one case."""
    ref = per_unit(rows["memory"], "warm") if "memory" in rows else float("nan")
    speed = "tokens/s" if case.generate else "latency"
    lines = [
        f"| contender | warm {speed} | cold {speed} | vs in memory (warm / cold) | cold vs max(in memory, I/O floor) "
        "| peak RSS MiB (anon + file) | min cap MiB | same output |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for key, r in rows.items():
        peak = max(r["peaks"].values(), key=lambda p: p["total"])
        warm, cold = per_unit(r, "warm"), per_unit(r, "cold")
        ratio_cold = f"{cold / ref:.2f}x" if cold == cold else "-"
        floor_ratio = f"{cold / max(ref, floor):.2f}x" if cold == cold else "-"
        lines.append(
            f"| {CONTENDERS[key]} | {show(case, r, 'warm')} | {show(case, r, 'cold')} | {warm / ref:.2f}x / "
            f"{ratio_cold} | {floor_ratio} | {peak['total'] / MIB:.0f} ({peak['anon'] / MIB:.0f} + "
            f"{peak['file'] / MIB:.0f}) | {fmt_cap(r.get('cap'))} | "
            f"{'-' if same[key] is None else 'yes' if same[key] else 'NO'} |"
        )
    return "\n".join(lines)


def chart(results: list[tuple[Case, dict[str, dict[str, Any]]]], path: Path) -> None:
    """Latency (or seconds per token) against peak RSS, log-x, one panel per case; filled = warm, hollow = cold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.6), squeeze=False)
    colors = {key: plt.get_cmap("tab10")(i) for i, key in enumerate(CONTENDERS)}
    for ax, (case, rows) in zip(axes[0], results, strict=True):
        for key, r in rows.items():
            for phase, filled in (("warm", True), ("cold", False)):
                if not r[phase]:
                    continue
                x = max(r["peaks"][phase]["total"] / MIB, 1.0)
                y = per_unit(r, phase)
                ax.scatter(
                    x,
                    y,
                    s=55,
                    marker="o",
                    facecolors=colors[key] if filled else "none",
                    edgecolors=colors[key],
                    label=CONTENDERS[key] if filled else None,
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
        ax.set_ylim(bottom=0)
        ax.set_xlabel("peak RSS above baseline, MiB (log scale)")
        ax.set_ylabel("seconds per token" if case.generate else "latency per forward, s")
        ax.set_title(case.title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, title="filled: warm, hollow: cold", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_case(
    case: Case, contenders: list[str], args: argparse.Namespace, work: Path, cap_note: str | None
) -> dict[str, dict[str, Any]]:
    """Every contender on one case, then (if asked) the cap search; prints the table."""
    import torch

    from pylomin import manifest

    t_case = time.perf_counter()
    spec = case.spec(args.max_generate_s, args.accelerate_api)
    m = manifest.read(case.block)
    bandwidth = cold_read_bandwidth(unit_files(case.block))
    needed = forward_bytes(case.block)
    floor = needed / bandwidth
    print(f"\n### {case.title}\n", flush=True)
    print(
        f"{m.nbytes / 2**30:.2f} GiB fp32; {os.cpu_count()} CPUs; cold sequential read of the unit files "
        f"{bandwidth / MIB:.0f} MiB/s; a {'token' if case.generate else 'forward'} reads {needed / MIB:.0f} MiB "
        f"(all but the word embeddings' lookup) -> I/O floor {floor:.3f} s"
        + (f" per token ({1 / floor:.2f} tokens/s)" if case.generate else ""),
        flush=True,
    )
    rows: dict[str, dict[str, Any]] = {}
    for key in contenders:
        t0 = time.perf_counter()
        r = rows[key] = spawn(spec, key, work)
        if r["api"]:
            print(f"  accelerate loaded with: {r['api']}", flush=True)
        if r.get("memory_note"):
            print(f"  {CONTENDERS[key]} chose: {r['memory_note']}", flush=True)
        for note in r["notes"]:
            print(f"  {CONTENDERS[key]}: {note}", flush=True)
        warm, cold = show(case, r, "warm", " tokens/s"), show(case, r, "cold", " tokens/s")
        print(
            f"  {CONTENDERS[key]}: warm {warm}, cold {cold}, peak "
            f"{max(p['total'] for p in r['peaks'].values()) / MIB:.0f} MiB ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    if case.caps:
        if cap_note is not None:
            print(f"  min cap: skipped ({cap_note})", flush=True)
        else:
            for key in contenders:
                print(f"  min cap, {CONTENDERS[key]}:", flush=True)
                rows[key]["cap"] = min_cap(spec, key, rows[key], work, args.cap_steps)
    same: dict[str, bool | None] = {}
    for key, r in rows.items():
        if "memory" not in rows or key == "memory" or key in QUANTIZED:
            same[key] = None
        elif case.generate:
            n = min(len(r["output"]), len(rows["memory"]["output"]))  # fewer tokens where timed on fewer
            same[key] = r["output"][:n] == rows["memory"]["output"][:n]
        else:
            same[key] = torch.equal(torch.load(work / f"{key}.pt"), torch.load(work / "memory.pt"))
    print()
    print(table(case, rows, floor, same))
    warm_cold = "generate() calls" if case.generate else "forwards"
    print(
        f"\nwarm: median of {case.runs_warm} {warm_cold} after a warm-up (pylomin's explicit modes: "
        f"drop_page_cache=False); cold: median of {case.runs_cold}, the contender's files evicted before each "
        "(pylomin's explicit modes: drop_page_cache=True"
        + (
            ", so every token re-reads the streamed units; the others read from disk on the first token at most"
            if case.generate
            else ""
        )
        + "; in memory: the weights are mapped and resident, eviction cannot drop them).\n"
        "pylomin, default (auto): load_streaming(folder, cls) with no options in both phases "
        '(memory_budget="auto", what it chose is printed above); when the model fits in the memory '
        "this process may use, it is kept mapped and resident from the load on, like the in-memory "
        "model, so the eviction cannot drop it and cold is about as fast as warm. The streaming modes "
        "(memory_budget=0, everything streams) show what a cold read costs.\n"
        "vs in memory: time per forward (per token) over the in-memory warm one, 1.00x = as fast."
        + (" (N tokens): timed on fewer new tokens, see --max-generate-s." if case.generate else "")
        + " Peak RSS: whole process (load + runs) above the RSS after "
        "the imports; total exact (kernel high-water mark), split sampled every 10 ms."
        + (
            f"\nmin cap: smallest cgroup memory limit (RAM + swap, page cache charged) under which loading and two "
            f"forwards exit 0 within 30 s + 10x the unlimited load + warm-up + cold forward, binary search in {CAP_STEP // MIB} MiB steps "
            f"(at most {args.cap_steps}); in brackets: ✗ the largest cap tried that failed (OOM-killed or too slow), "
            "and the wall time of the run at the minimal cap (process start and imports included)."
            if case.caps and cap_note is None
            else ""
        ),
        flush=True,
    )
    print(f"({time.perf_counter() - t_case:.0f} s)", flush=True)
    for r in rows.values():
        r["floor_s"], r["bandwidth"] = floor, bandwidth
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small BERT and GPT-2, 2 runs (a few minutes)")
    p.add_argument("--runs", type=int, help="timed runs per contender, warm and cold (default: per case)")
    p.add_argument("--no-caps", action="store_true", help="skip the memory-cap search (BERT batch 1)")
    p.add_argument("--cap-steps", type=int, help="most capped runs per contender (default 5, --quick 2)")
    p.add_argument("--skip-bert", action="store_true")
    p.add_argument("--skip-gpt2", action="store_true")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated subset of {list(CONTENDERS)}")
    p.add_argument(
        "--max-generate-s",
        type=float,
        default=60.0,
        help="a generate() expected to take longer is timed on fewer tokens (a warm one also once, and not cold)",
    )
    p.add_argument(
        "--accelerate-api",
        choices=("auto", "disk_offload"),
        default="auto",
        help="auto: transformers' device_map disk offload, accelerate.disk_offload if refused",
    )
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--offload", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--trial", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.spec), args.child, args.offload, args.trial)))
        return 0

    t_start = time.perf_counter()
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if unknown := set(contenders) - set(CONTENDERS):
        p.error(f"unknown contenders {sorted(unknown)}")
    if args.cap_steps is None:
        args.cap_steps = 2 if args.quick else 5
    cap_note = "--no-caps" if args.no_caps else _cgroup.unavailable()

    def runs(warm: int, cold: int) -> tuple[int, int]:
        return (args.runs, args.runs) if args.runs else (2, 2) if args.quick else (warm, cold)

    cases: list[Case] = []
    if not args.skip_bert:
        src = benchmark_bert(args.quick)
        block = ensure_converted(src, MODELS / f"{src.name}-pylomin-block")
        leaf = ensure_converted(src, MODELS / f"{src.name}-pylomin-leaf", "leaf")
        name = "small BERT" if args.quick else "BERT 1.6 GiB"
        cases.append(Case("bert", f"{name}, batch 1 x {SEQ}", src, block, leaf, 1, *runs(3, 3), caps=True))
        cases.append(Case("bert", f"{name}, batch 8 x {SEQ}", src, block, leaf, 8, *runs(2, 2)))
    if not args.skip_gpt2:
        name = "gpt2-small-random" if args.quick else "gpt2-large-random"
        src = ensure_gpt2(GPT2_SMALL if args.quick else GPT2_LARGE, name)
        block = ensure_converted(src, MODELS / f"{name}-pylomin")
        leaf = ensure_converted(src, MODELS / f"{name}-pylomin-leaf", "leaf")
        title = f"{'small GPT-2' if args.quick else 'GPT-2-large-sized'}, generate() {NEW_TOKENS} from {PROMPT_TOKENS}"
        cases.append(Case("gpt2", title, src, block, leaf, 1, *runs(2, 1)))

    results = []
    OUT.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for case in cases:
            results.append((case, run_case(case, contenders, args, Path(tmp), cap_note)))
    if results:
        chart(results, OUT / "bench.png")
        dump = [{"case": case.title, "kind": case.kind, "batch": case.batch, "rows": rows} for case, rows in results]
        (OUT / "bench.json").write_text(json.dumps(dump, indent=1))
        print(f"\nwrote {OUT / 'bench.png'} and {OUT / 'bench.json'}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
