"""The models the benchmarks run: random-weight transformers models built once under `models/`, and their conversions."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.harness import internals
from benchmarks.harness.paths import ENV, MODELS, harness_cmd


@dataclass(frozen=True)
class Model:
    """A random-weight transformers model: class `cls` built from `config` with seed 0, saved under `models/name`."""

    name: str
    cls: str  # the transformers model class, "BertModel", "LlamaForCausalLM", ...
    config: dict[str, Any]
    block: str = "pylomin"  # the suffix of its block-unit folder

    @property
    def vocab(self) -> int:
        return int(self.config["vocab_size"])

    def src(self) -> Path:
        """The Hugging Face folder, built on first use."""
        return ensure_built(MODELS / self.name, self.cls, self.config)

    def folder(self, key: str = "block") -> Path:
        """Converted on first use: `key` is "block", "leaf", or a scheme ("int8", "int4", "int8+head": the head too)."""
        if key in ("block", "leaf"):
            return convert(
                self.src(), MODELS / f"{self.name}-{self.block if key == 'block' else 'pylomin-leaf'}", unit=key
            )
        scheme, head = key.removesuffix("+head"), key.endswith("+head")
        name = f"{self.name}-{self.block}-{scheme}" + ("-head" if head else "")
        return convert(self.src(), MODELS / name, quantize=scheme, head=head)

    def spec(self, *keys: str) -> dict[str, Any]:
        """What a child needs to load it: the class, the source folder and the converted folders `keys`."""
        return {"cls": self.cls, "src": str(self.src()), "folders": {key: str(self.folder(key)) for key in keys}}


_BERT = dict(vocab_size=119547, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
BERT = Model("bert-1.6g", "BertModel", _BERT, "pylomin-block")  # the 1.6 GiB BERT of the original pylomin benchmark
_BERT_S = dict(vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024)
BERT_SMALL = Model("bert-small", "BertModel", _BERT_S, "pylomin-block")
_GPT2 = dict(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257, n_positions=1024)
GPT2_LARGE = Model("gpt2-large-random", "GPT2LMHeadModel", _GPT2)  # ~3 GB fp32
GPT2_SMALL = Model("gpt2-small-random", "GPT2LMHeadModel", {**_GPT2, "n_embd": 256, "n_layer": 4, "n_head": 4})
_LLAMA = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16)
_LLAMA.update(num_key_value_heads=16, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
LLAMA = Model("llama-1.5g-random", "LlamaForCausalLM", _LLAMA)  # 1426 MiB fp32: the ladder's decoder
_LLAMA_S = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, vocab_size=8000)
LLAMA_SMALL = Model("llama-small-random", "LlamaForCausalLM", {**_LLAMA, **_LLAMA_S, "num_key_value_heads": 4})
_MIXTRAL = dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=8, num_local_experts=8)
_MIXTRAL.update(num_experts_per_tok=2, vocab_size=32000, tie_word_embeddings=False, num_attention_heads=8)
_MIXTRAL.update(num_key_value_heads=8, max_position_embeddings=1024)
MIXTRAL = Model("mixtral-random", "MixtralForCausalLM", _MIXTRAL)  # ~830 MiB fp32, 8 experts, top-2
_MIXTRAL_S = {**_MIXTRAL, "num_hidden_layers": 2, "vocab_size": 8000}
MIXTRAL_SMALL = Model("mixtral-small-random", "MixtralForCausalLM", _MIXTRAL_S)
_QWEN3_MOE = dict(hidden_size=512, intermediate_size=1536, moe_intermediate_size=256, num_hidden_layers=8)
_QWEN3_MOE.update(num_experts=64, num_experts_per_tok=8, vocab_size=32000, tie_word_embeddings=False, head_dim=64)
_QWEN3_MOE.update(num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024, decoder_sparse_step=1)
_QWEN3_MOE.update(mlp_only_layers=[], norm_topk_prob=True)
QWEN3_MOE = Model("qwen3-moe-random", "Qwen3MoeForCausalLM", _QWEN3_MOE)  # ~920 MiB fp32, 64 experts of 1.5 MiB, top-8
QWEN3_MOE_SMALL = Model(
    "qwen3-moe-small-random", "Qwen3MoeForCausalLM", {**_QWEN3_MOE, "num_hidden_layers": 2, "vocab_size": 8000}
)
MIXTRAL_4 = {**_MIXTRAL, "num_hidden_layers": 4}  # ~500 MiB: the Ctrl-C benchmark's


def ensure_built(path: Path, cls: str, config: dict[str, Any]) -> Path:
    """The random-weight model at `path`, built on first use in a child, so this process never holds it."""
    if not (path / "config.json").is_file():
        print(f"building {path} (random weights, first run only) ...", flush=True)
        subprocess.run(harness_cmd("build", cls, str(path), json.dumps(config)), env=ENV, check=True)
    return path


def build(cls: str, path: Path, config: dict[str, Any]) -> int:
    """Seed 0, `cls(cls.config_class(**config))`, saved with `save_pretrained` (renamed into place when complete)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model_cls = getattr(transformers, cls)
    model = model_cls(model_cls.config_class(**config))
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tmp.rename(path)
    return 0


def convert(src: Path, folder: Path, *, unit: str = "block", quantize: str | None = None, head: bool = False) -> Path:
    """`src` converted into `folder` with `unit` units (`quantize`d Linear layers, the LM head too with `head`), once
    per version of the converter's code (a folder it did not write, or an older one wrote, is converted again)."""
    stamp = folder / ".converter"  # the converter that wrote it: a folder from other converter code is stale
    if not (folder / "pylomin.json").is_file() or not stamp.is_file() or stamp.read_text() != _converter_digest():
        import pylomin

        shutil.rmtree(folder, ignore_errors=True)

        how = f"{unit} units" + (f", {quantize}" if quantize else "") + (", LM head too" if head else "")
        print(f"converting {src} -> {folder} ({how}, first run only)", flush=True)
        scheme = (
            {"int8": pylomin.Int8WeightOnly, "int4": pylomin.Int4WeightOnly}[quantize](head=head) if quantize else None
        )
        pylomin.convert(src, folder, unit=unit, progress=False, quantize=scheme)  # type: ignore[arg-type]
        stamp.write_text(_converter_digest())
    return folder


def _converter_digest() -> str:
    """A digest of the converter's and the format's source files (what decides the bytes a conversion writes)."""
    import hashlib

    import pylomin

    root = Path(pylomin.__file__).parent
    h = hashlib.sha256()
    for path in sorted([*(root / "converter").glob("*.py"), *(root / "format").glob("*.py")]):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def nbytes(folder: str | Path) -> int:
    """Bytes of the converted model in `folder`."""
    return int(internals.manifest(folder).nbytes)


def unit_files(folder: str | Path) -> list[Path]:
    """The unit files of the converted model in `folder`: what a streamed run reads."""
    return [Path(folder) / u.file for u in internals.manifest(folder).units]


def forward_bytes(folder: str | Path) -> int:
    """Bytes a streamed forward reads: every unit but the word embeddings, of which it reads only the looked-up rows."""
    m = internals.manifest(folder)
    return int(m.nbytes - sum(u.nbytes for u in m.units if u.name.endswith("word_embeddings")))
