"""Fused experts quantized per expert: every MoE architecture of the registry, streamed == in memory quantized."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import pylomin
from pylomin.format import manifest as fmt
from pylomin.modeling import is_experts_module
from tests import models, tiny_models
from tests.test_layout import PARENT_READS, mixtral, tensors_of

# A parent reads a quantized Linear layer's `weight` itself (Jamba's Mamba mixer: `dt_proj.weight @ x` unless
# the config says `_is_quantized`, transformers' own quantizers' flag): it fails loudly on the int8 payload.
READS_LINEAR_WEIGHT = {"jamba": "its Mamba mixer multiplies by `dt_proj.weight` itself"}


def _marks(key: str) -> list[pytest.MarkDecorator]:
    reason = PARENT_READS.get(key) or READS_LINEAR_WEIGHT.get(key)
    xfail = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return xfail + ([pytest.mark.bitexact] if key in ("mixtral", "qwen2_moe") else [])


@pytest.mark.parametrize("key", [pytest.param(k, marks=_marks(k)) for k in tiny_models.moe_keys()])
def test_every_moe_architecture_streams_its_quantized_experts_as_in_memory(key: str, tmp_path: Path) -> None:
    # Enumerated from transformers' registry, as test_layout's every-architecture test.
    cls, config = tiny_models.tiny(key)
    torch.manual_seed(0)
    built = cls._from_config(config).eval()
    if not any(is_experts_module(m) for m in built.modules()):
        pytest.skip(
            f"`{cls.__name__}` holds none of transformers' experts modules (its source file's other classes do)"
        )
    built.save_pretrained(tmp_path / "src")
    fp32 = models.pretrained(cls, tmp_path / "src")
    for scheme in ("int8", "int4-g32"):
        folder = pylomin.convert(tmp_path / "src", tmp_path / scheme, progress=False, model_cls=cls, quantize=scheme)
        q = fmt.read(folder).quantization
        assert q is not None and q.experts, f"{key}: no experts quantized ({q and q.skipped})"
        stored = {n: info for u in fmt.read(folder).units for n, info in u.tensors.items()}
        for module, tensors in q.experts.items():
            for attr, spec in tensors.items():
                payload, scales = stored[f"{module}.{attr}"], stored[f"{module}.{attr}_scales"]
                assert payload.shape[0] == scales.shape[0] == spec["count"]
                assert payload.dtype == ("I8" if scheme == "int8" else "U8"), payload.dtype
        ref = copy.deepcopy(fp32)
        assert set(pylomin.quantize_(ref, scheme)) == set(q.skipped), key
        x = tiny_models.inputs(ref)
        model = pylomin.load_streaming(folder, cls, memory_budget=0)
        with torch.no_grad():
            got, want = model(**x), ref(**x)
        pairs = list(zip(tensors_of(got), tensors_of(want), strict=True))
        assert pairs and all(torch.equal(a, b) for a, b in pairs), (key, scheme)
        if scheme.startswith("int4") and tiny_models.is_causal_lm(ref):  # once per model: the suite's time
            kwargs = dict(max_new_tokens=3, do_sample=False)
            assert torch.equal(model.generate(**x, **kwargs), ref.generate(**x, **kwargs)), (key, scheme)


def test_quantized_experts_survive_a_second_quantize_and_dtype_casts() -> None:
    model = mixtral(experts=4, hidden=64, intermediate=64)
    pylomin.quantize_(model, "int4-g32")
    experts = model.model.layers[0].mlp.experts
    stored = {n: p.detach().clone() for n, p in experts.named_parameters()}
    assert {"gate_up_proj_scales", "down_proj_scales"} <= set(stored)
    x = models.ids(batch=1, seq=5)
    with torch.no_grad():
        want = model(x).logits
        pylomin.quantize_(model, "int4-g32")  # quantized already: left as it is, not quantized twice
        assert all(torch.equal(p, stored[n]) for n, p in experts.named_parameters())
        assert torch.equal(model(x).logits, want)
        for cast in (torch.float16, torch.bfloat16, torch.float32):  # the scales keep the kernel's dtype
            model.to(cast)
            for n, p in experts.named_parameters():
                assert p.dtype == stored[n].dtype and torch.equal(p, stored[n]), (cast, n)
        got = model(x).logits  # the other weights went through fp16 and bf16: close, not equal
    assert (got - want).abs().max() <= 0.05 * want.abs().max()
