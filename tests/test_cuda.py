"""CUDA: streamed outputs equal the in-memory CUDA model's (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

import pylomin
from tests import models

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("prefetch", [0, 2])
def test_cuda_forward_and_generate_equal_in_memory(hf_dir, converted, prefetch: int) -> None:
    ref = transformers.GPT2LMHeadModel.from_pretrained(hf_dir("gpt2"), dtype=torch.float32).eval().cuda()
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, device="cuda", prefetch=prefetch)
    x = models.ids().cuda()
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x).logits, ref(x).logits)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    assert torch.equal(model.generate(x, **kwargs), ref.generate(x, **kwargs))
    assert all(p.device.type == "meta" for p in model.parameters())
    pylomin.unload_(model)


def test_cuda_budget_keeps_units_on_the_device(hf_dir, converted) -> None:
    ref = transformers.LlamaForCausalLM.from_pretrained(hf_dir("llama"), dtype=torch.float32).eval().cuda()
    model = pylomin.load_streaming(
        converted("llama"), transformers.LlamaForCausalLM, device="cuda", memory_budget="1GiB"
    )
    assert all(p.device.type == "cuda" for p in model.parameters())
    x = models.ids().cuda()
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
