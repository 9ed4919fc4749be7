"""CUDA: streamed outputs equal the in-memory CUDA model's, and a deleted model frees what it held (skipped without a GPU)."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import pylomin
from pylomin.runtime.model import stream_of
from pylomin.runtime.stage import PinnedCopy
from tests import models

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_forward_and_generate_equal_in_memory(hf_dir, converted, prefetch: int) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"), dtype=torch.float32).cuda()
    # memory_budget=0: every unit streams (prefetch 2: staged through the pinned ring on the reader
    # thread; 0: copied when its module starts). The default would keep this tiny model on the GPU.
    model = pylomin.load_streaming(
        converted("gpt2"), transformers.GPT2LMHeadModel, device="cuda", prefetch=prefetch, memory_budget=0
    )
    x = models.ids().cuda()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x).logits, ref(x).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    assert torch.equal(model.generate(x, **kwargs), ref.generate(x, **kwargs))
    assert all(p.device.type == "meta" for p in model.parameters())
    pylomin.unload_(model)


@pytest.mark.parametrize("budget", ["1GiB", "auto"])
def test_cuda_budget_keeps_units_on_the_device(hf_dir, converted, budget: str) -> None:
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"), dtype=torch.float32).cuda()
    # "auto" on CUDA: the GPU keeps what fits in its free memory, here all of it.
    model = pylomin.load_streaming(
        converted("llama"), transformers.LlamaForCausalLM, device="cuda", memory_budget=budget
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    x = models.ids().cuda()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)


def test_cuda_int8_equals_the_quantized_model_in_memory_and_int4_is_refused(tmp_path) -> None:
    from tests.test_quant import llama

    llama().save_pretrained(tmp_path / "src")
    folder = pylomin.convert(tmp_path / "src", tmp_path / "int8", quantize="int8", progress=False)
    ref = models.pretrained(transformers.LlamaForCausalLM, tmp_path / "src")
    pylomin.quantize_(ref, "int8")
    ref = ref.cuda()
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, device="cuda")
    for seq in (1, 20):
        x = models.ids(1, seq).cuda() % 512
        with torch.no_grad():
            assert torch.equal(model(x).logits, ref(x).logits)
    int4 = pylomin.convert(tmp_path / "src", tmp_path / "int4", quantize="int4", progress=False)
    with pytest.raises(pylomin.PylominError, match="layout of torch's CPU kernel"):
        pylomin.load_streaming(int4, transformers.LlamaForCausalLM, device="cuda")


def test_cuda_a_cast_while_streaming_equals_the_model_loaded_in_that_dtype(hf_dir, converted) -> None:
    # The fp32 units are copied as stored and cast on the GPU (PinnedCopy), from_pretrained casts on
    # the CPU: both round to nearest even.
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"), dtype=torch.bfloat16).cuda()
    model = pylomin.load_streaming(
        converted("gpt2"), transformers.GPT2LMHeadModel, device="cuda", dtype=torch.bfloat16, memory_budget=0
    )
    x = models.ids().cuda()
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x).logits, ref(x).logits)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    assert torch.equal(model.generate(x, **kwargs), ref.generate(x, **kwargs))
    pylomin.unload_(model)


def stack(depth: int = 8, dim: int = 1024) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(depth))).eval()


def readers() -> int:
    return sum(t.name == "pylomin-prefetch" for t in threading.enumerate())


def test_cuda_a_deleted_model_gives_back_its_device_memory_and_pinned_ring(tmp_path: Path) -> None:
    ref = stack()  # 8 units of 4 MiB
    torch.save(ref.state_dict(), tmp_path / "s.pt")
    folder = pylomin.convert(tmp_path / "s.pt", tmp_path / "out", progress=False)
    ref = ref.cuda()
    x = torch.randn(4, 1024, device="cuda")
    with torch.no_grad():
        expected = ref(x)  # cuBLAS's workspace for this stream is allocated here, not counted below
    torch.cuda.synchronize()
    gc.collect()
    base, threads = torch.cuda.memory_allocated(), readers()
    model = pylomin.load_streaming(folder, stack, device="cuda", memory_budget=0, prefetch=2)
    ring = stream_of(model).lifecycle.pager.stager.copy
    assert isinstance(ring, PinnedCopy)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), expected)
    # An asynchronous CUDA error (a copy racing its use, a bad event) would surface here.
    torch.cuda.synchronize()
    assert ring.buffers and all(b.is_pinned() for b in ring.buffers)  # units went through the pinned ring
    assert readers() == threads + 1
    alive, ring_alive = weakref.ref(model), weakref.ref(ring)
    del model, ring
    gc.collect()
    torch.cuda.synchronize()
    # Nothing keeps the model, its reader or its pinned buffers; every unit's device copy is freed.
    assert alive() is None and ring_alive() is None
    assert readers() == threads
    assert torch.cuda.memory_allocated() <= base, (torch.cuda.memory_allocated() - base) / 2**20
