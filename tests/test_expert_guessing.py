"""Experts read before the router asks: shared-experts and many-experts layouts read only what a decode token chose (or guessed), and a wrong guess changes no output."""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import pylomin
from pylomin import _os
from pylomin.format import manifest as fmt
from pylomin.runtime.model import stream_of
from tests import models

PAGE = mmap.PAGESIZE
LAYERS = 3


# What both layouts share: small attention, every layer an MoE layer.
_COMMON: dict[str, Any] = dict(
    vocab_size=models.VOCAB,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
    decoder_sparse_step=1,
    mlp_only_layers=[],
)


def qwen2_moe() -> transformers.PreTrainedModel:
    """Qwen2-MoE's layout: 8 routed experts (top-2) beside a shared expert, a dense unit of the layer."""
    cfg = transformers.Qwen2MoeConfig(
        **_COMMON,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=8,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    return transformers.Qwen2MoeForCausalLM(cfg).eval()


def qwen3_moe() -> transformers.PreTrainedModel:
    """Qwen3-MoE's layout: many small experts, 32 of 24 KiB, top-4."""
    cfg = transformers.Qwen3MoeConfig(
        **_COMMON, moe_intermediate_size=32, head_dim=32, num_experts=32, num_experts_per_tok=4
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).eval()


LAYOUTS = {"qwen2_moe": qwen2_moe, "qwen3_moe": qwen3_moe}


def _load(folder: Path, cls: type, *, guessing: bool, **kwargs: Any) -> Any:
    return pylomin.load_streaming(folder, cls, **kwargs) if guessing else models.load_unguessed(folder, cls, **kwargs)


def _cached_experts(folder: Path, layer: str, count: int) -> set[int]:
    """The experts of `layer` any of whose pages (wholly inside the expert, either fused tensor) are cached."""
    unit = next(u for u in fmt.read(folder).units if f"{layer}.gate_up_proj" in u.tensors)
    pages = models.cached_pages(folder / unit.file)
    out = set()
    for tensor in ("gate_up_proj", "down_proj"):
        info = unit.tensors[f"{layer}.{tensor}"]
        stride = info.length // count
        for e in range(count):
            first, last = (info.offset + e * stride) // PAGE, (info.offset + (e + 1) * stride - 1) // PAGE
            if any(pages[first + 1 : last]):
                out.add(e)
    return out


def _qwen3_converted(disk_dir: Path) -> tuple[Path, Any]:
    """The Qwen3-MoE layout saved, converted, and its in-memory reference."""
    qwen3_moe().save_pretrained(disk_dir / "src")
    folder = pylomin.convert(disk_dir / "src", disk_dir / "out", progress=False)
    return folder, models.pretrained(transformers.Qwen3MoeForCausalLM, disk_dir / "src")


@pytest.mark.parametrize("guessing", [False, True], ids=["waits-for-the-router", "guesses-ahead"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_decode_token_reads_only_the_experts_it_chose_or_guessed(layout: str, guessing: bool, disk_dir: Path) -> None:
    model_in_memory = LAYOUTS[layout]()
    cls = type(model_in_memory)
    model_in_memory.save_pretrained(disk_dir / "src")
    folder = pylomin.convert(disk_dir / "src", disk_dir / "out", progress=False)
    count, k = model_in_memory.config.num_experts, model_in_memory.config.num_experts_per_tok
    ref = models.pretrained(cls, disk_dir / "src")
    models.evict([folder / u.file for u in fmt.read(folder).units])
    # Pages stay cached once read (drop_page_cache=False), so the files show every page the token read.
    model = _load(folder, cls, guessing=guessing, drop_page_cache=False, memory_budget=0)
    chosen = models.chosen_experts(model)
    x = models.ids(batch=1, seq=1)
    with torch.no_grad(), pylomin.profile(model) as prof:
        assert torch.equal(model(x).logits, ref(x).logits)
    layers = prof.experts_by_layer()
    assert len(chosen) == len(layers) == LAYERS
    for layer, experts in chosen.items():
        assert len(experts) == k
        read = _cached_experts(folder, layer, count)
        row = layers[layer]
        size = (3 * 64 * model_in_memory.config.moe_intermediate_size) * 4  # gate, up, down slices, fp32
        if not guessing or layer.startswith("model.layers.0."):  # nothing before the first layer to guess from
            assert read == experts and row["guessed"] == 0, (layer, read, experts)
        else:
            guessed, wasted = row["guessed"] // size, row["wasted"] // size
            assert 0 < guessed <= k and read >= experts and len(read - experts) == wasted, (layer, read, experts)
        assert row["read"] == k * size
    if layout == "qwen2_moe":  # the shared expert is a dense tensor of the layer's unit, read with it
        names = {n for u in fmt.read(folder).units for n in u.tensors}
        assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names
        assert all(not n.startswith("model.layers.0.mlp.shared_expert") for n in stream_of(model).policy.plan.experts)


def test_a_guess_that_is_always_wrong_changes_no_output_is_dropped_and_then_no_longer_read(disk_dir: Path) -> None:
    folder, ref = _qwen3_converted(disk_dir)
    model = pylomin.load_streaming(folder, transformers.Qwen3MoeForCausalLM, memory_budget=0, prefetch=0)
    paging = stream_of(model).lifecycle.pager.experts
    assert paging is not None and len(paging.next) == LAYERS - 1
    for router, (group, weight) in list(paging.next.items()):
        paging.next[router] = (group, -weight)  # guesses the experts the router likes least
    chosen = models.chosen_experts(model)
    with torch.no_grad(), pylomin.profile(model) as prof:
        for seed in range(8):
            x = models.ids(batch=1, seq=1, seed=seed)
            assert torch.equal(model(x).logits, ref(x).logits)
    t = prof.totals()
    assert t["expert_guessed_bytes"] > 0 and t["expert_wasted_bytes"] == t["expert_guessed_bytes"]
    for layer in chosen:  # the default drops every page it read: neither chosen nor guessed stay
        assert not _cached_experts(folder, layer, 32), layer
    # Scored wrong every time: the guesses are no longer read (still made and scored, to resume if they improve).
    assert paging.trust < 0.5
    with torch.no_grad(), pylomin.profile(model) as later:
        x = models.ids(batch=1, seq=1, seed=99)
        assert torch.equal(model(x).logits, ref(x).logits)
    assert later.totals()["expert_guessed_bytes"] == 0 and later.totals()["expert_lookups"] == LAYERS * 4


def test_a_prompt_pass_guesses_nothing_it_reads_whole_layers(disk_dir: Path) -> None:
    qwen3_moe().save_pretrained(disk_dir / "src")
    folder = pylomin.convert(disk_dir / "src", disk_dir / "out", progress=False)
    model = pylomin.load_streaming(folder, transformers.Qwen3MoeForCausalLM, memory_budget=0)
    prompt = models.ids(batch=1, seq=16)  # 16 tokens x top-4 >= 2 x 32 experts
    with torch.no_grad():
        model(prompt)  # records the execution order
        with pylomin.profile(model) as prof:
            model(prompt)
    assert prof.totals()["expert_guessed_bytes"] == 0


def test_resident_experts_the_kernel_reclaimed_are_read_again_in_large_reads(disk_dir: Path) -> None:
    # Resident experts are random-access pages: faulted back in after a reclaim they would come 4 KiB at a time.
    folder, ref = _qwen3_converted(disk_dir)
    model = pylomin.load_streaming(folder, transformers.Qwen3MoeForCausalLM, memory_budget="1GiB")
    plan = stream_of(model).policy.plan
    assert all(n in plan.resident for n in plan.experts)  # every expert resident
    x = models.ids(batch=1, seq=1)
    with torch.no_grad(), pylomin.profile(model) as hot:
        assert torch.equal(model(x).logits, ref(x).logits)
    assert hot.totals()["expert_bytes"] == 0  # cached: nothing to read, nothing recorded
    # As the kernel reclaims under pressure: resident pages are mapped, so an fadvise cannot drop them;
    # MADV_PAGEOUT (Linux 5.4) unmaps and frees them, then evicting drops what the cache still holds.
    store = stream_of(model).store
    for unit in fmt.read(folder).units:
        if _os.madvise(store._addrs[unit.file], (folder / unit.file).stat().st_size, 21) != 0:
            pytest.skip("this kernel has no MADV_PAGEOUT")
    models.evict([folder / u.file for u in fmt.read(folder).units])
    with torch.no_grad(), pylomin.profile(model) as again:
        assert torch.equal(model(x).logits, ref(x).logits)
    t = again.totals()
    size = 3 * 64 * 32 * 4  # gate, up and down slices of one expert, fp32
    assert t["expert_lookups"] == LAYERS * 4 and t["expert_hit_rate"] == 1.0
    assert 0 < t["expert_bytes"] <= LAYERS * 4 * size + LAYERS * 2 * 2 * PAGE  # the chosen, a page either side


def test_ctrl_c_between_a_guess_and_the_router_it_guessed_leaves_decoding_exact(disk_dir: Path) -> None:
    # Layer 0's router has queued layer 1's guesses when the interrupt comes: the next tokens are exact
    # and the guesses left behind are never taken for the next token's reads.
    folder, ref = _qwen3_converted(disk_dir)
    model = pylomin.load_streaming(folder, transformers.Qwen3MoeForCausalLM, memory_budget=0)
    paging = stream_of(model).lifecycle.pager.experts
    assert paging is not None
    fired = []

    def ctrl_c(module: Any, args: Any) -> None:
        if not fired and paging.guessed:
            fired.append(dict(paging.guessed))
            raise KeyboardInterrupt

    handle = model.model.layers[1].mlp.gate.register_forward_pre_hook(ctrl_c)
    x = models.ids(batch=1, seq=4)
    options = dict(max_new_tokens=6, do_sample=False)
    try:
        with pytest.raises(KeyboardInterrupt):
            model.generate(x, **options)
    finally:
        handle.remove()
    assert fired  # the interrupt came with a guess pending
    with torch.no_grad(), pylomin.profile(model) as prof:
        assert torch.equal(model.generate(x, **options), ref.generate(x, **options))
    t = prof.totals()
    assert t["expert_wasted_bytes"] <= t["expert_guessed_bytes"]


def test_a_guess_that_cannot_be_computed_costs_the_forward_nothing(disk_dir: Path) -> None:
    folder, ref = _qwen3_converted(disk_dir)
    model = pylomin.load_streaming(folder, transformers.Qwen3MoeForCausalLM, memory_budget=0)
    paging = stream_of(model).lifecycle.pager.experts
    assert paging is not None and len(paging.next) == LAYERS - 1
    first = next(iter(paging.next))
    group, weight = paging.next[first]
    paging.next[first] = (group, weight[:, :-1])  # the next router reads another width than this one's input
    second = list(paging.next)[1]
    paging.next[second] = (
        paging.next[second][0],
        paging.next[second][1].to(torch.bool),
    )  # and a weight the float input cannot multiply
    x = models.ids(batch=1, seq=1)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x).logits, ref(x).logits)
    assert first not in paging.next and second not in paging.next
