"""Many tokens per read: a streamed model checks a draft's k tokens in one pass, and greedy output stays its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin.format import manifest as fmt
from pylomin.modeling import kv_cache_bytes, pass_bytes
from pylomin.runtime.model import stream_of
from tests import models
from tests.test_layout import mixtral


def _llama(folder: Path) -> Path:
    torch.manual_seed(0)
    models.llama_quantizable().save_pretrained(folder / "hf")
    return pylomin.convert(folder / "hf", folder / "fp32", progress=False)


def _greedy(model: torch.nn.Module, ids: torch.Tensor, **kwargs: object) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, do_sample=False, max_new_tokens=16, pad_token_id=0, **kwargs)  # type: ignore[operator]


def test_the_self_draft_is_the_models_int4_conversion_and_greedy_output_stays_the_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYLOMIN_CACHE", str(tmp_path / "cache"))
    folder = _llama(tmp_path)
    ref = models.pretrained(transformers.LlamaForCausalLM, tmp_path / "hf")
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, memory_budget=0)
    draft = pylomin.self_draft(model)
    held = fmt.read(stream_of(draft).store.folder)
    assert held.quantization is not None and str(held.quantization.scheme) == "int4-g64"
    assert held.quantization.modules and stream_of(draft).store.folder.is_relative_to(tmp_path / "cache")
    assert stream_of(draft).policy.plan.resident_bytes == held.nbytes  # kept whole: it runs every token
    # It proposes 8 tokens at every pass: a streamed verify pass costs about the same for 1 or 8.
    assert draft.generation_config.num_assistant_tokens == 8
    assert draft.generation_config.assistant_confidence_threshold == 0.0
    ids = models.ids(batch=1, seq=8)
    plain = _greedy(model, ids)
    assert torch.equal(plain, _greedy(ref, ids))
    assert torch.equal(_greedy(model, ids, assistant_model=draft), plain)
    # transformers' other candidate generators over the same streamed model: prompt lookup, and early exit
    # (the model's own first layers draft; their units are paged by the same hooks).
    assert torch.equal(_greedy(model, ids, prompt_lookup_num_tokens=3), plain)
    assert torch.equal(_greedy(model, ids, assistant_early_exit=1), plain)
    # Once converted, the draft is found in the cache: a second call converts nothing.
    files = sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file())
    again = pylomin.self_draft(model)
    assert stream_of(again).store.folder == stream_of(draft).store.folder
    assert sorted(p for p in (tmp_path / "cache").rglob("*") if p.is_file()) == files


def test_a_self_draft_needs_a_streamed_model(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not a pylomin model"):
        pylomin.self_draft(models.llama())
    lazy = pylomin.lazy_loading(models.llama())
    with pytest.raises(ValueError, match=r"self_draft needs a model from load_streaming"):
        pylomin.self_draft(lazy)


def _past(model: torch.nn.Module, prefix: torch.Tensor) -> transformers.DynamicCache:
    with torch.no_grad():
        return model(prefix, use_cache=True).past_key_values  # type: ignore[no-any-return, operator]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_verify_pass_of_k_tokens_reads_each_streamed_unit_once(tmp_path: Path, prefetch: int) -> None:
    folder = _llama(tmp_path)
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, memory_budget=0, prefetch=prefetch)
    prefix = models.ids(batch=1, seq=12)
    streamed = {u.name: u.nbytes for u in fmt.read(folder).units}
    for k in (1, 5):
        past = _past(model, prefix)
        with torch.no_grad(), pylomin.profile(model) as prof:
            model(models.ids(batch=1, seq=k, seed=k), cache=past, use_cache=True)
        reads = [(s.unit, s.nbytes) for s in prof.spans if s.kind in ("read", "load") and s.nbytes]
        if prefetch == 0:  # read in the pass itself: exactly each streamed unit, once
            assert sorted(reads) == sorted(streamed.items()), (k, reads)
        else:  # the reader runs ahead across passes (up to 2 units of the next one before this one ends)
            assert set(reads) <= set(streamed.items()), (k, reads)
            assert sum(n for _, n in reads) <= sum(streamed.values()) + 2 * max(streamed.values()), (k, reads)


def test_a_verify_pass_of_k_tokens_reads_the_union_of_their_experts(disk_dir: Path) -> None:
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    ref = models.pretrained(transformers.MixtralForCausalLM, src)
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=0)
    expert = (64 * 128 + 64 * 64) * 4  # one expert of one layer, both fused tensors
    prefix = models.ids(batch=1, seq=4)
    new = models.ids(batch=1, seq=3, seed=3)  # 3 tokens x top-2 < 2 x 8 experts: per expert, not whole layers
    past, ref_past = _past(model, prefix), _past(ref, prefix)
    chosen = models.chosen_experts(model)
    with torch.no_grad(), pylomin.profile(model) as prof:
        out = model(new, cache=past, use_cache=True).logits
        assert torch.equal(out, ref(new, cache=ref_past, use_cache=True).logits)
    union = sum(len(e) for e in chosen.values())
    assert 2 * 2 <= union < 2 * 8  # more than one token's, fewer than every expert
    assert sum(s.nbytes for s in prof.spans if s.kind == "experts") == union * expert
    assert not [s for s in prof.spans if s.kind == "read" and s.unit.endswith("mlp.experts")]


@pytest.mark.parametrize("name", ["llama", "gpt2", "mixtral"])
def test_the_kv_cache_size_the_policy_counts_is_the_one_transformers_allocates(name: str) -> None:
    model = mixtral() if name == "mixtral" else models.HF_MODELS[name]()
    with torch.no_grad():
        cache = model(models.ids(batch=3, seq=7), use_cache=True).past_key_values
    allocated = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
    )
    assert allocated == kv_cache_bytes(model.config, 3, 7) > 0
    assert pass_bytes(model.config, 3, 7) > kv_cache_bytes(model.config, 3, 7)
