"""Compressed units against fp32: bytes read per cold forward, decode speed warm, cold and under a limit, accuracy.

Model: the Llama-shaped decoder of `scripts/bench_ladder.py` (`models/llama-1.5g-random`: hidden
1024, intermediate 2816, 24 layers, vocab 32000, untied head; ~1.5 GB fp32, random weights),
converted into block units as fp32 (shared with the ladder), int8 and int4 (groups of 64): embeddings,
norms and the LM head stay fp32 in both; and `+head`: the LM head quantized too (`--quantize-head`).

Rows, each in a fresh child process:

- `memory fp32`: `LlamaForCausalLM.from_pretrained` (plain transformers): the reference;
- `memory int8` / `memory int4`: the same model quantized in memory with `pylomin.quantize_`
  (the kernels without streaming);
- `pylomin fp32` / `int8` / `int4` / `int8+head` / `int4+head`: `pylomin.load_streaming(folder,
  LlamaForCausalLM)`, no options.

Warm: after a first greedy `generate()` (everything read once), a greedy `generate()` of 32 new tokens
from a 16-token prompt: decode tokens/s = the 31 tokens after the first over their time. The same
child also runs a 1 x 128 forward (logits kept) and a greedy `generate()` of 64 tokens, for accuracy:
the relative error of the logits against `memory fp32` (Frobenius norm of the difference over that
of the reference) and how many of the 64 greedy tokens equal the reference's (and where the first
one differs). Random weights make near-flat logits, where a small error flips the argmax sooner
than in a trained model: a pessimistic agreement figure.

Cold (pylomin rows, `memory_budget=0`: nothing kept, every unit read from disk for every token,
pages dropped after use): the unit files evicted from the page cache first, then load, one 1 x 128
forward (bytes the block layer fetched: `read_bytes` of /proc/self/io) and a greedy `generate()` of
32 tokens: decode tokens/s, disk-bound.

Under a limit (root only, cgroup v1; `scripts/bench_ladder.py`'s capped children and allowance): the
page cache dropped, each pylomin row with no options under the allowance + 25 % of the fp32 model;
decode of 16 tokens from 16 there (the ladder's measure).

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python scripts/bench_quant.py [--quick] [--no-limit]

Prints the tables and writes `bench-out/bench_quant.json`. `--quick`: the ladder's 28 MiB Llama
(a smoke test, figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cgroup  # noqa: E402
import bench_ladder as ladder  # noqa: E402
from _common import ENV, MIB, MODELS, ROOT, TokenClock, evict, read_bytes, unit_files  # noqa: E402

OUT = ROOT / "bench-out"
SEQ = 128
PROMPT = 16
NEW = 32
AGREE = 64
SCHEMES = ("fp32", "int8", "int4", "int8+head", "int4+head")  # +head: --quantize-head too
ROWS = [
    ("memory", "fp32"),
    ("memory", "int8"),
    ("memory", "int4"),
    ("pylomin", "fp32"),
    ("pylomin", "int8"),
    ("pylomin", "int4"),
    ("pylomin", "int8+head"),
    ("pylomin", "int4+head"),
]


def child(how: str, scheme: str, mode: str, spec: dict[str, Any], out: Path) -> None:
    """One row: load, measure, write `out` (and the logits beside it)."""
    import torch
    import transformers

    import pylomin

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    cls = transformers.LlamaForCausalLM
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, spec["vocab"], (1, SEQ), generator=g)
    prompt = torch.randint(0, spec["vocab"], (1, PROMPT), generator=g)

    def generate(model: Any, n: int) -> tuple[list[int], dict[str, Any]]:
        clock = TokenClock()
        kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
        y = model.generate(prompt, streamer=clock, max_new_tokens=n, min_new_tokens=n, **kw)
        return y[0, PROMPT:].tolist(), clock.summary()

    r: dict[str, Any] = {}
    with torch.no_grad():
        read0, t0 = read_bytes(), time.perf_counter()
        if how == "memory":
            model = cls.from_pretrained(spec["src"], dtype=torch.float32).eval()
            if scheme != "fp32":
                pylomin.quantize_(model, scheme.removesuffix("+head"), head=scheme.endswith("+head"))
        elif mode == "cold":
            model = pylomin.load_streaming(spec[scheme], cls, memory_budget=0)
        else:
            model = pylomin.load_streaming(spec[scheme], cls)
        r["load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        logits = model(x, use_cache=False).logits
        r["forward_s"], r["forward_read"] = time.perf_counter() - t0, read_bytes() - read0
        if mode == "warm":
            generate(model, 4)  # everything touched once
            r["tokens"], timing = generate(model, AGREE)
            torch.save(logits, f"{out}.pt")
        _, timing = generate(model, NEW)
        r["decode_tps"], r["read_per_token"] = timing["decode_tps"], timing["read_per_token"]
    out.write_text(json.dumps(r))


def run_child(how: str, scheme: str, mode: str, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    out = work / f"{how}-{scheme}-{mode}.json"
    if mode == "cold":
        evict(unit_files(Path(spec[scheme])))
    cmd = [sys.executable, __file__, "--child", how, scheme, mode, "--spec", json.dumps(spec), "--out", str(out)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-3000:], file=sys.stderr)
        raise SystemExit(f"{how} {scheme} {mode} failed ({res.returncode})")
    r = json.loads(out.read_text())
    r.update(how=how, scheme=scheme, mode=mode, seconds=time.perf_counter() - t0)
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the ladder's small Llama (smoke test)")
    p.add_argument("--no-limit", action="store_true", help="skip the runs under a cgroup limit")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(*args.child, json.loads(args.spec), args.out)
        return 0

    import torch

    from pylomin import manifest

    t_start = time.perf_counter()
    config = ladder.LLAMA_SMALL if args.quick else ladder.LLAMA
    name = "llama-small-random" if args.quick else "llama-1.5g-random"
    src = ladder.ensure_llama(config, name)
    spec: dict[str, Any] = {"src": str(src), "vocab": config["vocab_size"]}
    spec["fp32"] = spec["block"] = str(ladder.ensure_converted(src, MODELS / f"{name}-pylomin"))
    for scheme in SCHEMES[1:]:
        q, head = scheme.removesuffix("+head"), scheme.endswith("+head")
        folder = MODELS / f"{name}-pylomin-{q}{'-head' if head else ''}"
        if head and not (folder / "pylomin.json").is_file():
            import pylomin

            print(f"converting {src} -> {folder} ({q}, LM head too, first run only)", flush=True)
            pylomin.convert(src, folder, quantize=q, quantize_head=True, progress=False)
        spec[scheme] = str(ladder.ensure_converted(src, folder, quantize=q))
    sizes = {s: manifest.read(spec[s]).nbytes for s in SCHEMES}
    print(
        f"\n### {name}: " + ", ".join(f"{s} {sizes[s] / MIB:.0f} MiB" for s in SCHEMES) + f"; {os.cpu_count()} CPUs\n"
    )

    OUT.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quant-", dir=OUT) as tmp:
        work = Path(tmp)
        for how, scheme in ROWS:
            r = run_child(how, scheme, "warm", spec, work)
            r["logits"] = torch.load(work / f"{how}-{scheme}-warm.json.pt")
            rows.append(r)
            print(f"  warm {how:8s} {scheme}: decode {r['decode_tps']:.2f} tok/s ({r['seconds']:.0f} s)", flush=True)
        for scheme in SCHEMES:
            r = run_child("pylomin", scheme, "cold", spec, work)
            rows.append(r)
            print(
                f"  cold pylomin  {scheme}: forward read {r['forward_read'] / MIB:.0f} MiB, "
                f"decode {r['decode_tps']:.2f} tok/s ({r['seconds']:.0f} s)",
                flush=True,
            )
        limited: list[dict[str, Any]] = []
        why = _cgroup.unavailable()
        if not args.no_limit and why is None:
            extra, _ = ladder.allowance(ladder.BASELINE_TIMEOUT)
            limit = extra + sizes["fp32"] * 25 // 100
            for key in ("pylomin", *SCHEMES[1:]):
                r = ladder.capped(key, spec, work, limit, 600.0)
                r.update(scheme="fp32" if key == "pylomin" else key, limit=limit, allowance=extra)
                limited.append(r)
                print(
                    f"  limit {limit / MIB:.0f} MiB {key}: decode {ladder.cell(r, 'decode_tps', '.2f')} tok/s, "
                    f"charged {r['max_usage'] / MIB:.0f} MiB: {ladder.status(r)}",
                    flush=True,
                )
        elif not args.no_limit:
            print(f"  no runs under a limit: {why}")

    ref = next(r for r in rows if r["how"] == "memory" and r["scheme"] == "fp32")
    warm = {(r["how"], r["scheme"]): r for r in rows if r["mode"] == "warm"}
    cold = {r["scheme"]: r for r in rows if r["mode"] == "cold"}
    print(
        "\n| model | bytes | warm decode tok/s | vs memory fp32 | logits rel. error | greedy tokens equal | first differs |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for how, scheme in ROWS:
        r = warm[(how, scheme)]
        error = ((r["logits"] - ref["logits"]).norm() / ref["logits"].norm()).item()
        same = sum(a == b for a, b in zip(r["tokens"], ref["tokens"], strict=True))
        first = next((i for i, (a, b) in enumerate(zip(r["tokens"], ref["tokens"], strict=True)) if a != b), None)
        r["error"], r["agree"], r["first_differs"] = error, same, first
        print(
            f"| {how} {scheme} | {sizes[scheme] / MIB:.0f} MiB | {r['decode_tps']:.2f} | "
            f"{r['decode_tps'] / ref['decode_tps']:.2f}x | {error:.2e} | {same}/{AGREE} | {'-' if first is None else first} |"
        )
    print("\n| pylomin, cold (memory_budget=0) | bytes read, one forward | vs fp32 | decode tok/s | vs fp32 |")
    print("|---|---:|---:|---:|---:|")
    for scheme in SCHEMES:
        r = cold[scheme]
        print(
            f"| {scheme} | {r['forward_read'] / MIB:.0f} MiB | {r['forward_read'] / cold['fp32']['forward_read']:.2f}x | "
            f"{r['decode_tps']:.2f} | {r['decode_tps'] / cold['fp32']['decode_tps']:.2f}x |"
        )
    if limited:
        base = next(r for r in limited if r["scheme"] == "fp32")
        print(
            f"\n| pylomin, no options, under {limited[0]['limit'] / MIB:.0f} MiB (allowance + 25 % of fp32) | "
            "decode tok/s | vs fp32 | charged MiB | status |"
        )
        print("|---|---:|---:|---:|---|")
        for r in limited:
            ratio = (
                f"{r['decode_tps'] / base['decode_tps']:.2f}x" if "decode_tps" in r and "decode_tps" in base else "-"
            )
            print(
                f"| {r['scheme']} | {ladder.cell(r, 'decode_tps', '.2f')} | {ratio} | {r['max_usage'] / MIB:.0f} | "
                f"{ladder.status(r)} |"
            )
    for r in rows:
        r.pop("logits", None)
    dump = {"model": name, "sizes": sizes, "rows": rows, "limited": limited, "command": " ".join(sys.argv)}
    path = OUT / "bench_quant.json"
    path.write_text(json.dumps(dump, indent=1))
    print(f"\nwrote {path}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
