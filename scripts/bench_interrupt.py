"""Bytes a streamed Mixtral's generate() reads from disk on a fresh model and after a Ctrl-C.

Model: a random-weight Mixtral (`MixtralConfig`: hidden 512, intermediate 1792, 4 layers, 8 experts,
top-2 routing, vocab 32000, untied LM head; ~500 MiB fp32), saved with `save_pretrained` and converted
with `pylomin.convert` under /var/tmp/pylomin-bench-interrupt/ (one converted folder per pylomin source
tree, so an older checkout converts with its own converter). Each case runs in a fresh child process
that loads `pylomin.load_streaming(folder, MixtralForCausalLM, memory_budget=0)` (streamed per expert)
and measures `/proc/self/io` read_bytes over a greedy `generate()` of 8 new tokens from a fixed
16-token prompt, with the unit files evicted from the page cache first (fsync + posix_fadvise DONTNEED):

- fresh: that generate() on the just-loaded model;
- after generate: first the same generate(), uninterrupted, then evict and measure (a control: a model
  whose prefetcher has seen a whole pass);
- after Ctrl-C: first a generate() whose prompt pass a forward hook on the middle decoder layer
  interrupts with `KeyboardInterrupt` (once; caught; the hook removed), then evict and the same
  generate() measured.

torch runs `always_call` forward hooks for an `Exception` only, so a `KeyboardInterrupt` skips every
post-hook between it and the caller; this measures what that costs the next generate(). Columns:
cached MiB: bytes of the unit files still in the page cache right after the evict (`fincore`; pages
a live mapping holds are not dropped, and the measured generate() reads them from memory, not disk);
MiB read over the whole generate(), of which by the prompt pass and by the 7 decode tokens after the
first new token; the ratio of the total to the fresh case; whether the tokens equal the fresh case's;
passes after: the streaming manager's count of running root forwards after the measured generate().

    .venv/bin/python scripts/bench_interrupt.py
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ENV, MIB, MIXTRAL, TokenClock, build_mixtral, evict, read_bytes, unit_files  # noqa: E402

WORK = Path("/var/tmp/pylomin-bench-interrupt")
PROMPT_TOKENS, NEW_TOKENS = 16, 8
MIXTRAL_4 = {**MIXTRAL, "num_hidden_layers": 4}  # ~500 MiB: a run takes seconds


def prepare() -> Path:
    """The converted folder for the pylomin this process imports, built and converted on first use."""

    import pylomin

    src = WORK / "src"
    if not (src / "config.json").is_file():
        print(f"building {src} ...", flush=True)
        build_mixtral(src, MIXTRAL_4)
    tree = str(Path(pylomin.__file__).resolve().parent)
    folder = WORK / f"converted-{hashlib.sha1(tree.encode()).hexdigest()[:10]}"
    if not (folder / "pylomin.json").is_file():
        print(f"converting {src} -> {folder} with {tree}", flush=True)
        pylomin.convert(src, folder, progress=False, overwrite=True)
    return folder


def resident(files: list[Path]) -> int | None:
    """Bytes of `files` in the page cache now (util-linux `fincore`): what an evict could not drop."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "-bno", "RES", *map(str, files)], capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split())


def child(folder: Path, case: str) -> dict[str, Any]:
    import torch
    import transformers

    import pylomin
    from pylomin.streaming import stream_of

    transformers.logging.set_verbosity_error()
    prompt = torch.randint(0, MIXTRAL["vocab_size"], (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0, max_new_tokens=NEW_TOKENS)
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=0)
    files = unit_files(folder)
    with torch.no_grad():
        if case == "after generate":
            model.generate(prompt, **kw)
        if case == "after ctrl-c":
            fired = []

            def ctrl_c(module: Any, args: Any, output: Any) -> None:
                if not fired:
                    fired.append(True)
                    raise KeyboardInterrupt

            handle = model.model.layers[MIXTRAL_4["num_hidden_layers"] // 2].register_forward_hook(ctrl_c)
            try:
                model.generate(prompt, **kw)
                raise SystemExit("the hook did not interrupt generate()")
            except KeyboardInterrupt:
                pass
            finally:
                handle.remove()
        evict(files)
        cached = resident(files)
        clock = TokenClock()
        before = read_bytes()
        out = model.generate(prompt, streamer=clock, **kw)
        total = read_bytes() - before
    r = clock.reads
    manager = stream_of(model).manager
    return {
        "pylomin": pylomin.__file__,
        "cached": cached,
        "total": total,
        "prompt": r[1] - r[0],
        "decode": r[-1] - r[1],
        "tokens": out[0, PROMPT_TOKENS:].tolist(),
        "passes_after": getattr(manager, "passes", None),
    }


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        print(json.dumps(child(Path(sys.argv[2]), sys.argv[3])))
        return 0
    folder = prepare()
    rows = {}
    for case in ("fresh", "after generate", "after ctrl-c"):
        cmd = [sys.executable, __file__, "--child", str(folder), case]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
        if res.returncode != 0:
            raise SystemExit(f"{case} failed:\n{res.stderr[-4000:]}")
        rows[case] = json.loads(res.stdout.strip().splitlines()[-1])
    print(f"pylomin: {rows['fresh']['pylomin']}\nfolder: {folder}\n")
    print("| case | cached MiB | MiB read | prompt MiB | decode MiB | ratio to fresh | tokens equal | passes after |")
    print("|---|---:|---:|---:|---:|---:|:---:|---:|")
    fresh = rows["fresh"]
    for case, r in rows.items():
        mib = [f"{r[k] / MIB:,.0f}" if r[k] is not None else "-" for k in ("cached", "total", "prompt", "decode")]
        same = "yes" if r["tokens"] == fresh["tokens"] else "NO"
        print(f"| {case} | {' | '.join(mib)} | {r['total'] / fresh['total']:.2f}x | {same} | {r['passes_after']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
