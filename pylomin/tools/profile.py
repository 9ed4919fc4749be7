"""`pylomin.profile`: per-unit read, wait, load and compute spans, as a Chrome trace and a one-line verdict."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

    from pylomin.runtime.experts import Chosen

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Span:
    """One timed piece of work on one unit: `read` (reader thread), `wait`, `load`, `compute`, `release`,
    or `experts` (reading the experts the router chose: `experts` lists them, `hits` were kept already,
    `guessed` bytes were read ahead on a guess of this layer's choice, `wasted` of them not chosen)."""

    unit: str
    kind: str
    start_ns: int
    end_ns: int
    thread: int
    nbytes: int = 0
    experts: tuple[int, ...] = ()
    hits: int = 0
    guessed: int = 0
    wasted: int = 0

    @property
    def seconds(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9


@dataclass
class Profile:
    """The spans recorded while `pylomin.profile` was active."""

    names: list[str]
    nbytes: list[int]
    spans: list[Span] = field(default_factory=list)
    memory: str = ""  # what the memory policy chose (`memory_budget="auto"`), in words
    _open: dict[tuple[int, int], int] = field(default_factory=dict)

    # --- called by the hooks and the reader (list.append and dict ops are atomic under the GIL) ---

    def add(self, target: int, kind: str, start_ns: int, end_ns: int, *, nbytes: int = 0) -> None:
        self.spans.append(Span(self.names[target], kind, start_ns, end_ns, threading.get_ident(), nbytes))

    def experts(self, target: int, start_ns: int, end_ns: int, chosen: Chosen) -> None:
        self.spans.append(
            Span(
                self.names[target],
                "experts",
                start_ns,
                end_ns,
                threading.get_ident(),
                chosen.read,
                tuple(chosen.experts),
                chosen.hits,
                chosen.guessed,
                chosen.wasted,
            )
        )

    def begin_compute(self, target: int, now_ns: int) -> None:
        self._open[(threading.get_ident(), target)] = now_ns

    def end_compute(self, target: int, now_ns: int) -> None:
        start = self._open.pop((threading.get_ident(), target), None)
        if start is not None:
            self.add(target, "compute", start, now_ns)

    # --- reading the results ---------------------------------------------------------------------

    def totals(self) -> dict[str, float]:
        """Seconds per kind of span, summed, plus `wall`, `read_bytes` and `read_gbps`; for
        mixture-of-experts models also `expert_bytes` (read for the chosen experts), `expert_lookups`
        (experts chosen), `expert_hits` (of which were kept resident already), `expert_hit_rate`,
        `expert_guessed_bytes` (read ahead on a guess of the next layer's choice) and `expert_wasted_bytes`
        (guessed and not chosen)."""
        out: dict[str, float] = {k: 0.0 for k in ("read", "wait", "load", "compute", "release", "experts")}
        for s in self.spans:
            out[s.kind] = out.get(s.kind, 0.0) + s.seconds
        if self.spans:
            out["wall"] = (max(s.end_ns for s in self.spans) - min(s.start_ns for s in self.spans)) / 1e9
        else:
            out["wall"] = 0.0
        read_bytes = sum(s.nbytes for s in self.spans if s.kind in ("read", "load"))
        read_time = out["read"] or out["load"]
        out["read_bytes"] = float(read_bytes)
        out["read_gbps"] = read_bytes / read_time / 1e9 if read_time else 0.0
        experts = [s for s in self.spans if s.kind == "experts"]
        out["expert_bytes"] = float(sum(s.nbytes for s in experts))
        out["expert_lookups"] = float(sum(len(s.experts) for s in experts))
        out["expert_hits"] = float(sum(s.hits for s in experts))
        out["expert_hit_rate"] = out["expert_hits"] / out["expert_lookups"] if out["expert_lookups"] else 0.0
        out["expert_guessed_bytes"] = float(sum(s.guessed for s in experts))
        out["expert_wasted_bytes"] = float(sum(s.wasted for s in experts))
        return out

    def experts_by_layer(self) -> dict[str, dict[str, int]]:
        """Per experts module: bytes `read` for its chosen experts (not kept), `guessed` (read ahead on a
        guess, right or wrong) and `wasted` (guessed, not chosen), and `calls`."""
        out: dict[str, dict[str, int]] = {}
        for s in self.spans:
            if s.kind == "experts":
                row = out.setdefault(s.unit, {"calls": 0, "read": 0, "guessed": 0, "wasted": 0})
                row["calls"] += 1
                row["read"] += s.nbytes
                row["guessed"] += s.guessed
                row["wasted"] += s.wasted
        return out

    def verdict(self) -> str:
        """One line: disk-bound or compute-bound, the read bandwidth, how long compute sat idle."""
        t = self.totals()
        if not t["wall"]:
            return "nothing recorded: run the model inside `with pylomin.profile(model):`"
        stalled = t["wait"] + t["load"] + t["release"] + t["experts"]  # compute thread inside hooks, not computing
        idle = stalled / t["wall"]
        rate = f"{t['read_gbps']:.1f} GB/s" if t["read_gbps"] else "no reads"
        kind = "disk-bound" if idle > 0.10 else "compute-bound"
        line = f"{kind}: {rate}, compute idle {idle:.0%} of {t['wall']:.3f} s ({t['read_bytes'] / 2**20:.0f} MiB read)"
        if self.memory:
            line += f"; {self.memory}"
        if t["expert_lookups"]:
            line += (
                f"; experts: {t['expert_lookups']:.0f} chosen, {t['expert_hit_rate']:.0%} kept resident,"
                f" {t['expert_bytes'] / 2**20:.0f} MiB read for the others"
            )
            if t["expert_guessed_bytes"]:
                right = 1 - t["expert_wasted_bytes"] / t["expert_guessed_bytes"]
                line += (
                    f" ({t['expert_guessed_bytes'] / 2**20:.0f} MiB read ahead on a guess, {right:.0%} of it chosen)"
                )
        return line

    def _threads(self) -> list[tuple[int, str]]:
        """(thread id, "reader" or "compute") of every thread that recorded a span, in id order."""
        readers = {s.thread for s in self.spans if s.kind == "read"}
        return [(t, "reader" if t in readers else "compute") for t in sorted({s.thread for s in self.spans})]

    def chrome_trace(self) -> dict[str, Any]:
        """The spans as a Chrome trace (open in Perfetto or chrome://tracing)."""
        pid = os.getpid()
        t0 = min((s.start_ns for s in self.spans), default=0)
        events: list[dict[str, Any]] = []
        for i, (tid, role) in enumerate(self._threads()):
            name = role if role == "reader" else f"{role} {i}"
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": name}})
        for s in self.spans:
            events.append(
                {
                    "name": s.unit,
                    "cat": s.kind,
                    "ph": "X",
                    "ts": (s.start_ns - t0) / 1e3,
                    "dur": (s.end_ns - s.start_ns) / 1e3,
                    "pid": pid,
                    "tid": s.thread,
                    "args": {"kind": s.kind, "bytes": s.nbytes}
                    | (
                        {"experts": list(s.experts), "kept": s.hits, "guessed": s.guessed, "wasted": s.wasted}
                        if s.kind == "experts"
                        else {}
                    ),
                }
            )
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": {"verdict": self.verdict()}}

    def save_trace(self, path: str | os.PathLike[str]) -> None:
        """Write the Chrome trace JSON to `path`."""
        Path(path).write_text(json.dumps(self.chrome_trace()))

    def save_png(self, path: str | os.PathLike[str]) -> None:
        """Draw a timeline (one row per thread, colored by kind) to `path`; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("the PNG timeline needs matplotlib: pip install 'pylomin[dev]' or matplotlib") from None
        colors = {
            "read": "tab:orange",
            "wait": "tab:red",
            "load": "tab:purple",
            "compute": "tab:blue",
            "release": "tab:gray",
            "experts": "tab:green",
        }
        t0 = min((s.start_ns for s in self.spans), default=0)
        threads = self._threads()
        fig, ax = plt.subplots(figsize=(12, 1 + 0.8 * len(threads)))
        labelled: set[str] = set()
        for row, (tid, _) in enumerate(threads):
            for kind, color in colors.items():
                bars = [
                    ((s.start_ns - t0) / 1e6, s.seconds * 1e3) for s in self.spans if s.thread == tid and s.kind == kind
                ]
                if bars:
                    ax.broken_barh(bars, (row - 0.4, 0.8), color=color, label=None if kind in labelled else kind)
                    labelled.add(kind)
        ax.set_yticks(range(len(threads)), [role for _, role in threads])
        ax.set_xlabel("ms")
        ax.set_title(self.verdict(), fontsize=9)
        ax.legend(loc="upper right", fontsize=8)  # each kind is labelled once above
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)


@contextlib.contextmanager
def profile(
    model: nn.Module, *, trace: str | os.PathLike[str] | None = None, png: str | os.PathLike[str] | None = None
) -> Iterator[Profile]:
    """Record where a streamed model's time goes while the block runs.

    Args:
        model: a model from `load_streaming` or `lazy_loading`.
        trace: write a Chrome trace JSON here at the end (Perfetto, chrome://tracing).
        png: draw a timeline PNG here at the end (needs matplotlib).

    Yields:
        The `Profile`; `profile.verdict()` says e.g. "disk-bound: 1.9 GB/s, compute idle 41 % ...".
        Nothing is recorded, and nothing costs, outside the block.

    Example:
        >>> with pylomin.profile(model, trace="trace.json") as prof:
        ...     model(input_ids)
        >>> print(prof.verdict())
    """
    from pylomin.runtime.model import stream_of

    stream = stream_of(model)
    plan = stream.policy.plan
    prof = Profile(names=list(plan.names), nbytes=[sum(r.length for r in ranges) for ranges in plan.ranges])
    stream.lifecycle.recorder = prof
    if stream.reader is not None:
        stream.reader.recorder = prof
    try:
        yield prof
    finally:
        prof.memory = stream.policy.note  # as it stands at the end (a re-plan may have moved it)
        stream.lifecycle.recorder = None
        if stream.reader is not None:
            stream.reader.recorder = None
        if trace is not None:
            prof.save_trace(trace)
        if png is not None:
            prof.save_png(png)
        logger.info("%s", prof.verdict())
