"""What the benchmarks print and draw: markdown tables, the status of a capped run, and the two charts."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness.paths import MIB


def table(header: Sequence[str], align: str, rows: Iterable[Sequence[object]]) -> str:
    """A markdown table; `align` has one letter per column: l(eft), r(ight) or c(entre)."""
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(map(str, row)) + " |" for row in rows)])


def median(xs: Sequence[float]) -> float:
    """The median, nan for none."""
    return statistics.median(xs) if xs else math.nan


def num(value: float | None, spec: str) -> str:
    """`value` formatted with `spec`; "-" for None (a run that did not get that far) or nan."""
    return "-" if value is None or value != value else format(value, spec)


def smallest_cap(c: dict[str, Any] | None) -> str:
    """A `runner.smallest_cap` result: the cap in MiB (✗ the largest that failed, the seconds at the cap)."""
    if c is None:
        return "-"
    if c["cap"] is None:
        return f"> {c['fails'] / MIB:.0f}"
    failed = f"✗ {c['fails'] / MIB:.0f}, " if c["fails"] is not None else ""
    return f"{c['cap'] / MIB:.0f} ({failed}{c['seconds']:.0f} s)"


def status(r: dict[str, Any]) -> str:
    """How a capped run ended: ok, or why and in which step (the child's `step`)."""
    if r.get("skipped"):
        return str(r["skipped"])
    if r["ok"]:
        return "ok" if r.get("forwards", 2) == 2 else "ok (one forward)"
    return f"{r['reason']} in {r['step']} after {r['seconds']:.0f} s"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("the charts need matplotlib: pip install -c constraints.txt -e '.[dev]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_chart(
    panels: list[tuple[str, bool, dict[str, dict[str, Any]]]], labels: dict[str, str], path: Path
) -> None:
    """Seconds per forward (or per token) against peak RSS, log x, one panel per (title, generate, rows);
    filled: warm, hollow: cold. A row holds `warm` / `cold` times, `tokens` and `peaks` per phase."""
    plt = _pyplot()
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.6), squeeze=False)
    colors = {key: plt.get_cmap("tab10")(i) for i, key in enumerate(labels)}
    for ax, (title, generate, rows) in zip(axes[0], panels, strict=True):
        for key, r in rows.items():
            for phase, filled in (("warm", True), ("cold", False)):
                if not r[phase]:
                    continue
                ax.scatter(
                    max(r["peaks"][phase]["total"] / MIB, 1.0),
                    median(r[phase]) / r["tokens"][phase],
                    s=55,
                    marker="o",
                    facecolors=colors[key] if filled else "none",
                    edgecolors=colors[key],
                    label=labels[key] if filled else None,
                )
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide on a log axis
        ax.set_ylim(bottom=0)
        ax.set_xlabel("peak RSS above baseline, MiB (log scale)")
        ax.set_ylabel("seconds per token" if generate else "latency per forward, s")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7, title="filled: warm, hollow: cold", title_fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def ladder_chart(dump: dict[str, Any], labels: dict[str, str], path: Path, seq: int) -> None:
    """Decode tokens/s (an encoder: forward seconds) against the limit in % of the model, one line per contender,
    the I/O floor dashed, failures as x on the axis; the percentage limits only."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {key: plt.get_cmap("tab10")(i) for i, key in enumerate(labels)}
    values: list[float] = []
    failed: dict[str, list[int]] = {}
    bert = dump.get("kind") == "bert"
    metric = "forward_s" if bert else "decode_tps"
    percent = [r for r in dump["runs"] if r.get("pct") is not None]
    for key in labels:
        runs = [r for r in percent if r["contender"] == key]
        good = [(r["pct"], r[metric]) for r in runs if r["ok"]]
        failed[key] = [r["pct"] for r in runs if not r["ok"] and not r.get("skipped")]
        if good:
            xs, ys = zip(*sorted(good), strict=True)
            ax.plot(xs, ys, "o-", color=colors[key], label=f"{key}: {labels[key]}")
            values += ys
    floors = {pct: s for pct, s in dump["floors"].items() if pct.isdigit()}  # absolute limits are keyed "384MiB"
    floor = [(int(pct), s if bert else 1 / s) for pct, s in floors.items() if s > 0]
    if floor:
        xs, ys = zip(*sorted(floor), strict=True)
        what = "what does not fit, read once per forward" if bert else "what does not fit, read once per token"
        ax.plot(xs, ys, "k--", label=f"{'' if bert else '1 / '}I/O floor ({what})")
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
    ax.set_ylabel((f"forward s (1 x {seq})" if bert else "decode tokens/s") + (" (log scale)" if log else ""))
    ax.set_title(
        f"{dump['model']} ({dump['model_bytes'] / MIB:.0f} MiB fp32), {dump['cpus']} CPU cores; x on the axis: failed\n"
        f"{dump['command']}",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))  # below the axes: never over a line
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def tokens_per_read_chart(dump: dict[str, Any], path: Path) -> None:
    """Two panels from `benchmarks.speculative`: decode tok/s of the trained target under its limit per draft
    (bars, acceptance on top), and decode tok/s against sequences per batch at each limit."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    ax = axes[0]
    draft = dump.get("draft", {})
    bars = [r for r in draft.get("rows", []) if r["contender"] == "share50" and r.get("tps")]
    colors = {"continue": plt.get_cmap("tab10")(0), "rewrite": plt.get_cmap("tab10")(1)}
    for i, r in enumerate(bars):
        ax.bar(i, r["tps"], color=colors[r["task"]], alpha=0.5 if not r["draft"] else 1.0)
        if r.get("acceptance") is not None:
            ax.text(i, r["tps"], f"{r['acceptance']:.0%}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(
        range(len(bars)),
        [f"{r['task']}:\n" + (r["draft"] or "plain").replace(" defaults", "\n(transformers'\ndefaults)") for r in bars],
        fontsize=6,
    )
    ax.set_ylabel("decode tokens/s")
    limit = draft.get("limit")
    ax.set_title(
        f"drafts: the trained target, half of it resident, under {limit / MIB:.0f} MiB\n"
        "pale: plain streamed decode; on top: the share of drafted tokens kept",
        fontsize=9,
    )
    ax.grid(True, axis="y", alpha=0.3)
    ax = axes[1]
    batch = dump.get("batch", {})
    rows = batch.get("rows", [])
    for i, pct in enumerate(sorted({r["pct"] for r in rows if r["pct"] is not None}) + [None]):
        got = sorted((r["batch"], r["decode_tps"]) for r in rows if r["pct"] == pct and r.get("decode_tps"))
        if got:
            xs, ys = zip(*got, strict=True)
            label = "in memory (no limit)" if pct is None else f"{pct} % of the model + allowance"
            ax.plot(xs, ys, "o-" if pct is not None else ":", label=label, color="k" if pct is None else f"C{i}")
    ax.set_xlabel("sequences decoded together")
    ax.set_ylabel("decode tokens/s, all sequences")
    ax.set_title(f"batches: {batch.get('model', '')}, sequences of 256 tokens", fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.suptitle("python -m benchmarks.speculative", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
