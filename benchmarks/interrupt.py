"""Bytes a streamed Mixtral's generate() reads from disk on a fresh model and after a Ctrl-C.

A random Mixtral (~500 MiB fp32: 4 layers, 8 experts, top-2) under /var/tmp/pylomin-bench-interrupt/,
converted once per pylomin source tree. Each case in a fresh child, `memory_budget=0` (streamed per
expert), then /proc/self/io read_bytes over a greedy generate() of 8 tokens from 16, the unit files
evicted first: fresh; after generate (the same generate() first, whole); after ctrl-c (first a
generate() whose prompt pass a hook on the middle layer interrupts with `KeyboardInterrupt`). torch
runs `always_call` hooks for an `Exception` only: this measures what a skipped post-hook costs the
next generate(). Columns: bytes still cached after the evict (`fincore`: mapped pages stay), MiB read
in all, by the prompt and by the decode tokens after the first, the ratio to fresh, equal tokens, and
the passes pylomin counts as running afterwards.

    .venv/bin/python -m benchmarks.interrupt
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

import pylomin
from benchmarks.harness import internals, models, report, runner
from benchmarks.harness.child import Child
from benchmarks.harness.measure import TokenClock, cached_bytes, evict, read_bytes
from benchmarks.harness.paths import MIB

WORK = Path("/var/tmp/pylomin-bench-interrupt")
PROMPT_TOKENS, NEW_TOKENS = 16, 8
CASES = ("fresh", "after generate", "after ctrl-c")


def measure(child: Child) -> None:
    """The case's first generate() (none, whole, or interrupted), then the measured one on evicted files."""
    r, case = child.result, child.spec["case"]
    prompt = torch.randint(0, child.vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0, max_new_tokens=NEW_TOKENS)
    with child.phase("load"):
        model = child.load()
    with child.phase(case):
        if case == "after generate":
            model.generate(prompt, **kw)
        if case == "after ctrl-c":
            fired = []

            def ctrl_c(module: Any, args: Any, output: Any) -> None:
                if not fired:
                    fired.append(True)
                    raise KeyboardInterrupt

            handle = model.model.layers[models.MIXTRAL_4["num_hidden_layers"] // 2].register_forward_hook(ctrl_c)
            try:
                model.generate(prompt, **kw)
                raise SystemExit("the hook did not interrupt generate()")
            except KeyboardInterrupt:
                pass
            finally:
                handle.remove()
    with child.phase("measured"):
        files = child.files()
        evict(files)
        r["cached"] = cached_bytes(files)
        clock, before = TokenClock(), read_bytes()
        out = model.generate(prompt, streamer=clock, **kw)
        r.update(total=read_bytes() - before, prompt=clock.reads[1] - clock.reads[0])
        r.update(decode=clock.reads[-1] - clock.reads[1], tokens=out[0, PROMPT_TOKENS:].tolist())
        r.update(pylomin=pylomin.__file__, passes_after=internals.memory_policy(model)["passes"])


def prepare() -> Path:
    """The converted folder for the pylomin this process imports, built and converted on first use."""
    src = models.ensure_built(WORK / "src", "MixtralForCausalLM", models.MIXTRAL_4)
    tree = str(Path(pylomin.__file__).resolve().parent)
    folder = WORK / f"converted-{hashlib.sha1(tree.encode()).hexdigest()[:10]}"
    if not (folder / "pylomin.json").is_file():
        print(f"converting {src} -> {folder} with {tree}", flush=True)
        pylomin.convert(src, folder, progress=False, overwrite=True)
    return folder


def main() -> int:
    folder = prepare()
    spec = {"cls": "MixtralForCausalLM", "src": str(WORK / "src"), "folders": {"block": str(folder)}}
    spec.update(contender="budget0", measure="benchmarks.interrupt:measure")
    with tempfile.TemporaryDirectory(prefix="pylomin-interrupt-") as tmp:
        rows = {case: runner.spawn({**spec, "case": case}, Path(tmp), name=case.replace(" ", "-")) for case in CASES}
    print(f"pylomin: {rows['fresh']['pylomin']}\nfolder: {folder}\n")
    fresh, lines = rows["fresh"], []
    for case, r in rows.items():
        mib = [f"{r[k] / MIB:,.0f}" if r[k] is not None else "-" for k in ("cached", "total", "prompt", "decode")]
        same = "yes" if r["tokens"] == fresh["tokens"] else "NO"
        lines.append([case, *mib, f"{r['total'] / fresh['total']:.2f}x", same, r["passes_after"]])
    header = ["case", "cached MiB", "MiB read", "prompt MiB", "decode MiB", "ratio to fresh", "tokens equal"]
    print(report.table([*header, "passes after"], "lrrrrrcr", lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
