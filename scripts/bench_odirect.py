"""O_DIRECT into a reused aligned buffer ring against the page cache, for the streamed units of a model.

Every unit file is read once per pass, in order, the way a forward streams its layers:

- A: the current path (`pylomin/store.py`): each file mapped once (private, kept open); a pass
  makes it resident with `MADV_POPULATE_READ` over the whole file, "uses" it, then drops it with
  `MADV_DONTNEED` + `POSIX_FADV_DONTNEED`.
  A2: the same, with the populate of file i+1 on a reader thread while file i is used.
  A-keep: like A but without `POSIX_FADV_DONTNEED` (the page cache keeps every file until reclaim).
- B: `O_DIRECT` `preadv` in chunks into a ring of 2 page-aligned buffers (anonymous mmaps, sized to
  the largest file rounded up to 4 KiB, faulted in before the timer), one thread, no overlap.
  B2: a pool of reader threads, one chunk in flight each, reading file i+1 into the other buffer
  of the ring while file i is used.

A "use" sums one byte per 4 KiB page (it touches every page once; the sums must agree across
methods). Throughput is over the bytes of all files, in GB/s (1e9 B/s), the median of `--reps`
passes; the page cache of the files is dropped (`POSIX_FADV_DONTNEED` per file) before each pass.
CPU s is `time.process_time()` over a pass (all threads, user + system).

Each variant then runs once more in a child process in a cgroup v1 memory group
(`benchmarks/harness/cgroup.py` `run_capped`): under a 4 GiB limit that does not bind, whose `max_usage` is
the "charged MiB", and under a tight limit (512 MiB by default). `run_capped` drops the whole page
cache before each child; here that drop is replaced by the per-file drop of the test files (the
machine may be shared, and a global drop would disturb anything else running on it); `--drop-all`
keeps `run_capped`'s global drop. So the interpreter's own files are not charged to the child unless
`--drop-all` is given; the footnote gives what a child that only starts and exits is charged.

    python scripts/bench_odirect.py                       # 24 x 60 MiB random files under models/odirect-data/
    python scripts/bench_odirect.py --files 4 --size 16   # small
    python scripts/bench_odirect.py --folder models/bert-1.6g-pylomin-block/units
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import cgroup  # noqa: E402
from benchmarks.harness.measure import drop_page_cache  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MIB = 2**20
PAGE = mmap.PAGESIZE
ALIGN = 4096  # O_DIRECT: offsets, lengths and buffer addresses in multiples of the logical block size
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)

# madvise through ctypes, as pylomin/_os.py does: ctypes releases the GIL for the call (mmap.madvise
# in Python 3.11 holds it), so a populate on the reader thread does not stop the using thread.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _madvise(address: int, length: int, advice: int) -> None:
    if _libc.madvise(address, length, advice) != 0:
        err = ctypes.get_errno() or errno.EINVAL
        raise OSError(err, f"madvise({advice}): {os.strerror(err)}")


def _address(m: mmap.mmap) -> int:
    anchor = ctypes.c_char.from_buffer(m)
    address = ctypes.addressof(anchor)
    del anchor  # release the buffer export: the mapping stays closable
    return address


def _round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


@dataclass(frozen=True)
class Variant:
    method: str  # "A", "A2", "A-keep", "B", "B2", "none"
    chunk_mib: int = 0  # O_DIRECT read size; 0: the whole file in one madvise
    threads: int = 1  # reader threads (B2: chunks in flight)
    overlap: bool = False  # reads of file i+1 run while file i is used

    @property
    def key(self) -> str:
        return f"{self.method}:{self.chunk_mib}:{self.threads}:{int(self.overlap)}"

    @staticmethod
    def parse(key: str) -> Variant:
        method, chunk, threads, overlap = key.split(":")
        return Variant(method, int(chunk), int(threads), overlap == "1")


VARIANTS = [
    Variant("A"),
    Variant("A2", overlap=True),
    Variant("A-keep"),
    Variant("B", 1),
    Variant("B", 4),
    Variant("B", 16),
    Variant("B2", 4, 1, True),
    Variant("B2", 1, 4, True),
    Variant("B2", 4, 2, True),
    Variant("B2", 4, 4, True),
]


# --- test data -----------------------------------------------------------------------------------------


def ensure_data(folder: Path, files: int, size_mib: int) -> list[Path]:
    """`files` files of `size_mib` MiB of random bytes in `folder`, written unless already there."""
    paths = [folder / f"unit-{i:03d}.bin" for i in range(files)]
    size = size_mib * MIB
    if all(p.is_file() and p.stat().st_size == size for p in paths):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"writing {files} x {size_mib} MiB of random bytes to {folder} ...", file=sys.stderr, flush=True)
    for p in paths:
        if p.is_file() and p.stat().st_size == size:
            continue
        tmp = p.with_suffix(".partial")
        with open(tmp, "wb") as f:
            for pos in range(0, size, 4 * MIB):
                f.write(os.urandom(min(4 * MIB, size - pos)))
            f.flush()
            os.fsync(f.fileno())
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        tmp.rename(p)
    print(f"written in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    return paths


def drop_files(paths: list[Path]) -> None:
    """Drop the page cache of these files (nothing else maps them between passes)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# --- the two read paths --------------------------------------------------------------------------------


def _sample_sum(view: memoryview) -> int:
    """The "use" of a unit: one byte of each 4 KiB page."""
    return sum(view[::PAGE])


class PageCache:
    """Method A: every file mapped once; populate, use, drop."""

    def __init__(self, paths: list[Path], variant: Variant):
        self.variant = variant
        self.fds = [os.open(p, os.O_RDONLY) for p in paths]
        self.sizes = [os.fstat(fd).st_size for fd in self.fds]
        self.maps = [
            mmap.mmap(fd, size, access=mmap.ACCESS_COPY) for fd, size in zip(self.fds, self.sizes, strict=True)
        ]
        self.addrs = [_address(m) for m in self.maps]
        self.views = [memoryview(m) for m in self.maps]
        self.pool = ThreadPoolExecutor(1) if variant.overlap else None

    def read(self, i: int) -> None:
        _madvise(self.addrs[i], self.sizes[i], MADV_POPULATE_READ)

    def submit(self, i: int) -> list[Future[Any]]:
        assert self.pool is not None
        return [self.pool.submit(self.read, i)]

    def use(self, i: int) -> int:
        return _sample_sum(self.views[i])

    def finish(self, i: int) -> None:
        _madvise(self.addrs[i], _round_up(self.sizes[i], PAGE), mmap.MADV_DONTNEED)
        if self.variant.method != "A-keep":
            os.posix_fadvise(self.fds[i], 0, self.sizes[i], os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for v in self.views:
            v.release()
        for m in self.maps:
            m.close()
        for fd in self.fds:
            os.close(fd)


class Direct:
    """Method B: O_DIRECT preadv in chunks into a ring of 2 page-aligned buffers."""

    def __init__(self, paths: list[Path], variant: Variant):
        self.variant = variant
        self.chunk = variant.chunk_mib * MIB
        self.fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]
        self.sizes = [os.fstat(fd).st_size for fd in self.fds]
        capacity = _round_up(max(self.sizes))  # the tail is read rounded up: the buffer has room for it
        self.bufs = [mmap.mmap(-1, capacity) for _ in range(2)]  # anonymous mmaps are page-aligned
        for b in self.bufs:  # fault the ring in once, before any timer: it is reused for every file
            try:
                _madvise(_address(b), capacity, MADV_POPULATE_WRITE)
            except OSError:
                for pos in range(0, capacity, PAGE):
                    b[pos] = 0
        self.views = [memoryview(b) for b in self.bufs]
        self.pool = ThreadPoolExecutor(variant.threads) if variant.overlap else None

    def _chunks(self, i: int) -> list[tuple[int, int]]:
        end = _round_up(self.sizes[i])
        return [(pos, min(self.chunk, end - pos)) for pos in range(0, end, self.chunk)]

    def _read_chunk(self, i: int, pos: int, length: int) -> int:
        want = min(length, self.sizes[i] - pos)  # less than `length` only in the last chunk (EOF)
        n = os.preadv(self.fds[i], [self.views[i % 2][pos : pos + length]], pos)
        if n < want:
            raise OSError(errno.EIO, f"short O_DIRECT read: {n} of {want} bytes at {pos} of file {i}")
        return n

    def read(self, i: int) -> None:
        for pos, length in self._chunks(i):
            self._read_chunk(i, pos, length)

    def submit(self, i: int) -> list[Future[Any]]:
        assert self.pool is not None
        return [self.pool.submit(self._read_chunk, i, pos, length) for pos, length in self._chunks(i)]

    def use(self, i: int) -> int:
        return _sample_sum(self.views[i % 2][: self.sizes[i]])

    def finish(self, i: int) -> None:
        pass  # the buffer is simply overwritten by file i+2

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        for v in self.views:
            v.release()
        for b in self.bufs:
            b.close()
        for fd in self.fds:
            os.close(fd)


def open_reader(paths: list[Path], variant: Variant) -> PageCache | Direct:
    return PageCache(paths, variant) if variant.method.startswith("A") else Direct(paths, variant)


def one_pass(reader: PageCache | Direct) -> tuple[float, float, int]:
    """Read, use and finish every file in order: (seconds, CPU seconds, checksum)."""
    n = len(reader.sizes)
    total = 0
    c0, t0 = time.process_time(), time.perf_counter()
    if not reader.variant.overlap:
        for i in range(n):
            reader.read(i)
            total += reader.use(i)
            reader.finish(i)
    else:
        # A ring of 2: file i+1 is read into the other slot while file i is used; the slot of i+1 was
        # last used by file i-1, finished already.
        pending = {0: reader.submit(0)}
        for i in range(n):
            if i + 1 < n:
                pending[i + 1] = reader.submit(i + 1)
            for f in pending.pop(i):
                f.result()
            total += reader.use(i)
            reader.finish(i)
    return time.perf_counter() - t0, time.process_time() - c0, total


# --- child processes under a memory limit --------------------------------------------------------------


def child(key: str, paths: list[Path], out: Path) -> None:
    variant = Variant.parse(key)
    if variant.method == "none":
        out.write_text(json.dumps({"seconds": 0.0, "cpu": 0.0, "checksum": 0}))
        return
    reader = open_reader(paths, variant)
    try:
        seconds, cpu, checksum = one_pass(reader)
    finally:
        reader.close()
    out.write_text(json.dumps({"seconds": seconds, "cpu": cpu, "checksum": checksum}))


def capped(variant: Variant, paths: list[Path], limit: int, drop_all: bool, work: Path) -> dict[str, Any]:
    """One pass of `variant` in a child under `limit` bytes: its result, `max_usage` and how it ended."""
    out = work / f"{variant.method}-{variant.chunk_mib}-{variant.threads}-{limit}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", variant.key, "--out", str(out)]
    cmd += ["--paths", *map(str, paths)]
    drop = drop_page_cache if drop_all else lambda: drop_files(paths)
    run = cgroup.run_capped(cmd, limit, timeout=120, env=os.environ.copy(), drop=drop)
    result: dict[str, Any] = json.loads(out.read_text()) if run.ok and out.is_file() else {}
    return {**result, "ok": run.ok, "reason": run.reason, "max_usage": run.max_usage}


# --- main ----------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--folder", type=Path, help="existing unit files (*.safetensors) instead of random test data")
    ap.add_argument("--files", type=int, default=24, help="test data: number of files (default 24)")
    ap.add_argument("--size", type=int, default=60, help="test data: MiB per file (default 60)")
    ap.add_argument("--reps", type=int, default=3, help="passes per variant, median reported (default 3)")
    ap.add_argument("--tight", type=int, default=512, help="the tight memory limit, MiB (default 512)")
    ap.add_argument("--loose", type=int, default=4096, help="the limit that does not bind, MiB (default 4096)")
    ap.add_argument("--only", help="comma-separated methods to run (A,A2,A-keep,B,B2)")
    ap.add_argument("--no-capped", action="store_true", help="skip the child processes under memory limits")
    ap.add_argument("--drop-all", action="store_true", help="capped runs drop the whole page cache (run_capped)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--paths", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        child(args.child, args.paths, args.out)
        return

    if args.folder:
        paths = sorted(args.folder.glob("*.safetensors"))
        if not paths:
            sys.exit(f"no *.safetensors files in {args.folder}")
    else:
        paths = ensure_data(ROOT / "models" / "odirect-data" / f"{args.files}x{args.size}MiB", args.files, args.size)
    total = sum(p.stat().st_size for p in paths)
    variants = VARIANTS
    if args.only:
        wanted = set(args.only.split(","))
        variants = [v for v in VARIANTS if v.method in wanted]
    why_not = None if args.no_capped else cgroup.unavailable()
    print(
        f"{len(paths)} files, {total / MIB:.0f} MiB in all (largest {max(p.stat().st_size for p in paths) / MIB:.1f} MiB), "
        f"{args.reps} passes per variant, interleaved",
        flush=True,
    )

    times: dict[Variant, list[float]] = {v: [] for v in variants}
    cpus: dict[Variant, list[float]] = {v: [] for v in variants}
    checksums: set[int] = set()
    for _ in range(args.reps):
        for v in variants:
            reader = open_reader(paths, v)  # setup (mapping, the ring faulted in) outside the timer
            try:
                drop_files(paths)
                seconds, cpu, checksum = one_pass(reader)
            finally:
                reader.close()
            times[v].append(seconds)
            cpus[v].append(cpu)
            checksums.add(checksum)
    drop_files(paths)
    if len(checksums) != 1:
        sys.exit(f"the variants read different bytes: checksums {sorted(checksums)}")

    loose: dict[Variant, dict[str, Any]] = {}
    tight: dict[Variant, dict[str, Any]] = {}
    baseline = 0
    if args.no_capped:
        pass
    elif why_not:
        print(f"no capped runs: {why_not}")
    else:
        with tempfile.TemporaryDirectory(prefix="bench-odirect-") as tmp:
            work = Path(tmp)
            baseline = capped(Variant("none"), paths, args.loose * MIB, args.drop_all, work)["max_usage"]
            for v in variants:
                loose[v] = capped(v, paths, args.loose * MIB, args.drop_all, work)
                tight[v] = capped(v, paths, args.tight * MIB, args.drop_all, work)
                for r in (loose[v], tight[v]):
                    if r["ok"] and r["checksum"] not in checksums:
                        sys.exit(f"{v.key}: a capped run read different bytes")

    def rate(r: dict[str, Any] | None) -> str:
        if r is None:
            return "-"
        return f"{total / r['seconds'] / 1e9:.2f}" if r["ok"] else r["reason"]

    header = ["method", "chunk", "threads", "overlap", "GB/s (no limit)", f"GB/s ({args.tight} MiB limit)"]
    header += ["charged MiB", f"charged MiB ({args.tight})", "CPU s"]
    rows = []
    for v in variants:
        rows.append(
            [
                v.method,
                f"{v.chunk_mib} MiB" if v.chunk_mib else "file",
                "1+1" if v.method == "A2" else str(v.threads),
                "yes" if v.overlap else "no",
                f"{total / statistics.median(times[v]) / 1e9:.2f}",
                rate(tight.get(v)),
                f"{loose[v]['max_usage'] / MIB:.0f}" if v in loose else "-",
                f"{tight[v]['max_usage'] / MIB:.0f}" if v in tight else "-",
                f"{statistics.median(cpus[v]):.2f}",
            ]
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print(
        f"GB = 1e9 B over {total / 1e9:.2f} GB of files; no limit: median of {args.reps} passes (spread "
        f"{min(total / max(t) for t in times.values()) / 1e9:.2f}-{max(total / min(t) for t in times.values()) / 1e9:.2f} GB/s); "
        f"CPU s: process_time of one pass (median); 1+1: one reader thread plus the using thread."
    )
    if loose:
        print(
            f"charged MiB: cgroup v1 max_usage of one pass in a child, {args.loose} MiB limit (not binding); "
            f"a child that only starts and exits is charged {baseline / MIB:.0f} MiB. "
            + (
                "run_capped dropped the whole page cache before each child."
                if args.drop_all
                else "run_capped drops the whole page cache first; here it dropped only the test files' pages "
                "(--drop-all for the global drop), so the interpreter's files are not charged."
            )
        )
        cache = [v for v in variants if v.method in ("A", "A2") and tight[v]["ok"]]
        direct = [v for v in variants if v.method in ("B", "B2") and tight[v]["ok"]]
        if cache and direct:
            a = max(cache, key=lambda v: total / tight[v]["seconds"])
            b = max(direct, key=lambda v: total / tight[v]["seconds"])
            ra, rb = total / tight[a]["seconds"] / 1e9, total / tight[b]["seconds"] / 1e9
            faster = "O_DIRECT" if rb > ra else "the page cache"
            # A page-cache variant that drops each file after use is charged about one or two files:
            # the limit binds on it (reclaim) only when its peak reaches the limit.
            bound = tight[a]["max_usage"] >= 0.95 * args.tight * MIB
            na = max((v for v in variants if v.method in ("A", "A2")), key=lambda v: -statistics.median(times[v]))
            nb = max((v for v in variants if v.method in ("B", "B2")), key=lambda v: -statistics.median(times[v]))
            print(
                f"conclusion: under the {args.tight} MiB limit (one pass each) {faster} is faster: best O_DIRECT "
                f"({b.method} {b.chunk_mib} MiB x {b.threads}) {rb:.2f} GB/s, best page cache ({a.method}) "
                f"{ra:.2f} GB/s: {faster} by {(max(ra, rb) / min(ra, rb) - 1) * 100:.0f}%; the limit "
                f"{'bound' if bound else 'did not bind'} on {a.method} (peak {tight[a]['max_usage'] / MIB:.0f} MiB). "
                f"No limit (median): best page cache ({na.method}) {total / statistics.median(times[na]) / 1e9:.2f} "
                f"GB/s, best O_DIRECT ({nb.method} {nb.chunk_mib} MiB x {nb.threads}) "
                f"{total / statistics.median(times[nb]) / 1e9:.2f} GB/s. CPU s of a pass (no limit) "
                f"{statistics.median(cpus[b]):.2f} vs {statistics.median(cpus[a]):.2f}."
            )
        else:
            print(f"no conclusion: no page-cache or no O_DIRECT variant finished under the {args.tight} MiB limit")


if __name__ == "__main__":
    main()
