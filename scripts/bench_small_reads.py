"""Many small reads, cold: how fast expert-sized byte ranges come in from disk, by how they are read.

A mixture-of-experts decode token reads a few experts per layer, each one byte range of 0.5-10 MiB
(Qwen3-MoE / OLMoE: 0.5-2 MiB, Mixtral-8x7B: 336 MiB in bf16, the Mixtral-shaped benchmark model:
10.5 MiB). Whether those reads run at the disk's speed depends on how many are in flight. This script
writes one file of random bytes (`--file-mib`, default 1024), then for each range size reads
`--read-mib` of randomly placed, non-overlapping, range-aligned ranges (the same set for every method),
the file's pages dropped (`POSIX_FADV_DONTNEED`) before each pass, and reports GB/s against a cold
sequential read of the whole file in 16 MiB `readinto`s:

- `mmap 1`: the file mapped (private, `MADV_RANDOM` as the runtime maps fused experts: no read-around),
  `MADV_POPULATE_READ` of one range after the other on one thread: faults 4 KiB at a time.
- `mmap N`: the same from a pool of N threads, one range each in flight.
- `madv willneed`: `MADV_WILLNEED` on every range first (the kernel queues reads asynchronously, but
  at most its read-ahead cap of each call), then `MADV_POPULATE_READ` of each.
- `fadv 128K`: `POSIX_FADV_WILLNEED` on every range in 128 KiB pieces, then `MADV_POPULATE_READ` of
  each: what the runtime's expert reads do (`Store.read_exactly`, `Store._will_need`).
- `pread 1` / `pread N`: `os.preadv` of each range into a preallocated buffer, on 1 or N threads.

    .venv/bin/python scripts/bench_small_reads.py [--sizes 0.5,1.5,4,10] [--threads 4,8] [--reps 3]

Prints a table; writes bench-out/bench_small_reads.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import report  # noqa: E402
from benchmarks.harness.measure import cold_read_bandwidth, evict  # noqa: E402
from benchmarks.harness.paths import MIB, MODELS, OUT  # noqa: E402
from pylomin import _os  # noqa: E402

Ranges = list[tuple[int, int]]
CHUNK = 128 * 2**10  # the runtime's POSIX_FADV_WILLNEED piece (pylomin/runtime/store.py)


def write_file(path: Path, size: int) -> None:
    if path.is_file() and path.stat().st_size == size:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        for _ in range(size // (16 * MIB)):
            f.write(os.urandom(16 * MIB))
        f.flush()
        os.fsync(f.fileno())


def ranges_of(size: int, length: int, total: int, seed: int) -> Ranges:
    slots = size // length
    picked = random.Random(seed).sample(range(slots), min(slots, max(1, total // length)))
    return [(s * length, length) for s in picked]


def with_mapping(path: Path, run: Callable[[int, Ranges], None], ranges: Ranges) -> float:
    fd = os.open(path, os.O_RDONLY)
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # as the runtime maps unit files
    finally:
        os.close(fd)
    try:
        anchor = ctypes.c_char.from_buffer(mm)
        base = ctypes.addressof(anchor)
        del anchor  # the mapping stays closable
        _os.madvise(base, len(mm), mmap.MADV_RANDOM)
        t0 = time.perf_counter()
        run(base, ranges)
        return sum(n for _, n in ranges) / (time.perf_counter() - t0)
    finally:
        mm.close()


def populate(base: int, ranges: Ranges) -> None:
    for offset, length in ranges:
        _os.madvise(base + offset, length, _os.MADV_POPULATE_READ)


def populate_pool(threads: int) -> Callable[[int, Ranges], None]:
    def run(base: int, ranges: Ranges) -> None:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda r: _os.madvise(base + r[0], r[1], _os.MADV_POPULATE_READ), ranges))

    return run


def willneed(base: int, ranges: Ranges) -> None:
    for offset, length in ranges:
        _os.madvise(base + offset, length, mmap.MADV_WILLNEED)
    populate(base, ranges)


def fadvise_pieces(path: Path) -> Callable[[int, Ranges], None]:
    def run(base: int, ranges: Ranges) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, length in ranges:
                for pos in range(offset, offset + length, CHUNK):
                    os.posix_fadvise(fd, pos, min(CHUNK, offset + length - pos), os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)
        populate(base, ranges)

    return run


def pread(path: Path, ranges: Ranges, threads: int) -> float:
    fd = os.open(path, os.O_RDONLY)
    length = ranges[0][1]
    buffers = [bytearray(length) for _ in range(threads)]
    try:
        t0 = time.perf_counter()
        if threads == 1:
            for offset, _ in ranges:
                os.preadv(fd, [buffers[0]], offset)
        else:
            with ThreadPoolExecutor(threads) as pool:
                slots = {i % threads: buffers[i % threads] for i in range(threads)}
                list(pool.map(lambda ir: os.preadv(fd, [slots[ir[0] % threads]], ir[1][0]), enumerate(ranges)))
        return sum(n for _, n in ranges) / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="0.5,1.5,4,10", help="range sizes in MiB")
    p.add_argument("--threads", default="4,8", help="pool sizes")
    p.add_argument("--file-mib", type=int, default=1024)
    p.add_argument("--read-mib", type=int, default=256, help="bytes read per pass")
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    path = MODELS / "small-reads-data" / "data.bin"
    write_file(path, args.file_mib * MIB)
    pools = [int(t) for t in args.threads.split(",")]
    methods: dict[str, Callable[[Ranges], float]] = {"mmap 1": lambda r: with_mapping(path, populate, r)}
    for t in pools:
        methods[f"mmap {t}"] = lambda r, t=t: with_mapping(path, populate_pool(t), r)
    methods["madv willneed"] = lambda r: with_mapping(path, willneed, r)
    methods["fadv 128K"] = lambda r: with_mapping(path, fadvise_pieces(path), r)
    methods["pread 1"] = lambda r: pread(path, r, 1)
    for t in pools:
        methods[f"pread {t}"] = lambda r, t=t: pread(path, r, t)
    sequential = cold_read_bandwidth([path], args.reps)
    rows, dump = [], {"sequential": sequential, "file_mib": args.file_mib, "cpus": os.cpu_count()}
    for size in (float(s) for s in args.sizes.split(",")):
        length = int(size * MIB) // 4096 * 4096
        rates: dict[str, float] = {}
        for name, method in methods.items():
            got = []
            for rep in range(args.reps):
                ranges = ranges_of(path.stat().st_size, length, args.read_mib * MIB, seed=rep)
                evict([path])
                got.append(method(ranges))
            rates[name] = statistics.median(got)
        dump[str(size)] = rates
        rows.append([f"{size:g}", *(f"{v / 1e9:.2f} ({v / dump['sequential']:.2f}x)" for v in rates.values())])
    print(f"cold sequential read of {args.file_mib} MiB: {dump['sequential'] / 1e9:.2f} GB/s; {os.cpu_count()} CPUs")
    print(report.table(["range MiB", *methods], "r" * (len(methods) + 1), rows))
    print(f"GB/s (x the sequential read), medians of {args.reps}; {args.read_mib} MiB of random ranges per pass")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_small_reads.json").write_text(json.dumps(dump, indent=1))
    evict([path])
    return 0


if __name__ == "__main__":
    sys.exit(main())
