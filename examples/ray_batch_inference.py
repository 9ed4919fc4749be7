"""Embed a dataset with a streamed BERT in Ray Data actors, and measure what the actors share.

python examples/ray_batch_inference.py                      # a small random BERT, built and converted here
python examples/ray_batch_inference.py --model-dir DIR      # a folder from `pylomin-convert`

Needs `pip install 'pylomin[ray]'`. Texts are random token ids (no tokenizer, no download). Runs 1
then 2 actors (1 CPU each) with the units streamed (`memory_budget=0`), then 2 actors with the whole
model kept resident (`memory_budget` = the model; what the default, "auto", does on a node where it
fits). Every run passes `drop_page_cache=False`: actors on one node map the same unit
files, and a page one actor reads stays in the page cache for the other instead of being dropped.
Each actor reads its own /proc/self/smaps_rollup after every batch and returns it as columns (the
actors are gone once the dataset is done); the figures of each actor's last batch are summed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import ray
import ray.data
import torch
import transformers

import pylomin
from pylomin.ray import forward_batch, map_batches

MiB = 2**20
FIELDS = ("Rss", "Pss_File", "Anonymous", "Shared_Clean")
UNIT_FIELDS = {"Rss:": "units_rss", "Shared_Clean:": "units_shared", "Pss:": "units_pss"}


def build_bert(folder: Path) -> Path:
    """A random BERT (hidden 256, 4 layers, 44 MiB fp32) saved and converted into `folder/pylomin`."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
    transformers.BertModel(cfg).save_pretrained(folder / "hf")
    return pylomin.convert(folder / "hf", folder / "pylomin", progress=False)


def memory(units: str) -> dict[str, int]:
    """This process's smaps_rollup fields (bytes), plus the resident and shared bytes of the unit files."""
    with open("/proc/self/smaps_rollup") as f:
        rollup = {k.rstrip(":"): int(v) * 1024 for k, v, *_ in (line.split() for line in f) if k.rstrip(":") in FIELDS}
    weights = dict.fromkeys(UNIT_FIELDS.values(), 0)
    in_units = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                in_units = len(head) == 6 and head[5].startswith(units)
            elif in_units and head[0] in UNIT_FIELDS:
                weights[UNIT_FIELDS[head[0]]] += int(head[1]) * 1024
    return {**rollup, **weights}


def embed_step(units: str) -> Callable[[torch.nn.Module, Mapping[str, np.ndarray]], dict[str, np.ndarray]]:
    """The per-batch step: masked mean of the hidden states, plus the actor's pid, timings and memory."""

    def step(model: torch.nn.Module, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        start = time.time()
        hidden = torch.from_numpy(forward_batch(model, batch)["last_hidden_state"])
        mask = torch.from_numpy(np.asarray(batch["attention_mask"])).float()[..., None]
        n = len(hidden)
        cols = {"embedding": ((hidden * mask).sum(1) / mask.sum(1)).numpy(), "pid": np.full(n, os.getpid())}
        cols |= {"start": np.full(n, start), "end": np.full(n, time.time())}
        return cols | {k: np.full(n, v) for k, v in memory(units).items()}

    return step


def run(ds: ray.data.Dataset, model_dir: Path, model_cls: str, actors: int, budget: int, batch: int) -> None:
    load = {"drop_page_cache": False, "memory_budget": budget}
    t = time.perf_counter()
    rows = map_batches(
        ds,
        model_dir,
        model_cls,
        concurrency=actors,
        batch_size=batch,
        load_kwargs=load,
        fn=embed_step(str(model_dir.resolve() / "units")),
    ).take_all()
    wall = time.perf_counter() - t
    span = max(r["end"] for r in rows) - min(r["start"] for r in rows)
    last = {int(r["pid"]): r for r in sorted(rows, key=lambda r: r["end"])}  # each actor's last batch
    mode = "streamed" if budget == 0 else "resident"
    print(f"| {actors} | {mode} | {len(rows)} | {wall:.1f} | {len(rows) / wall:.1f} | {len(rows) / span:.1f} ", end="")
    total = {k: sum(int(r[k]) for r in last.values()) / MiB for k in (*FIELDS, *UNIT_FIELDS.values())}
    print(
        f"| {total['Anonymous']:.0f} | {total['Rss'] - total['Anonymous']:.0f} | {total['Shared_Clean']:.0f} "
        f"| {total['Pss_File']:.0f} | {total['units_rss']:.1f} | {total['units_shared']:.1f} | {total['units_pss']:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a converted folder (default: build a small random BERT)")
    parser.add_argument("--model-cls", default="transformers.AutoModel", help="import path of the model class")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir.resolve() if args.model_dir else build_bert(Path(tmp))
        config = json.loads((model_dir / "config.json").read_text())
        vocab, seq = config["vocab_size"], min(args.seq, config.get("max_position_embeddings", args.seq))
        size = sum(u.size for u in pylomin.format.manifest.read(model_dir).units)
        rng = np.random.default_rng(0)
        ids = rng.integers(vocab // 10, vocab, (args.rows, seq))  # past BERT's special and unused ids
        lengths = rng.integers(seq // 4, seq + 1, args.rows)
        mask = (np.arange(seq) < lengths[:, None]).astype(np.int64)
        items = [{"input_ids": ids[i], "attention_mask": mask[i]} for i in range(args.rows)]

        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
        ray.data.DataContext.get_current().enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        ds = ray.data.from_items(items, override_num_blocks=16).materialize()
        print(f"model: {model_dir} ({size / MiB:.1f} MiB in unit files); {args.rows} rows x {seq} tokens")
        print("rows/s: over the whole run (actor start and model load included) and over the batches' span")
        print("memory: the actors' last batch, summed over actors, MiB (RSS split anonymous / file-backed);")
        print("        Pss counts a page shared by n processes as 1/n: the unit files' Pss is their memory on the node")
        print("| actors | units | rows | wall s | rows/s | rows/s batches | anon | file | Shared_Clean | Pss_File "
              "| unit files resident | of it shared | unit files Pss |")  # fmt: skip
        print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for actors, budget in ((1, 0), (2, 0), (2, size)):
            run(ds, model_dir, args.model_cls, actors, budget, args.batch_size)
        ray.shutdown()


if __name__ == "__main__":
    main()
