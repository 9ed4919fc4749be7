"""The default models of the demo and the benchmarks, built once with random weights under `models/`."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

# The BERT-like model of the original pylomin benchmark: 1.6 GiB of fp32 parameters.
BERT_1_6G = dict(
    vocab_size=119547, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)


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
