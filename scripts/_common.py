"""What the demo and the benchmarks share: the models they build under `models/`, and the page cache and disk."""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
MIB = 2**20

# Every measured child process gets this: glibc would otherwise keep freed activation buffers in
# per-thread arenas and blur every memory figure.
ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")}

# The BERT-like model of the original pylomin benchmark: 1.6 GiB of fp32 parameters.
BERT_1_6G = dict(
    vocab_size=119547, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
)
# Its small stand-in for `--quick` runs (seconds, not minutes).
BERT_SMALL = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)

# The decoder of the generate() benchmarks: GPT-2-large-sized (~3 GB fp32), and its `--quick` stand-in.
GPT2_LARGE = dict(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024)
GPT2_SMALL = {**GPT2_LARGE, "n_embd": 256, "n_layer": 4, "n_head": 4}
# The mixture-of-experts decoder (~1.9 GB fp32; 8 experts, top-2) of bench_moe and bench_interrupt.
MIXTRAL = dict(
    hidden_size=512,
    intermediate_size=1792,
    num_hidden_layers=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    vocab_size=32000,
    tie_word_embeddings=False,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=1024,
)


# --- models -------------------------------------------------------------------------------------------


def benchmark_bert(quick: bool) -> Path:
    """The BERT the benchmarks run: the 1.6 GiB one, or the small one with `quick`."""
    return ensure_bert(MODELS / "bert-small", **BERT_SMALL) if quick else ensure_bert()


def ensure_bert(path: Path = MODELS / "bert-1.6g", **overrides: int) -> Path:
    """Save a random-weight BertModel in Hugging Face format at `path` unless it is already there."""
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    import torch
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


def ensure_gpt2(config: dict[str, int], name: str) -> Path:
    """The random-weight GPT-2 `name` under models/, built on first use in a child, so this process never holds it."""
    src = MODELS / name
    if not (src / "config.json").is_file():
        print(f"building {src} (random weights, first run only) ...", flush=True)
        subprocess.run([sys.executable, __file__, str(src), json.dumps(config)], env=ENV, check=True)
    return src


def _build_gpt2(path: Path, config: dict[str, int]) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config))
    tmp = path.with_name(path.name + ".partial")
    model.save_pretrained(tmp)
    tmp.rename(path)


def ensure_converted(src: Path, folder: Path, unit: str = "block", quantize: str | None = None) -> Path:
    """Convert `src` into `folder` with `unit` units (and `quantize`d Linear layers) unless it is already there."""
    if not (folder / "pylomin.json").is_file():
        import pylomin

        how = f"{unit} units" + (f", {quantize}" if quantize else "")
        print(f"converting {src} -> {folder} ({how}, first run only)", flush=True)
        pylomin.convert(src, folder, unit=unit, progress=False, quantize=quantize)  # type: ignore[arg-type]
    return folder


# --- page cache and disk ----------------------------------------------------------------------------


def build_mixtral(path: Path, config: dict[str, Any]) -> None:
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**config))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(path)


def unit_files(folder: Path) -> list[Path]:
    """The unit files of the converted model in `folder`: what a streamed run reads."""
    from pylomin import manifest

    return [folder / u.file for u in manifest.read(folder).units]


def forward_bytes(folder: Path) -> int:
    """Bytes a streamed forward reads: every unit but the word embeddings, of which it reads only the looked-up rows."""
    from pylomin import manifest

    m = manifest.read(folder)
    return m.nbytes - sum(u.nbytes for u in m.units if u.name.endswith("word_embeddings"))


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache; written back first, as dirty pages would stay."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_read_bandwidth(paths: list[Path], repeats: int = 3) -> float:
    """Bytes/second of a cold sequential read of `paths` with 16 MiB `readinto`; median of `repeats`."""
    buf = memoryview(bytearray(16 * MIB))
    rates = []
    for _ in range(repeats):
        evict(paths)
        total = 0
        t0 = time.perf_counter()
        for path in paths:
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
        rates.append(total / (time.perf_counter() - t0))
    evict(paths)
    return statistics.median(rates)


if __name__ == "__main__":  # ensure_gpt2's child
    _build_gpt2(Path(sys.argv[1]), json.loads(sys.argv[2]))


def read_bytes() -> int:
    """Bytes this process (all its threads) had the block layer fetch from storage so far."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


class TokenClock:
    """A `generate(streamer=...)` streamer: the time and `read_bytes` at every `put` (the first is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.reads: list[int] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())
        self.reads.append(read_bytes())

    def end(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Prefill seconds, decode tokens/s and mean bytes read per decode token (the tokens after the first)."""
        t, r = self.times, self.reads
        decode = len(t) - 2  # puts: the prompt, the first new token, then the decode tokens
        deltas = [b - a for a, b in zip(r[1:], r[2:], strict=False)]
        return {
            "prefill_s": t[1] - t[0],
            "decode_tps": decode / (t[-1] - t[1]),
            "read_per_token": sum(deltas) / len(deltas),
            "token_s": [b - a for a, b in zip(t, t[1:], strict=False)],
            "token_read": [b - a for a, b in zip(r, r[1:], strict=False)],
        }
