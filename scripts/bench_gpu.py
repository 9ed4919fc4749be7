"""The GPU benchmark: host-to-device copy bandwidth through pylomin's pinned ring, and a Llama-shaped model per tier.

(a) H2D GB/s for unit-sized tensors: a pageable `.to(cuda)`, a pinned `.to(cuda, non_blocking=True)`
    (the DMA ceiling), pylomin's `PinnedCopy` ring from pageable memory, and the `Stager` reading
    the tensors from mapped unit files (warm page cache): the path a streamed unit takes.
(b) A random-weight LlamaForCausalLM, saved, converted, then run per tier: in memory on the GPU,
    streamed from the host page cache (`memory_budget=0`), pylomin's default (`"auto"`: the GPU
    keeps what fits), streamed from a cold disk, and accelerate's `cpu_offload`. Median latency of
    a prompt forward and of decode steps, bytes copied per forward, the implied GB/s, and whether
    the logits and greedy tokens equal the in-memory model's.

Everything stops at `--max-seconds` after start (what is left is reported as skipped). `--dry-run`
needs no GPU: a tiny model through the same tiers on the CPU, the stager with a CPU copy.

    python scripts/bench_gpu.py --out OUT_DIR [--quick] [--max-seconds 100] [--dry-run]
"""

from __future__ import annotations

import time

START = time.monotonic()  # the budget counts from here, imports included

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import pylomin  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import internals  # noqa: E402

Store, Stager, PinnedCopy = internals.staging()

MIB = 2**20
GB = 1e9
transformers.logging.set_verbosity_error()
# transformers 5.24 renames `past_key_values` to `cache` (warning on every call); 5.17 knows only the old name.
warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

# Model sizes. Full: 836M parameters, 1.67 GB in bf16, units of 88 MB (a layer); a TinyLlama-like
# shape with 16 layers, so that the run fits the machine's few minutes.
LLAMA_FULL = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=4,
)
LLAMA_QUICK = {**LLAMA_FULL, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 4}
LLAMA_DRY = dict(
    vocab_size=512,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


class Budget:
    """Seconds left of `--max-seconds`, counted from the start of the process."""

    def __init__(self, seconds: float):
        self.end = START + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def log(*args: object) -> None:
    print(f"[{time.monotonic() - START:6.1f}s]", *args, flush=True)


def fs_type(path: Path) -> str:
    """The file system type of the mount holding `path` (longest mount prefix in /proc/self/mounts)."""
    best, kind = "", "?"
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind


def work_dir() -> Path:
    """A fresh folder on a disk file system if there is one (a cold read needs a disk): $TMPDIR, /var/tmp, /tmp."""
    candidates = [os.environ.get("TMPDIR"), "/var/tmp", "/tmp"]
    usable = [Path(c) for c in candidates if c and os.path.isdir(c) and os.access(c, os.W_OK)]
    on_disk = [c for c in usable if fs_type(c.resolve()) not in ("tmpfs", "ramfs")]
    return Path(tempfile.mkdtemp(prefix="pylomin-gpu-", dir=(on_disk or usable)[0]))


def drop_cache(files: list[Path], everything: bool) -> str:
    """Drop the page cache: all of it as root (`drop_caches`) if `everything`, else the files' pages (`posix_fadvise`)."""
    os.sync()
    try:
        if not everything:
            raise PermissionError("asked for the files' pages only")
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        return "posix_fadvise"


def read_bytes() -> int:
    """Bytes this process had the block layer read from storage so far (all threads)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def cold_read_gbps(files: list[Path], everything: bool) -> float:
    """GB/s of one cold sequential read of `files` (16 MiB reads): the disk tier's floor."""
    drop_cache(files, everything)
    buf = memoryview(bytearray(16 * MIB))
    total, t0 = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total / (time.perf_counter() - t0) / GB


# --- (a) host-to-device bandwidth -----------------------------------------------------------------


def h2d(device: torch.device, sizes_mib: list[int], total_mib: int, repeats: int, tmp: Path, budget: Budget) -> dict:
    """GB/s of each copy method for `total_mib` of `size`-MiB tensors, per size, median of `repeats`."""
    rows: list[dict[str, Any]] = []
    for size in sizes_mib:
        if budget.left() < 20:
            rows.append(dict(method="all", size_mib=size, skipped="out of time"))
            continue
        rows += h2d_size(device, size, max(2, total_mib // size), repeats, tmp)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    note = "GB = 1e9 bytes; each row copies all its tensors back to back, then synchronizes"
    if device.type != "cuda":
        note = "no CUDA device: only the stager's code path ran, with a CPU copy (the numbers are not H2D)"
    return dict(rows=rows, note=note)


def h2d_size(device: torch.device, size: int, count: int, repeats: int, tmp: Path) -> list[dict[str, Any]]:
    n = size * MIB
    pageable = [torch.full((n,), i, dtype=torch.uint8) for i in range(count)]  # faulted in: anonymous memory
    methods: dict[str, Callable[[], None]] = {}
    copy: Any
    if device.type == "cuda":
        pinned = [t.pin_memory() for t in pageable]
        ring = PinnedCopy(device, n)

        def pageable_copy() -> None:
            for t in pageable:
                t.to(device)

        def pinned_copy() -> None:
            for t in pinned:
                t.to(device, non_blocking=True)

        def ring_copy() -> None:
            for t in pageable:
                ring(t, None)

        methods["pageable .to(cuda)"] = pageable_copy
        methods["pinned .to(cuda, non_blocking)"] = pinned_copy
        methods["PinnedCopy ring, from anonymous memory"] = ring_copy
        copy = PinnedCopy(device, n)
    else:

        def copy(src: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, Any]:
            return src.to(dtype or src.dtype, copy=True), None  # the dry run's stand-in for PinnedCopy

    # The stager reads the tensors from mapped unit files, as a streamed unit does (warm page cache).
    src = tmp / f"h2d-{size}.safetensors"
    save_file({f"blocks.{i}.weight": t for i, t in enumerate(pageable)}, str(src))
    folder = pylomin.convert(src, tmp / f"h2d-{size}", progress=False)
    src.unlink()
    names = [f"blocks.{i}.weight" for i in range(count)]
    rows = []
    with Store(folder, internals.manifest(folder), drop_page_cache=False) as store:
        stager = Stager(store, {i: [name] for i, name in enumerate(names)}, {}, copy)

        def staged() -> None:
            for i, name in enumerate(names):
                stager(i)
                stager.pop(name)

        where = "" if device.type == "cuda" else " (CPU stand-in)"
        methods[f"Stager from mapped unit files, warm{where}"] = staged
        for method, run in methods.items():
            rates = []
            for _ in range(repeats + 1):  # the first run warms up (allocator, page cache, pinned ring)
                sync(device)
                t0 = time.perf_counter()
                run()
                sync(device)
                rates.append(count * n / (time.perf_counter() - t0) / GB)
            rows.append(
                dict(method=method, size_mib=size, count=count, gbps=statistics.median(rates[1:]), runs=rates[1:])
            )
            log(f"h2d {size:4d} MiB x {count:2d}  {method:44s} {rows[-1]['gbps']:7.2f} GB/s")
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# --- (b) a Llama-shaped model, per tier -----------------------------------------------------------


def measure(
    model: torch.nn.Module,
    x: torch.Tensor,
    device: torch.device,
    runs: int,
    steps: int,
    budget: Budget,
    before_run: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Prompt forwards (after one warm-up) and greedy decode steps over a KV cache: times, logits and tokens."""
    prefill, logits = [], None
    disk: list[int] = []
    with torch.no_grad():
        for i in range(runs + 1):
            if i >= 2 and budget.left() < 15:
                break
            if before_run is not None:
                before_run()
            sync(device)
            r0, t0 = read_bytes(), time.perf_counter()
            out = model(x).logits
            sync(device)
            if i > 0:
                prefill.append(time.perf_counter() - t0)
                disk.append(read_bytes() - r0)
            logits = out.float().cpu() if logits is None else logits
            del out
        if before_run is not None:
            before_run()
        out = model(x, use_cache=True)
        cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens, decode = [int(tok)], []
        del out
        for _ in range(steps):
            if budget.left() < 10:
                break
            t0 = time.perf_counter()
            out = model(tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            tokens.append(int(tok))  # waits for the step
            decode.append(time.perf_counter() - t0)
            del out
        del cache
    return dict(prefill=prefill, decode=decode, logits=logits, tokens=tokens, disk=disk)


def tier_row(name: str, how: str, m: dict[str, Any], ref: dict[str, Any] | None, nbytes: int) -> dict[str, Any]:
    prefill = statistics.median(m["prefill"]) if m["prefill"] else None
    decode = statistics.median(m["decode"]) if m["decode"] else None
    row: dict[str, Any] = dict(
        tier=name,
        how=how,
        prefill_ms=None if prefill is None else prefill * 1e3,
        prefill_runs=len(m["prefill"]),
        decode_ms=None if decode is None else decode * 1e3,
        decode_steps=len(m["decode"]),
        bytes_per_forward=nbytes,
        prefill_gbps=nbytes / prefill / GB if prefill and nbytes else None,
        decode_gbps=nbytes / decode / GB if decode and nbytes else None,
        disk_read_per_forward=statistics.median(m["disk"]) if m["disk"] else None,
    )
    if ref is not None:
        row["logits_equal"] = bool(torch.equal(m["logits"], ref["logits"]))
        row["max_abs_diff"] = float((m["logits"] - ref["logits"]).abs().max())
        n = min(len(m["tokens"]), len(ref["tokens"]))
        row["tokens_equal"] = m["tokens"][:n] == ref["tokens"][:n]
    return row


def peak_mib(device: torch.device, base: int) -> float | None:
    return (torch.cuda.max_memory_allocated(device) - base) / MIB if device.type == "cuda" else None


def reset_peak(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def tiers(args: argparse.Namespace, device: torch.device, tmp: Path, budget: Budget) -> dict[str, Any]:
    """Build, save and convert the model; then each tier in turn, while the budget lasts."""
    shape = LLAMA_DRY if args.dry_run else LLAMA_QUICK if args.quick else LLAMA_FULL
    dtype = getattr(torch, args.dtype)
    cfg = transformers.LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    start = reset_peak(device)
    t0 = time.perf_counter()
    # Built in its dtype, as from_pretrained builds: `.to(dtype)` after the fact would also round the
    # rotary embedding's fp32 `inv_freq` buffer, and the reference would differ from every loaded model.
    with torch.device(device):
        model = transformers.LlamaForCausalLM._from_config(cfg, dtype=dtype).eval()
    hf = tmp / "hf"
    model.save_pretrained(hf)
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.1f}M parameters, {args.dtype}, built and saved in {time.perf_counter() - t0:.1f} s")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=g).to(device)
    runs, steps = args.runs, args.steps
    rows: list[dict[str, Any]] = []
    info: dict[str, Any] = dict(config=shape, dtype=args.dtype, parameters=params, prompt=args.prompt)

    ref = measure(model, x, device, runs, steps, budget)
    row = tier_row("in memory", f"built on {device.type}: every weight in its memory", ref, None, 0)
    row["peak_mib"] = peak_mib(device, start)
    rows.append(row)
    del model
    reset_peak(device)

    t0 = time.perf_counter()
    folder = pylomin.convert(hf, tmp / "pl", progress=False)
    manifest = internals.manifest(folder)
    files = [folder / u.file for u in manifest.units]
    info.update(bytes=manifest.nbytes, units=len(manifest.units), convert_s=time.perf_counter() - t0)
    info["largest_unit_bytes"] = max(u.nbytes for u in manifest.units)
    log(f"converted: {len(files)} units, {manifest.nbytes / GB:.2f} GB in {info['convert_s']:.1f} s")
    info["work_dir_fs"] = fs_type(tmp.resolve())
    cold = info["work_dir_fs"] not in ("tmpfs", "ramfs")
    drops: list[str] = []

    # The dry run drops only its own files' pages: the whole cache of a shared machine is not its to drop.
    everything = not args.dry_run

    def cold_run() -> None:
        drops.append(drop_cache(files, everything))

    cls = transformers.LlamaForCausalLM
    streamed = [
        (
            "pylomin host",
            "memory_budget=0, drop_page_cache=False: every unit copied from the warm page cache",
            dict(memory_budget=0, drop_page_cache=False),
            None,
        ),
        ("pylomin auto", "default memory_budget='auto': the device keeps what fits", {}, None),
        (
            "pylomin disk",
            "memory_budget=0 (pages dropped after use), page cache dropped before each run",
            dict(memory_budget=0),
            cold_run,
        ),
    ]
    for name, how, options, before in streamed:
        if budget.left() < 25:
            rows.append(dict(tier=name, how=how, skipped="out of time"))
            continue
        try:
            base = reset_peak(device)
            if before is not None:
                drops.clear()
                info["disk_read_gbps"] = cold_read_gbps(files, everything)
            t0 = time.perf_counter()
            model = pylomin.load_streaming(folder, cls, device=device, **options)
            load_s = time.perf_counter() - t0
            m = measure(model, x, device, runs, steps, budget, before)
            row = tier_row(name, how, m, ref, internals.copied_bytes(model))
            row.update(
                load_s=load_s, peak_mib=peak_mib(device, base), note=internals.memory_policy(model)["memory_note"]
            )
            if before is not None:
                row["cache_drop"] = (
                    sorted(set(drops)) if cold else f"not cold: {info['work_dir_fs']} keeps files in memory"
                )
            pylomin.unload_(model)
            del model, m
        except Exception as e:  # one tier's failure is reported, the next tier still runs
            traceback.print_exc()
            row = dict(tier=name, how=how, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        log(f"tier {name}: {describe(row)}")

    name, how = "accelerate cpu_offload", "from_pretrained on the CPU, accelerate.cpu_offload(model, execution_device)"
    if budget.left() < 25:
        rows.append(dict(tier=name, how=how, skipped="out of time"))
    else:
        try:
            import accelerate

            base = reset_peak(device)
            t0 = time.perf_counter()
            model = cls.from_pretrained(hf, dtype=dtype).eval()
            accelerate.cpu_offload(model, execution_device=device)
            load_s = time.perf_counter() - t0
            m = measure(model, x, device, runs, steps, budget)
            row = tier_row(name, how, m, ref, manifest.nbytes)
            row.update(load_s=load_s, peak_mib=peak_mib(device, base))
            del model, m
        except Exception as e:
            traceback.print_exc()
            row = dict(tier=name, how=how, error=f"{type(e).__name__}: {e}")
        rows.append(row)
        log(f"tier {name}: {describe(row)}")

    # The first tier also warmed the GPU up (clocks, lazily loaded kernels): in memory once more, last.
    name, how = "in memory, again", "from_pretrained, moved to the device, measured after every other tier"
    if budget.left() < 20:
        rows.append(dict(tier=name, how=how, skipped="out of time"))
    else:
        base = reset_peak(device)
        model = cls.from_pretrained(hf, dtype=dtype).eval().to(device)
        m = measure(model, x, device, runs, steps, budget)
        row = tier_row(name, how, m, ref, 0)
        row["peak_mib"] = peak_mib(device, base)
        del model, m
        rows.append(row)
        log(f"tier {name}: {describe(row)}")
    return dict(model=info, rows=rows)


def add_overlap(result: dict[str, Any]) -> None:
    """Per streamed tier: where its prefill lies between perfect overlap of copy and compute and none.

    compute: the in-memory prefill; copy: the bytes per forward at the stager's GB/s from (a) (its
    largest size), or at the cold read GB/s of the disk where that is lower (the disk tier).
    """
    rows = result["model"].get("rows", [])
    stager = [r for r in result["h2d"]["rows"] if r.get("method", "").startswith("Stager") and "gbps" in r]
    ref = next((r for r in rows if r["tier"] == "in memory" and r.get("prefill_ms")), None)
    if not stager or ref is None:
        return
    rate = max(stager, key=lambda r: r["size_mib"])["gbps"]
    disk = result["model"].get("model", {}).get("disk_read_gbps")
    for r in rows:
        if not r["tier"].startswith("pylomin") or not r.get("bytes_per_forward") or not r.get("prefill_ms"):
            continue
        gbps = min(rate, disk) if r.get("cache_drop") and disk else rate
        copy_ms = r["bytes_per_forward"] / gbps / GB * 1e3
        r.update(copy_ms=copy_ms, floor_ms=max(copy_ms, ref["prefill_ms"]), serial_ms=copy_ms + ref["prefill_ms"])


def describe(row: dict[str, Any]) -> str:
    if "skipped" in row or "error" in row:
        return row.get("skipped") or row["error"]
    return (
        f"prefill {fmt_ms(row['prefill_ms'])}, decode {fmt_ms(row['decode_ms'])}/token, equal {row.get('logits_equal')}"
    )


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} ms"


def num(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or "-" where there is none."""
    return "-" if value is None else format(value, spec)


def table(result: dict[str, Any]) -> str:
    """The text table of bench.txt: the machine, the H2D rows, then one row per tier."""
    m = result["machine"]
    lines = [
        f"{m['gpu']} | torch {m['torch']} (CUDA {m['cuda']}) | transformers {m['transformers']} | python {m['python']}",
        "",
        "(a) host -> device copies, GB/s (median)",
        f"{'method':48s} {'size':>8s} {'count':>5s} {'GB/s':>7s}",
    ]
    for r in result["h2d"]["rows"]:
        if "gbps" in r:
            lines.append(f"{r['method']:48s} {r['size_mib']:4d} MiB {r['count']:5d} {r['gbps']:7.2f}")
        else:
            lines.append(f"{r['method']:48s} {r['size_mib']:4d} MiB  {r['skipped']}")
    lines.append(f"  {result['h2d']['note']}")
    info = result["model"].get("model", {})
    head = ("tier", "prefill ms", "decode ms", "GB/fwd", "GB/s", "peak MiB", "equal", "tokens", "max|diff|")
    lines += [
        "",
        f"(b) LlamaForCausalLM {info.get('parameters', 0) / 1e6:.1f}M parameters, {info.get('dtype')}, "
        f"{info.get('bytes', 0) / GB:.2f} GB in {info.get('units')} units; prompt {info.get('prompt')} tokens, batch 1",
        f"{head[0]:24s} " + " ".join(f"{h:>10s}" for h in head[1:]),
    ]
    for r in result["model"].get("rows", []):
        if "skipped" in r or "error" in r:
            lines.append(f"{r['tier']:24s} {r.get('skipped') or r['error']}")
            continue
        cells = (
            num(r["prefill_ms"], ".1f"),
            num(r["decode_ms"], ".1f"),
            num(r["bytes_per_forward"] / GB, ".2f"),
            num(r["prefill_gbps"], ".1f"),
            num(r.get("peak_mib"), ".0f"),
            num(r.get("logits_equal"), ""),
            num(r.get("tokens_equal"), ""),
            num(r.get("max_abs_diff"), ".3g"),
        )
        lines.append(f"{r['tier']:24s} " + " ".join(f"{c:>10s}" for c in cells))
    lines.append("  prefill: one forward of the prompt; decode: one greedy step over the KV cache (medians).")
    lines.append("  GB/fwd: bytes copied in per forward; GB/s: that over the prefill median; peak MiB: device memory")
    lines.append("  above the start; equal: torch.equal of the prompt's logits with the in-memory model's; tokens: the")
    lines.append("  greedy decode steps agree.")
    for r in result["model"].get("rows", []):
        if r.get("cache_drop"):
            lines.append(
                f"  {r['tier']}: page cache dropped with {r['cache_drop']}; read from disk per forward "
                f"{num((r.get('disk_read_per_forward') or 0) / GB, '.2f')} GB; cold sequential read of the "
                f"unit files {num(info.get('disk_read_gbps'), '.2f')} GB/s"
            )
        if r.get("floor_ms"):
            lines.append(
                f"  {r['tier']}: prefill {r['prefill_ms']:.1f} ms; with copy and compute overlapped perfectly "
                f"{r['floor_ms']:.1f} ms, one after the other {r['serial_ms']:.1f} ms (copy {r['copy_ms']:.1f} ms)"
            )
        if r.get("note"):
            lines.append(f"  {r['tier']}: {r['note']}")
    lines.append(f"wall {result['wall_s']:.0f} s of a {result['args']['max_seconds']:.0f} s budget")
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> dict[str, Any]:
    import safetensors

    cuda = device.type == "cuda"
    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        cuda=torch.version.cuda,
        gpu=torch.cuda.get_device_name(device) if cuda else "no GPU (dry run)",
        transformers=transformers.__version__,
        safetensors=safetensors.__version__,
        pylomin=pylomin.__version__,
        cpus=os.cpu_count(),
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", type=Path, required=True, help="folder for bench.json and bench.txt")
    p.add_argument("--quick", action="store_true", help="a 110M-parameter model, fewer runs")
    p.add_argument("--dry-run", action="store_true", help="no GPU: a tiny model on the CPU, the stager with a CPU copy")
    p.add_argument("--max-seconds", type=float, default=100.0, help="wall budget from process start (default 100)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128, quick/dry 32)")
    p.add_argument("--runs", type=int, default=None, help="timed prompt forwards per tier (default 5, quick/dry 3)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps per tier (default 8, quick/dry 4)")
    args = p.parse_args(argv)
    small = args.quick or args.dry_run
    args.prompt = args.prompt or (32 if small else 128)
    args.runs = args.runs or (3 if small else 5)
    args.steps = args.steps or (4 if small else 8)
    if not args.dry_run and not torch.cuda.is_available():
        print(f"bench_gpu: error: torch {torch.__version__} sees no CUDA device; use --dry-run", file=sys.stderr)
        return 2
    device = torch.device("cpu") if args.dry_run else torch.device("cuda", torch.cuda.current_device())
    budget = Budget(args.max_seconds)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = dict(args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    result["machine"] = machine(device)
    log("machine:", json.dumps(result["machine"]))
    tmp = work_dir()
    log(f"work dir {tmp} ({fs_type(tmp.resolve())})")
    failed = False
    try:
        if device.type != "cuda":
            log("no CUDA device: the H2D rows need one; only the stager's code path runs, with a CPU copy")
        sizes = [1] if args.dry_run else [64] if args.quick else [64, 256]
        total = 4 if args.dry_run else 512 if args.quick else 1024
        try:
            result["h2d"] = h2d(device, sizes, total, 1 if args.dry_run else 3, tmp, budget)
        except Exception as e:
            traceback.print_exc()
            result["h2d"] = dict(rows=[], note=f"failed: {type(e).__name__}: {e}")
            failed = True
        try:
            result["model"] = tiers(args, device, tmp, budget)
        except Exception as e:
            traceback.print_exc()
            result["model"] = dict(rows=[], error=f"{type(e).__name__}: {e}")
            failed = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    failed = failed or any("error" in r for r in result["model"].get("rows", []))
    add_overlap(result)
    result["wall_s"] = time.monotonic() - START
    (args.out / "bench.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = table(result)
    (args.out / "bench.txt").write_text(text)
    print(text, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
