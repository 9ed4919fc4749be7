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


def test_cuda_int8_equals_the_quantized_model_in_memory_and_int4_is_refused(tmp_path) -> None:
    from tests.test_quant import llama

    llama().save_pretrained(tmp_path / "src")
    folder = pylomin.convert(tmp_path / "src", tmp_path / "int8", quantize="int8", progress=False)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "src").eval()
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
