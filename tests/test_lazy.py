"""The original API: `lazy_loading` and `chunked_embedding` on models already in memory."""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import pylomin
from pylomin.format import manifest as fmt
from pylomin.runtime.model import stream_of
from pylomin.tools.memory import rss
from tests import models, python

MiB = 2**20


def fresh(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "custom":
        return models.Custom().eval()
    if name == "sequential":
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16), nn.LayerNorm(16)).eval()
    return models.HF_MODELS[name]().eval()


def run(model: nn.Module, name: str) -> torch.Tensor:
    with torch.no_grad():
        if name == "sequential":
            return model(torch.randn(3, 16, generator=torch.Generator().manual_seed(1)))
        out = model(models.ids())
        return (
            out if isinstance(out, torch.Tensor) else (out.logits if hasattr(out, "logits") else out.last_hidden_state)
        )


OPTIONS = [{}, {"target_classes": [nn.Linear, nn.Embedding]}]


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama", "custom", "sequential"])
@pytest.mark.parametrize("options", OPTIONS, ids=["all", "classes"])
def test_lazy_loading_is_bit_identical(name: str, options: dict) -> None:
    want = run(fresh(name), name)
    model = fresh(name)
    assert pylomin.lazy_loading(model, **options) is model
    lazy = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    assert lazy, "nothing became lazy"
    assert torch.equal(run(model, name), want)
    assert torch.equal(run(model, name), want)
    assert [n for n, p in model.named_parameters() if p.device.type == "meta"] == lazy


def test_targets_and_skips_on_sequential() -> None:
    want = run(fresh("sequential"), "sequential")
    model = pylomin.lazy_loading(fresh("sequential"), target_classes=[nn.Linear], skip_modules=["0"])
    on_meta = {n for n, p in model.named_parameters() if p.device.type == "meta"}
    assert on_meta == {"2.weight", "2.bias"}
    assert torch.equal(run(model, "sequential"), want)
    model = fresh("sequential")
    pylomin.lazy_loading(model, target_modules=[model[0], "3"])
    assert {n for n, p in model.named_parameters() if p.device.type == "meta"} == {
        "0.weight",
        "0.bias",
        "3.weight",
        "3.bias",
    }
    assert torch.equal(run(model, "sequential"), want)


def test_tied_weights_stay_tied() -> None:
    want = run(fresh("gpt2"), "gpt2")
    model = pylomin.lazy_loading(fresh("gpt2"), target_classes=[nn.Embedding])
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.lm_head.weight.device.type == "meta"
    assert torch.equal(run(model, "gpt2"), want)


def test_offload_dir_is_kept_and_temp_dir_removed(tmp_path: Path) -> None:
    model = pylomin.lazy_loading(fresh("bert"), offload_dir=tmp_path / "off")
    assert fmt.read(tmp_path / "off").units
    pylomin.unload_(model)
    assert (tmp_path / "off" / fmt.MANIFEST_NAME).is_file()
    assert all(p.device.type == "cpu" for p in model.parameters())  # restored into memory

    temp = Path(tempfile.gettempdir())
    before = set(temp.iterdir())
    model = pylomin.lazy_loading(fresh("bert"))
    folder = stream_of(model).store.folder
    assert folder.is_dir()
    want = run(fresh("bert"), "bert")
    pylomin.unload_(model)
    assert set(temp.iterdir()) - before == set()  # nothing left in the temp dir, not even an empty parent
    assert torch.equal(run(model, "bert"), want)  # a plain in-memory model again

    model = pylomin.lazy_loading(fresh("bert"))
    del model
    gc.collect()
    assert set(temp.iterdir()) - before == set()


@pytest.mark.parametrize(
    ("layers", "width", "freed_mib"),
    [
        (4, 4096, 200),  # 4 x 64 MiB weights: each its own mapping, given back on free
        # 400 x 256 KiB weights sit in malloc's heap (below its mmap threshold), under `x` allocated
        # after them: freeing them alone would leave ~100 MiB resident as free heap chunks.
        (400, 256, 80),
    ],
    ids=["mapped", "c-heap"],
)
def test_memory_is_given_back(layers: int, width: int, freed_mib: int) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(width, width, bias=False) for _ in range(layers))).eval()
    x = torch.randn(2, width)
    with torch.no_grad():
        want = model(x)
    before = rss()
    pylomin.lazy_loading(model)
    gc.collect()
    after = rss()
    assert before.anon - after.anon > freed_mib * MiB, (before, after)
    with torch.no_grad():
        assert torch.equal(model(x), want)


def test_lazy_loading_without_prefetch_starts_no_thread() -> None:
    # A fresh process: a thread some earlier test left behind (tqdm's monitor) must not hide a new one.
    code = (
        "import threading, torch, pylomin; from torch import nn\n"
        "m = pylomin.lazy_loading(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), prefetch=0)\n"
        "with torch.no_grad(): m(torch.randn(1, 4))\n"
        "print([t.name for t in threading.enumerate()])\n"
    )
    out = python.run(code, check=True).stdout
    assert out.strip() == "['MainThread']", out


def test_argument_errors() -> None:
    with pytest.raises(ValueError, match="either target_classes or target_modules"):
        pylomin.lazy_loading(fresh("sequential"), target_classes=[nn.Linear], target_modules=["0"])
    with pytest.raises(ValueError, match="`nope` is not a submodule"):
        pylomin.lazy_loading(fresh("sequential"), target_modules=["nope"])
    with pytest.raises(ValueError, match="no parameters to make lazy"):
        pylomin.lazy_loading(fresh("sequential"), target_classes=[nn.Conv2d])
    model = pylomin.lazy_loading(fresh("sequential"))
    with pytest.raises(ValueError, match="already streamed or lazy"):
        pylomin.lazy_loading(model)
    with pytest.raises(FileExistsError):
        folder = stream_of(model).store.folder
        pylomin.lazy_loading(fresh("sequential"), offload_dir=folder)


@pytest.mark.parametrize("chunk_size", [1, 7, 10, 99, 1000])
def test_chunked_embedding_is_bit_identical(chunk_size: int) -> None:
    want = run(fresh("bert"), "bert")
    model = pylomin.chunked_embedding(fresh("bert"), "embeddings.word_embeddings", chunk_size)
    emb = model.embeddings.word_embeddings
    assert isinstance(emb, pylomin.ChunkedEmbedding)
    assert len(emb.chunks) == -(-models.VOCAB // chunk_size)
    assert emb.chunks[-1].weight.shape[0] == models.VOCAB - (len(emb.chunks) - 1) * chunk_size
    assert torch.equal(run(model, "bert"), want)


def test_chunked_embedding_keeps_padding_idx_rows() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(50, 4, padding_idx=3)
    ids = torch.tensor([[3, 0, 49, 3, 17]])
    chunked = pylomin.ChunkedEmbedding(emb, 8)
    assert chunked.padding_idx == 3
    assert torch.equal(chunked(ids), emb(ids))
    with pytest.raises(IndexError):
        chunked(torch.tensor([50]))


def test_chunked_plus_lazy_reads_only_hit_chunks() -> None:
    want = run(fresh("bert"), "bert")
    model = pylomin.chunked_embedding(fresh("bert"), "embeddings.word_embeddings", 10)
    pylomin.lazy_loading(model)
    emb = model.embeddings.word_embeddings
    ran: list[int] = []
    for i, chunk in enumerate(emb.chunks):
        chunk.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
    assert torch.equal(run(model, "bert"), want)
    assert sorted(ran) == sorted({int(t) // 10 for t in models.ids().flatten()})
    assert len(ran) < len(emb.chunks)


def test_chunked_embedding_errors() -> None:
    with pytest.raises(ValueError, match="`embeddings.nope` is not a submodule"):
        pylomin.chunked_embedding(fresh("bert"), "embeddings.nope", 8)
    with pytest.raises(ValueError, match="`embeddings.LayerNorm` is a LayerNorm, not an nn.Embedding"):
        pylomin.chunked_embedding(fresh("bert"), "embeddings.LayerNorm", 8)
    with pytest.raises(ValueError, match="tied to `lm_head.weight`"):
        pylomin.chunked_embedding(fresh("gpt2"), "transformer.wte", 8)
    with pytest.raises(ValueError, match="max_norm"):
        pylomin.ChunkedEmbedding(nn.Embedding(10, 2, max_norm=1.0), 4)
    model = pylomin.lazy_loading(fresh("bert"))
    with pytest.raises(ValueError, match="streamed already"):
        pylomin.chunked_embedding(model, "embeddings.word_embeddings", 8)
