"""Train the benchmarks' models on the Python stdlib's source: a target and a draft Llama, or the mixture-of-experts.

A byte-level BPE (4096 tokens) and two LlamaForCausalLM sharing it, the target (93 MB fp32) and the
draft (11 MB), trained for `--minutes` of wall clock together (about 73 % for the target), saved in
`$PYLOMIN_BENCH_MODELS` or `~/.cache/pylomin-bench/` with a train.json each (benchmarks/harness/trained.py).
Models already there are kept unless `--force`. `--moe` trains the routing benchmark's
mixture-of-experts instead (`stdlib-moe`: Qwen3-MoE, 109 MB fp32, 32 experts a layer, top-4) for `--minutes`.

    .venv/bin/python -m benchmarks.train [--minutes 30] [--force]
    .venv/bin/python -m benchmarks.train --moe [--minutes 13] [--force]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks.harness import trained


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--minutes", type=float, default=None, help="training time of both models together (30), or --moe's (13)"
    )
    p.add_argument("--moe", action="store_true", help="the mixture-of-experts instead of the Llama pair")
    p.add_argument("--force", action="store_true", help="retrain the tokenizer and both models")
    p.add_argument("--root", type=Path, default=None, help=f"instead of ${trained.ENV_VAR} / ~/.cache/pylomin-bench")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    if args.moe:
        recipe = trained.Recipe() if args.minutes is None else trained.Recipe(moe_minutes=args.minutes)
        folder = trained.moe(args.root, recipe, force=args.force)
        r = json.loads((folder / "train.json").read_text())
        print(
            f"\n{r['name']}: {r['mb']:.1f} MB, {r['steps']} steps, {r['tokens_seen']} tokens in {r['train_wall_s']:.0f} s"
        )
        print(f"loss (nats per token): train {r['final_train_loss']:.3f}, held-out {r['heldout_loss']:.3f}")
        print(f"folder: {folder} ({time.perf_counter() - t0:.0f} s)")
        return 0
    out = trained.build(args.root, trained.Recipe(minutes=args.minutes or 30.0), force=args.force)
    print(f"\n{'model':<22}{'MB':>7}{'steps':>7}{'tokens':>11}{'train':>8}{'held-out':>10}")
    for key in ("target", "draft"):
        r = json.loads((out[key] / "train.json").read_text())
        print(
            f"{r['name']:<22}{r['mb']:>7.1f}{r['steps']:>7}{r['tokens_seen']:>11}"
            f"{r['final_train_loss']:>8.3f}{r['heldout_loss']:>10.3f}"
        )
    print(f"losses in nats per token; draft vs target: {r['agreement']}")
    print(f"folders: {out['target']}, {out['draft']} ({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
