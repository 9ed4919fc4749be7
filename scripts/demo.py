"""`make demo`: the 1.6 GiB BERT streamed from disk vs in memory: peak memory, latency, bit-identity.

Each contender runs in a fresh process, so every figure is measured above the same baseline: the
resident set right after `import torch, transformers, pylomin`.

The first streamed row is pylomin's default, `load_streaming(folder, BertModel)` with no options:
`memory_budget="auto"` reads the memory this process may use and keeps the whole model resident
when it fits (else what fits, streaming the rest); what it chose is printed under the table. The
other rows are explicit streaming modes, `memory_budget=0`: every unit is read as the model runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import internals, models  # noqa: E402
from benchmarks.harness.paths import ENV, MIB, MODELS  # noqa: E402

MODES = {
    "in memory (transformers)": ["memory"],
    "streamed, default (memory_budget='auto')": ["default", "block"],
    "streamed, block units": ["stream", "block"],
    "streamed, block units, page cache kept": ["stream", "block", "keep"],
    "streamed, leaf units": ["stream", "leaf"],
    "streamed, leaf units, no prefetch (least memory)": ["stream", "leaf", "noprefetch"],
}


def child(mode: list[str], src: Path, runs: int, batch: int, seq: int, out: Path) -> None:
    import torch
    import transformers

    import pylomin

    transformers.logging.set_verbosity_error()
    # transformers imports model code lazily (tens of MiB of code and shared libraries): resolve the
    # class before the baseline, so no contender is charged for it.
    transformers.BertModel  # noqa: B018
    torch.manual_seed(0)
    x = torch.randint(0, models.BERT.vocab, (batch, seq))
    times = []
    base = internals.rss()
    with internals.peak_rss() as first, torch.no_grad():
        if mode[0] == "memory":
            model = transformers.BertModel.from_pretrained(src, dtype=torch.float32).eval()
        elif mode[0] == "default":
            model = pylomin.load_streaming(MODELS / f"{src.name}-pylomin-{mode[1]}", transformers.BertModel)
        else:
            model = pylomin.load_streaming(
                MODELS / f"{src.name}-pylomin-{mode[1]}",
                transformers.BertModel,
                memory_budget=0,
                drop_page_cache="keep" not in mode,
                prefetch=0 if "noprefetch" in mode else 2,
            )
        t0 = time.perf_counter()
        model(x)  # the first forward also initializes kernels; it is not timed
        first_time = time.perf_counter() - t0
    with internals.peak_rss() as steady, torch.no_grad():
        for _ in range(runs):
            t0 = time.perf_counter()
            y = model(x).last_hidden_state
            times.append(time.perf_counter() - t0)
    torch.save(y, out)
    whole = max(first, steady, key=lambda p: (p.start - base).total + p.total)
    result = {
        "latency": statistics.median(times),
        "first": first_time,
        "peak": (whole.start - base).total + whole.total,
        "anon": (whole.start - base).anon + whole.anon,
        "file": (whole.start - base).file + whole.file,
        "forward_peak": steady.total,
        # What memory_budget="auto" chose, as it stands after the runs ("" for the explicit modes).
        "memory_note": "" if mode[0] == "memory" else internals.memory_policy(model)["memory_note"],
    }
    print(json.dumps(result))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3, help="timed forwards per contender (median reported)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    src = models.BERT.src()
    if args.child:
        child(args.child, src, args.runs, args.batch, args.seq, args.out)
        return 0

    for unit in ("block", "leaf"):
        models.BERT.folder(unit)
    m = internals.manifest(models.BERT.folder("block"))
    print(
        f"\nmodel: BERT, {m.nbytes / 2**30:.2f} GiB fp32 parameters; input {args.batch} x {args.seq} tokens; "
        f"{os.cpu_count()} CPUs; torch threads default"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        outputs = {}
        for label, mode in MODES.items():
            out = Path(tmp) / f"{len(outputs)}.pt"
            cmd = [
                sys.executable,
                __file__,
                "--child",
                *mode,
                "--out",
                str(out),
                "--runs",
                str(args.runs),
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            rows.append((label, json.loads(res.stdout.strip().splitlines()[-1])))
            outputs[label] = out
        import torch

        ref = torch.load(outputs["in memory (transformers)"])
        same = {label: torch.equal(torch.load(path), ref) for label, path in outputs.items()}
    base = rows[0][1]["latency"]
    print(
        "\n| run | peak RSS above baseline, MiB (anon + file) | peak per forward, MiB | latency, s | vs in memory | bit-identical |"
    )
    print("|---|---:|---:|---:|---:|:---:|")
    for label, r in rows:
        print(
            f"| {label} | {r['peak'] / MIB:.0f} ({r['anon'] / MIB:.0f} + {r['file'] / MIB:.0f}) | "
            f"{r['forward_peak'] / MIB:.0f} | {r['latency']:.3f} | {r['latency'] / base:.2f}x | "
            f"{'yes' if same[label] else 'NO'} |"
        )
    for label, r in rows:
        if r.get("memory_note"):
            print(f"\n{label} chose: {r['memory_note']}")
    print(
        "\npeak RSS: highest resident set while loading and running, above the RSS after `import torch, "
        "transformers, pylomin`;\npeak per forward: above the RSS before each timed forward (parameters + "
        f"hidden states);\nlatency: median of {args.runs} forwards after one warm-up;\ndefault: "
        "load_streaming(folder, BertModel), no options; the other streamed rows: load_streaming(..., "
        "memory_budget=0, drop_page_cache=True), everything streams, prefetch 2 units ahead unless said; "
        "'page cache kept' = drop_page_cache=False"
    )
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
