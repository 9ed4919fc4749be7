"""The default models of the demo and the benchmarks, built once with random weights under `models/`."""

from __future__ import annotations

import gc
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

# Every measured child process gets this: glibc would otherwise keep freed activation buffers in
# per-thread arenas and blur every memory figure.
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")}

# The BERT-like model of the original pylomin benchmark: 1.6 GiB of fp32 parameters.
BERT_1_6G = dict(
    vocab_size=119547, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)


# Its small stand-in for `--quick` runs (seconds, not minutes).
BERT_SMALL = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)


def benchmark_bert(quick: bool) -> Path:
    """The BERT the benchmarks run: the 1.6 GiB one, or the small one with `quick`."""
    return ensure_bert(MODELS / "bert-small", **BERT_SMALL) if quick else ensure_bert()


def ensure_bert(path: Path = MODELS / "bert-1.6g", **overrides: int) -> Path:
    """Save a random-weight BertModel in Hugging Face format at `path` unless it is already there."""
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    from transformers import BertConfig, BertModel

    t0 = time.perf_counter()
    print(f"building the default model at {path} (first run only) ...", file=sys.stderr, flush=True)
    torch.manual_seed(0)
    model = BertModel(BertConfig(**{**BERT_1_6G, **overrides}))
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    del model
    gc.collect()
    tmp.rename(path)
    print(f"built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return path


def ensure_converted(src: Path, folder: Path, unit: str = "block") -> Path:
    """Convert `src` into `folder` with `unit` units unless it is already there."""
    if not (folder / "pylomin.json").is_file():
        import pylomin

        print(f"converting {src} -> {folder} ({unit} units, first run only)", flush=True)
        pylomin.convert(src, folder, unit=unit, progress=False)  # type: ignore[arg-type]
    return folder
