"""Benchmark of `pylomin.convert`: speed against `cat`, and peak memory against the largest tensor.

For each source format (a safetensors folder and a torch `.bin` folder of the same checkpoint) and
each page-cache state (cold: the source dropped from the page cache first; warm), the conversion runs
in a fresh child process that has imported only torch and pylomin. The child reports the wall time
and the peak resident set above its RSS after imports; the parent compares the throughput with
`cat FILE > /dev/null` in the same cache state and the peak with the bound `largest tensor + 64 MiB`.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_convert.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import internals, models  # noqa: E402
from benchmarks.harness.measure import evict  # noqa: E402
from benchmarks.harness.paths import MIB  # noqa: E402

SLACK = 64 * MIB  # allowed above the largest tensor


def child_convert(src: Path) -> None:
    """Convert `src` into a temporary folder and print one JSON line of measurements."""
    import pylomin

    base = internals.rss()
    tmp = Path(tempfile.mkdtemp(prefix=".bench-convert-", dir=src.parent))
    try:
        with internals.peak_rss() as peak:
            t0 = time.perf_counter()
            pylomin.convert(src, tmp / "out", progress=False)
            seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = {"seconds": seconds, "base": base.total, "total": peak.total, "anon": peak.anon, "file": peak.file}
    print(json.dumps(result), flush=True)


def child_make_bin(src: Path, dst: Path) -> None:
    """Save the safetensors folder `src` as a torch `.bin` folder `dst` (config.json copied along)."""
    import torch
    from safetensors.torch import load_file

    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(load_file(src / "model.safetensors"), tmp / "pytorch_model.bin")
    shutil.copyfile(src / "config.json", tmp / "config.json")
    tmp.rename(dst)


def ensure_bin(src: Path) -> Path:
    """The `.bin` twin of `src`, built in a child process so that this one never holds the model."""
    dst = src.with_name(src.name + "-bin")
    if not (dst / "pytorch_model.bin").is_file():
        print(f"building {dst} ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, __file__, "--make-bin", str(src), str(dst)], check=True)
    return dst


def largest_tensor(path: Path) -> tuple[str, int]:
    """Name and size in bytes of the largest tensor of a safetensors file, from its header."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    sizes = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    name = max(sizes, key=lambda k: sizes[k])
    return name, sizes[name]


def cat_seconds(path: Path) -> float:
    """Wall time of `cat path > /dev/null`."""
    t0 = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def convert_in_child(src: Path) -> dict[str, float]:
    """Run `child_convert(src)` in a fresh interpreter and return its measurements."""
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(src)], check=True, stdout=subprocess.PIPE, text=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench(folders: dict[str, Path], largest: int) -> list[dict[str, object]]:
    """One row per (format, cache state)."""
    rows = []
    for fmt, folder in folders.items():
        weights = next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        nbytes = weights.stat().st_size
        for cache in ("cold", "warm"):
            if cache == "cold":
                evict([weights])
            cat_s = cat_seconds(weights)
            if cache == "cold":
                evict([weights])
            m = convert_in_child(folder)
            rows.append(
                {
                    "format": fmt,
                    "cache": cache,
                    "seconds": m["seconds"],
                    "mbps": nbytes / m["seconds"] / 1e6,
                    "cat_mbps": nbytes / cat_s / 1e6,
                    "base": m["base"],
                    "total": m["total"],
                    "anon": m["anon"],
                    "file": m["file"],
                    "within": m["total"] < largest + SLACK,
                }
            )
    return rows


def print_table(rows: list[dict[str, object]], largest: int) -> None:
    """Markdown table of the rows."""
    print(
        "| format | cache | convert s | MB/s | cat MB/s | ratio convert/cat | peak RSS total/anon/file MiB "
        "| largest tensor MiB | bound (largest+64) MiB | within bound |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        peak = f"{r['total'] / MIB:.1f} / {r['anon'] / MIB:.1f} / {r['file'] / MIB:.1f}"
        print(
            f"| {r['format']} | {r['cache']} | {r['seconds']:.2f} | {r['mbps']:.0f} | {r['cat_mbps']:.0f} "
            f"| {r['mbps'] / r['cat_mbps']:.2f} | {peak} | {largest / MIB:.1f} | {(largest + SLACK) / MIB:.1f} "
            f"| {'yes' if r['within'] else 'no'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small BERT instead of the 1.6 GiB one")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-bin", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_convert(args.child)
    elif args.make_bin:
        child_make_bin(*args.make_bin)
    else:
        run(quick=args.quick)


def run(quick: bool) -> None:
    """Build the checkpoints if missing, measure, and print the table."""
    src = (models.BERT_SMALL if quick else models.BERT).src()
    folders = {"safetensors": src, "bin": ensure_bin(src)}
    name, largest = largest_tensor(src / "model.safetensors")
    size = (src / "model.safetensors").stat().st_size
    print(f"checkpoint: {src} ({size / MIB:.1f} MiB); largest tensor: {name} ({largest / MIB:.1f} MiB)")
    print(f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset')}, {os.cpu_count()} CPUs\n")
    rows = bench(folders, largest)
    print_table(rows, largest)
    base = ", ".join(f"{r['format']}/{r['cache']} {r['base'] / MIB:.0f}" for r in rows)
    print(f"\nRSS after imports (MiB), the baseline of the peaks: {base}")


if __name__ == "__main__":
    main()
