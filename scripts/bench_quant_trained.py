"""Accuracy of compressed units on a trained model: a small Llama trained here on a synthetic language.

Random weights (`scripts/bench_quant.py`) give near-flat logits, where any error flips the argmax: a
pessimistic accuracy figure. No trained checkpoint can be downloaded here, so this script trains one:
a Llama (hidden 256, intermediate 704, 4 layers, 4 heads, vocab 512, untied head; 14 MiB fp32) on a
language where the next token is one of 4 candidates of the token before it, with fixed peaked
probabilities (the best guess is right 55 % of the time). 400 AdamW steps of 32 x 64 tokens (a few
minutes on 2 cores), saved under `models/llama-trained-tiny` and reused afterwards. (A language
keyed by the two tokens before did not train in that budget: 262144 random pairs to memorize.)

Then converted fp32, int8 and int4 (groups of 32, 64, 128), each loaded with `pylomin.load_streaming`,
and measured on 64 held-out sequences of 64 tokens: cross-entropy (nats per token), top-1 accuracy
against the language's best guess, relative error of the logits against fp32, and for 16 prompts of
16 tokens how many of 64 greedily generated tokens equal fp32's.

    .venv/bin/python scripts/bench_quant_trained.py [--steps 400]

Prints a table and writes `bench-out/bench_quant_trained.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import pylomin  # noqa: E402
from benchmarks.harness import internals  # noqa: E402
from benchmarks.harness.paths import MODELS, ROOT  # noqa: E402

VOCAB, CANDIDATES, SEQ, BATCH = 512, 4, 64, 32
PROBS = torch.tensor([0.55, 0.25, 0.15, 0.05])
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=704,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def language(seed: int = 0) -> torch.Tensor:
    """[VOCAB, CANDIDATES]: the tokens that may follow each token, best first."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (VOCAB, CANDIDATES), generator=g)


def sample(table: torch.Tensor, n: int, length: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(n, length, dtype=torch.long)
    x[:, 0] = torch.randint(0, VOCAB, (n,), generator=g)
    for t in range(1, length):
        pick = torch.multinomial(PROBS.expand(n, -1), 1, generator=g).squeeze(1)
        x[:, t] = table[x[:, t - 1], pick]
    return x


def train(path: Path, steps: int) -> None:
    torch.manual_seed(0)
    table = language()
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**CONFIG))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for step in range(steps):
        x = sample(table, BATCH, SEQ, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    model.eval().save_pretrained(path)


def measure(
    model: Any, ref: dict[str, Any] | None, data: torch.Tensor, best: torch.Tensor, prompts: torch.Tensor
) -> dict[str, Any]:
    with torch.no_grad():
        logits = model(data).logits[:, :-1]  # predictions for tokens 1..
        target = data[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), target.reshape(-1)).item()
        acc = (logits.argmax(-1) == best).float().mean().item()
        kw = dict(do_sample=False, max_new_tokens=64, min_new_tokens=64, pad_token_id=0)
        tokens = model.generate(prompts, attention_mask=torch.ones_like(prompts), **kw)[:, prompts.shape[1] :]
    r: dict[str, Any] = {"ce": ce, "acc": acc, "logits": logits, "tokens": tokens}
    if ref is not None:
        r["error"] = ((logits - ref["logits"]).norm() / ref["logits"].norm()).item()
        r["agree"] = (tokens == ref["tokens"]).float().mean().item()
        first = [(row != ref_row).nonzero() for row, ref_row in zip(tokens, ref["tokens"], strict=True)]
        r["first"] = sorted(int(f[0]) if len(f) else 64 for f in first)[len(first) // 2]  # median
    return r


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=400)
    args = p.parse_args()
    t_start = time.perf_counter()
    src = MODELS / "llama-trained-tiny"
    if not (src / "config.json").is_file():
        print(f"training {src} ({args.steps} steps, first run only) ...", flush=True)
        train(src, args.steps)
    table = language()
    g = torch.Generator().manual_seed(2)  # held out: another stream than training's
    data = sample(table, 64, SEQ, g)
    best = table[data[:, :-1], 0]  # the language's best guess for tokens 1..
    prompts = sample(table, 16, 16, g)
    schemes = ["fp32", "int8", "int4-g32", "int4-g64", "int4-g128"]
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for scheme in schemes:
            folder = pylomin.convert(
                src, Path(tmp) / scheme, quantize=None if scheme == "fp32" else scheme, progress=False
            )
            model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM)
            rows[scheme] = measure(model, rows.get("fp32"), data, best, prompts)
            rows[scheme]["bytes"] = internals.manifest(folder).nbytes
            pylomin.unload_(model)
    print(f"\n### {src.name}: trained here; 64 held-out sequences of {SEQ} tokens, 16 prompts x 64 greedy tokens\n")
    print(
        "| weights | bytes | cross-entropy | top-1 = best guess | logits rel. error | greedy tokens equal to fp32 | median first difference |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for scheme in schemes:
        r = rows[scheme]
        error = f"{r['error']:.1e}" if "error" in r else "0"
        agree = f"{r['agree'] * 100:.0f} %" if "agree" in r else "100 %"
        first = str(r.get("first", "-"))
        print(
            f"| {scheme} | {r['bytes'] / 2**20:.1f} MiB | {r['ce']:.3f} | {r['acc'] * 100:.1f} % | {error} | {agree} | {first} |"
        )
    best_ce = -(PROBS * PROBS.log()).sum().item()
    print(f"\nthe language's own entropy: {best_ce:.3f} nats per token; best-guess accuracy at most 100 %")
    for r in rows.values():
        del r["logits"], r["tokens"]
    out = ROOT / "bench-out"
    out.mkdir(exist_ok=True)
    (out / "bench_quant_trained.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'bench_quant_trained.json'}; total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
