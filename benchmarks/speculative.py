"""Many tokens per read: the verify pass, drafts on a model trained here, and batches, each under a cgroup limit.

Beyond the memory, decode reads what is not resident once per forward, whatever the forward's length:
a draft's k tokens checked in one pass, or a batch of sequences, share the read. Three parts, each
contender in a fresh child under its limit (page cache dropped first):

- `verify`: the ladder's Llama (1426 MiB fp32) under the allowance + 50 % of it. After a 64-token
  prompt, forwards of 1 and of 5 new tokens over a copy of its KV cache, alternated, 3 each: seconds
  and bytes read (/proc/self/io), medians. With the defaults, and with the model's self-draft (int4,
  `pylomin.self_draft`) loaded beside it, sharing the memory.
- `draft`: the target trained here on the Python standard library's source (`benchmarks.harness.trained`:
  93 MB fp32; an 11 MB draft trained the same way) under the allowance + 50 % of the target, with
  `memory_budget` = half its bytes (at this size the limit alone binds nothing: the target fits in the
  libraries' reclaimable page cache the allowance holds; "auto" rows show that case). Greedy
  generate() of DRAFT_NEW tokens from DRAFT_PROMPTS windows in the middle of held-out files: plain,
  with the self-draft, with the trained draft (both proposing 8 tokens every pass, as pylomin sets
  them up: `propose_eagerly`), and both with transformers' in-memory defaults instead
  (`TRANSFORMERS_DEFAULTS`: up to 20 tokens, stopping where the draft's confidence falls below 0.4); on an editing task (a held-out file's start, then the instruction to write it again),
  plain against prompt lookup and the self-draft. Decode tok/s, acceptance (`Passes` of
  `pylomin.tools.generate`), bytes read per token; tokens must equal plain decoding in memory.
- `batch`: the ladder's Llama under the allowance + 75 % and + 100 % of it: 1, 8 and 16 sequences of
  256 tokens (240 prompt + 16 new; 8 x 256 is 384 MiB of fp32 KV cache). Decode tok/s over all
  sequences; tokens must equal the in-memory model's. A batch whose KV cache cannot fit is told so by
  the estimate before any run.

    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python -m benchmarks.speculative [--parts verify,draft,batch] [--quick]

Writes bench-out/bench_speculative.json and, once the draft and batch parts ran, docs/tokens-per-read.png. `--quick`: the small Llama and tiny trained models (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import pylomin
from benchmarks.harness import cgroup, internals, models, report, runner, trained
from benchmarks.harness.child import Child
from benchmarks.harness.measure import TokenClock, read_bytes
from benchmarks.harness.paths import MIB, OUT, ROOT

PARTS = ("verify", "draft", "batch")
VERIFY_PROMPT, VERIFY_K, VERIFY_REPEATS = 64, 5, 3
DRAFT_PROMPTS, DRAFT_PROMPT_TOKENS, DRAFT_NEW = 4, 48, 96
REWRITE_TOKENS = 80  # tokens of the held-out file the editing task shows (the models trained on 256-token windows)
BATCHES, BATCH_PROMPT, BATCH_NEW = (1, 8, 16), 240, 16
BATCH_LIMITS = (75, 100)
# The "defaults" rows: transformers' in-memory defaults for how a draft proposes (up to 20 tokens, stopping
# where the draft's confidence falls below 0.4), set back on a draft that pylomin configured
# (`propose_eagerly`: 8 tokens every time, the self-draft's and `pylomin generate --draft PATH`'s).
TRANSFORMERS_DEFAULTS = {
    "num_assistant_tokens": 20,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4,
}
TOO_BIG = 64  # sequences of 256: a batch whose KV cache cannot fit under the 75 % limit


# ------------------------------------------------------------------------------------------ children


def _load(child: Child, *, self_draft: bool) -> tuple[Any, Any]:
    r = child.result
    with child.phase("load"):
        t0 = time.perf_counter()
        model = child.load()
        draft = pylomin.self_draft(model) if self_draft else None
        r["load_s"] = time.perf_counter() - t0
    return model, draft


def _policy(r: dict[str, Any], model: Any, draft: Any) -> None:
    r.update(internals.memory_policy(model))
    if draft is not None:
        r["draft_resident_bytes"] = internals.memory_policy(draft).get("resident_bytes")


def measure_verify(child: Child) -> None:
    """After a prompt, forwards of 1 and of k new tokens over a copy of its KV cache: seconds and bytes read."""
    spec, r = child.spec, child.result
    model, draft = _load(child, self_draft=spec.get("self_draft", False))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, child.vocab, (1, VERIFY_PROMPT), generator=g)
    new = torch.randint(0, child.vocab, (1, VERIFY_K), generator=g)
    with child.phase("prompt"):
        past = model(prompt, use_cache=True).past_key_values
        if draft is not None:
            draft(prompt[:, :8])  # the draft runs as it would in generate()
    samples: dict[int, list[tuple[float, int]]] = {1: [], VERIFY_K: []}
    for i in range(VERIFY_REPEATS):
        for k in (1, VERIFY_K):
            with child.phase(f"k={k} #{i}"):
                cache = copy.deepcopy(past)
                read0, t0 = read_bytes(), time.perf_counter()
                model(new[:, :k], cache=cache, use_cache=True)
                samples[k].append((time.perf_counter() - t0, read_bytes() - read0))
                r["samples"] = {str(k): v for k, v in samples.items()}
    for k, v in samples.items():
        r[f"s_{k}"] = statistics.median(s for s, _ in v)
        r[f"read_{k}"] = statistics.median(b for _, b in v)
    _policy(r, model, draft)


def measure_draft(child: Child) -> None:
    """Greedy generate() of each prompt, with the spec's draft: tokens, decode tok/s, acceptance, bytes read."""
    from pylomin.tools import generate as gen

    spec, r = child.spec, child.result
    how = spec.get("draft")
    model, drafter = _load(child, self_draft=how == "int4")
    if how == "trained":
        with child.phase("load draft"):  # a small model of its own, loaded first (resident), proposing as
            # `pylomin generate --draft PATH` makes it
            from pylomin.runtime.streaming import propose_eagerly

            drafter = propose_eagerly(pylomin.load_streaming(spec["draft_folder"], f"transformers.{spec['cls']}"))
    kwargs: dict[str, Any] = dict(max_new_tokens=DRAFT_NEW, min_new_tokens=DRAFT_NEW, do_sample=False)
    kwargs["pad_token_id"] = spec["eos"]
    if drafter is not None:
        kwargs["assistant_model"] = drafter
        for key, value in (spec.get("assist") or {}).items():  # transformers' defaults: the draft's own config
            setattr(drafter.generation_config, key, value)
    elif how == "lookup":
        kwargs["prompt_lookup_num_tokens"] = gen.LOOKUP_TOKENS
    runs = []
    for i, prompt in enumerate(spec["prompts"]):
        ids = torch.tensor([prompt])
        with child.phase(f"prompt {i}"):
            passes = gen.Passes(model)
            clock = TokenClock()
            try:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
            finally:
                passes.remove()
            runs.append(
                {
                    **clock.summary(),
                    "tokens": out[0, ids.shape[1] :].tolist(),
                    "passes": passes.count,
                    "drafted": passes.drafted(ids.shape[1]),
                }
            )
            r["runs"] = runs
    _policy(r, model, drafter)


def measure_batch(child: Child) -> None:
    """Greedy generate() of `batch` random prompts together: decode tok/s over all sequences, the tokens."""
    spec, r = child.spec, child.result
    model, _ = _load(child, self_draft=False)
    b = spec["batch"]
    prompt = torch.randint(0, child.vocab, (b, BATCH_PROMPT), generator=torch.Generator().manual_seed(0))
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=0)
    with child.phase("generate"):
        clock = TokenClock()
        out = model.generate(prompt, streamer=clock, max_new_tokens=BATCH_NEW, min_new_tokens=BATCH_NEW, **kw)
        summary = clock.summary()
        r.update(summary, tokens=out[:, BATCH_PROMPT:].tolist(), decode_tps=summary["decode_tps"] * b)
    _policy(r, model, None)


# --------------------------------------------------------------------------------------------- parent


def _capped(spec: dict[str, Any], work: Path, limit: int, name: str, timeout: float) -> dict[str, Any]:
    r = runner.spawn_capped(spec, work, limit, timeout, name=name)
    status = report.status(r)
    print(
        f"  {name:28s} {limit / MIB:6.0f} MiB: {status} ({r['seconds']:.0f} s, charged {r['max_usage'] / MIB:.0f} MiB)"
    )
    if r.get("memory_note"):
        print(f"    {r['resident_bytes'] / MIB:.0f} MiB resident; {r['memory_note']}", flush=True)
    return r


def part_verify(work: Path, quick: bool, timeout: float) -> dict[str, Any]:
    model = models.LLAMA_SMALL if quick else models.LLAMA
    spec = {**model.spec("block"), "measure": "benchmarks.speculative:measure_verify", "contender": "default"}
    folder = Path(spec["folders"]["block"])
    pylomin.load_streaming(folder, f"transformers.{model.cls}", quantize="int4", memory_budget=0)  # the self-draft
    extra, _ = runner.allowance(model.cls)
    limit = extra + models.nbytes(folder) // 2
    print(f"\n### verify: {model.name} under {limit / MIB:.0f} MiB (allowance {extra / MIB:.0f} + 50 %)", flush=True)
    rows = []
    for name, draft in (("default", False), ("default + self-draft", True)):
        r = _capped({**spec, "self_draft": draft}, work, limit, name, timeout)
        rows.append({"contender": name, "limit": limit, **r})
    lines = [
        [
            r["contender"],
            report.num(r.get("s_1"), ".3f"),
            report.num(r.get(f"s_{VERIFY_K}"), ".3f"),
            report.num(r.get(f"s_{VERIFY_K}") / r["s_1"] if r.get("s_1") else None, ".2f"),
            report.num(r["read_1"] / MIB if "read_1" in r else None, ".0f"),
            report.num(r[f"read_{VERIFY_K}"] / MIB if f"read_{VERIFY_K}" in r else None, ".0f"),
            report.num(r[f"read_{VERIFY_K}"] / r["read_1"] if r.get("read_1") else None, ".2f"),
            report.status(r),
        ]
        for r in rows
    ]
    head = [
        "contender",
        "1 token s",
        f"{VERIFY_K} tokens s",
        "time x",
        "1 token MiB",
        f"{VERIFY_K} tokens MiB",
        "bytes x",
    ]
    print("\n" + report.table([*head, "status"], "lrrrrrrl", lines))
    print(f"(targets: {VERIFY_K} tokens <= 1.2x the time and <= 1.05x the bytes of 1; medians of {VERIFY_REPEATS})")
    return {"model": model.name, "limit": limit, "allowance": extra, "rows": rows}


def _sources(tokenizer: Any, min_tokens: int) -> list[list[int]]:
    """The token ids of the held-out files with at least `min_tokens` tokens, the encoding tables left out
    (`encodings/cp*.py` are long runs of table rows any draft predicts)."""
    out = []
    for path in trained.heldout_files():
        if "encodings" not in path.parts and len(ids := tokenizer(trained.read(path))["input_ids"]) >= min_tokens:
            out.append(list(ids))
    return out


def _tasks(tokenizer: Any) -> dict[str, list[list[int]]]:
    """`continue`: windows from the middle of held-out files (code, not license headers); `rewrite`: the
    editing task: a file's start, the instruction to write it again, and its first line."""
    sources = _sources(tokenizer, 4 * DRAFT_PROMPT_TOKENS)
    middle = [ids[len(ids) // 2 : len(ids) // 2 + DRAFT_PROMPT_TOKENS] for ids in sources[:DRAFT_PROMPTS]]
    rewrite = []
    for ids in sources[DRAFT_PROMPTS : 2 * DRAFT_PROMPTS]:
        head = tokenizer.decode(ids[:REWRITE_TOKENS])
        first = head.splitlines()[0] if head.strip() else ""
        rewrite.append(list(tokenizer(f"{head}\n\n# The same code, written again:\n{first}\n")["input_ids"]))
    return {"continue": middle, "rewrite": rewrite}


def part_draft(work: Path, quick: bool, timeout: float) -> dict[str, Any]:
    recipe = trained.Recipe(minutes=0.3, corpus_bytes=2_000_000) if quick else None
    root = OUT / "trained-quick" if quick else None
    target, draft = trained.target(root, recipe), trained.draft(root, recipe)
    tokenizer = trained.tokenizer(root)
    folder = models.convert(target, target.with_name(target.name + "-pylomin"))
    draft_folder = models.convert(draft, draft.with_name(draft.name + "-pylomin"))
    pylomin.load_streaming(folder, "transformers.LlamaForCausalLM", quantize="int4", memory_budget=0)  # converted once
    info = json.loads((target / "train.json").read_text())
    extra, _ = runner.allowance("LlamaForCausalLM")
    limit = extra + models.nbytes(folder) // 2
    tasks = _tasks(tokenizer)
    base = {"cls": "LlamaForCausalLM", "src": str(target), "folders": {"block": str(folder)}}
    base.update(measure="benchmarks.speculative:measure_draft", draft_folder=str(draft_folder))
    base["eos"] = tokenizer.eos_token_id
    print(
        f"\n### draft: the trained target ({models.nbytes(folder) / MIB:.0f} MiB fp32, held-out loss "
        f"{info.get('heldout_loss', float('nan')):.2f} nats/token) under {limit / MIB:.0f} MiB "
        f"(allowance {extra / MIB:.0f} + 50 %)",
        flush=True,
    )
    rows = []
    # "share50": memory_budget = half the target's bytes. At this size the limit alone binds nothing: the
    # target (88 MiB) fits in the libraries' reclaimable page cache that the allowance holds, and "auto"
    # keeps it resident ("default" rows: the in-memory case).
    runs = [("continue", "memory", None), ("rewrite", "memory", None)]
    for contender in ("share50", "default"):
        runs += [("continue", contender, h) for h in (None, "int4", "trained", "int4 defaults", "trained defaults")]
        runs += [("rewrite", contender, how) for how in (None, "lookup", "int4")]
    for task, contender, how in runs:
        spec = {**base, "contender": contender, "draft": how and how.removesuffix(" defaults"), "prompts": tasks[task]}
        if how and how.endswith(" defaults"):
            spec["assist"] = TRANSFORMERS_DEFAULTS
        shown = {"share50": "half resident", "default": "auto (fits)"}.get(contender, contender)
        name = f"{task}: {shown}{f' + {how}' if how else ''}"
        if contender == "memory":  # the reference tokens: in memory, no limit, no draft
            r = runner.spawn(spec, work, name=name.replace(" ", "").replace(":", "-"))
            r.update(ok=True, reason="ok")
        else:
            r = _capped(spec, work, limit, name.replace(" ", "").replace(":", "-"), timeout)
        rows.append({"task": task, "contender": contender, "draft": how, "name": name, **r})
    lines = []
    for r in rows:
        runs_ = r.get("runs", [])
        ref = next(x for x in rows if x["task"] == r["task"] and x["contender"] == "memory")
        plain = next(x for x in rows if x["task"] == r["task"] and x["contender"] == r["contender"] and not x["draft"])
        tps = statistics.mean(x["decode_tps"] for x in runs_) if runs_ else None
        plain_tps = statistics.mean(x["decode_tps"] for x in plain.get("runs", [])) if plain.get("runs") else None
        drafted = sum(x["drafted"] for x in runs_)
        accepted = sum(DRAFT_NEW - x["passes"] for x in runs_)
        same = [x["tokens"] for x in runs_] == [x["tokens"] for x in ref.get("runs", [])]
        r.update(tps=tps, acceptance=accepted / drafted if drafted else None, same=same)
        reads = [x["read_per_token"] for x in runs_]
        lines.append(
            [
                r["name"],
                report.num(tps, ".1f"),
                report.num(tps / plain_tps if tps and plain_tps and r["contender"] != "memory" else None, ".2f"),
                report.num(r["acceptance"] * 100 if r["acceptance"] is not None else None, ".0f"),
                report.num(statistics.mean(reads) / MIB if reads else None, ".1f"),
                "yes" if same else "NO",
                report.status(r),
            ]
        )
    head = ["run", "decode tok/s", "x plain", "accepted %", "MiB read/token", "= in memory"]
    print("\n" + report.table([*head, "status"], "lrrrrll", lines))
    print(
        f"({DRAFT_PROMPTS} prompts, {DRAFT_NEW} greedy tokens each; tok/s: mean over prompts of the decode after the first token)"
    )
    return {"target": str(target), "train": info, "limit": limit, "allowance": extra, "rows": rows}


def part_batch(work: Path, quick: bool, timeout: float) -> dict[str, Any]:
    from pylomin.modeling import kv_cache_bytes
    from pylomin.tools.plan import estimate

    model = models.LLAMA_SMALL if quick else models.LLAMA
    spec = {**model.spec("block"), "measure": "benchmarks.speculative:measure_batch"}
    folder = Path(spec["folders"]["block"])
    extra, _ = runner.allowance(model.cls)
    model_bytes = models.nbytes(folder)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    context = BATCH_PROMPT + BATCH_NEW
    print(f"\n### batch: {model.name}, sequences of {context} tokens", flush=True)
    rows = []
    for b in BATCHES:
        r = runner.spawn({**spec, "contender": "memory", "batch": b}, work, name=f"memory-b{b}")
        rows.append({"limit": None, "pct": None, "batch": b, "contender": "memory", "ok": True, "reason": "ok", **r})
    for pct in BATCH_LIMITS:
        limit = extra + model_bytes * pct // 100
        for b in BATCHES:
            r = _capped({**spec, "contender": "default", "batch": b}, work, limit, f"default-{pct}-b{b}", timeout)
            rows.append({"limit": limit, "pct": pct, "batch": b, "contender": "default", **r})
    too_big = estimate(
        folder, f"transformers.{model.cls}", memory=model_bytes * BATCH_LIMITS[0] // 100, batch=TOO_BIG, context=context
    )
    lines = []
    for r in rows:
        ref = next(x for x in rows if x["contender"] == "memory" and x["batch"] == r["batch"])
        one = next((x for x in rows if x["pct"] == r["pct"] and x["batch"] == 1), None)
        speedup = (
            r.get("decode_tps") / one["decode_tps"] if one and one.get("decode_tps") and r.get("decode_tps") else None
        )
        r.update(same=r.get("tokens") == ref.get("tokens"), speedup=speedup)
        lines.append(
            [
                "in memory" if r["pct"] is None else f"{r['pct']} %",
                "-" if r["limit"] is None else f"{r['limit'] / MIB:.0f}",
                r["batch"],
                f"{kv_cache_bytes(config, r['batch'], context) / MIB:.0f}",
                report.num(r.get("decode_tps"), ".2f"),
                report.num(speedup, ".2f"),
                "yes" if r["same"] else "NO",
                report.status(r),
            ]
        )
    head = ["limit", "MiB", "sequences", "KV MiB", "decode tok/s", "x 1 sequence", "= in memory"]
    print("\n" + report.table([*head, "status"], "rrrrrrll", lines))
    print(
        f"(decode tok/s: all sequences' tokens after the first, {BATCH_NEW} new from {BATCH_PROMPT}; targets at 75 and 100 %: 8 >= 4x, 16 >= 8x)"
    )
    print(f"{TOO_BIG} sequences at 75 %: {'fits' if too_big.fits else 'refused before the run: ' + too_big.reason}")
    return {
        "model": model.name,
        "allowance": extra,
        "rows": rows,
        "too_big": {"fits": too_big.fits, "reason": too_big.reason},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    p.add_argument("--quick", action="store_true", help="small models (a smoke test)")
    p.add_argument("--timeout", type=float, default=900.0, help="most seconds one capped child may take")
    p.add_argument("--no-png", action="store_true", help="skip the chart")
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    if unknown := set(parts) - set(PARTS):
        p.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    if (why := cgroup.unavailable()) is not None:
        print(f"capped runs are not possible here: {why}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    path = OUT / ("bench_speculative-quick.json" if args.quick else "bench_speculative.json")
    dump: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    dump.update(cpus=os.cpu_count(), command=" ".join(["python -m benchmarks.speculative", *sys.argv[1:]]))
    with tempfile.TemporaryDirectory(prefix="work-", dir=OUT) as tmp:
        for part in parts:
            dump[part] = globals()[f"part_{part}"](Path(tmp), args.quick, args.timeout)
            path.write_text(json.dumps(dump, indent=1))
    chart = OUT / "tokens-per-read-quick.png" if args.quick else ROOT / "docs" / "tokens-per-read.png"
    if not args.no_png and {"draft", "batch"} <= set(dump):
        report.tokens_per_read_chart(dump, chart)
        print(f"wrote {chart}")
    print(f"\nwrote {path}; total {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
