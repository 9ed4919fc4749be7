"""Mixture-of-experts models are paged per expert: a forward reads the experts the router chose, never the others."""

from __future__ import annotations

import gc
import mmap
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin.format import manifest as fmt
from pylomin.runtime.expert_cache import ExpertCache
from pylomin.runtime.model import stream_of
from tests import models
from tests.test_layout import mixtral

PAGE = mmap.PAGESIZE


def test_a_forward_reads_only_the_chosen_experts(disk_dir: Path) -> None:
    # 8 experts of 32 KiB (gate_up) + 16 KiB (down): every expert a whole number of pages.
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    ref = models.pretrained(transformers.MixtralForCausalLM, src)
    models.evict([folder / u.file for u in fmt.read(folder).units])
    # Guessing off: the pages read are then exactly the chosen experts' (test_expert_guessing covers guessing).
    model = models.load_unguessed(folder, transformers.MixtralForCausalLM, drop_page_cache=False, memory_budget=0)
    chosen = models.chosen_experts(model)
    x = models.ids(batch=1, seq=1)  # one token: top-2 of 8 experts per layer
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    m = fmt.read(folder)
    for layer, experts in chosen.items():
        assert len(experts) == 2, experts
        unit = next(u for u in m.units if f"{layer}.gate_up_proj" in u.tensors)
        assert unit.name == layer  # fused experts have a file of their own: no read-around from neighbours
        pages = models.cached_pages(folder / unit.file)
        for tensor in ("gate_up_proj", "down_proj"):
            info = unit.tensors[f"{layer}.{tensor}"]
            stride = info.length // 8
            for e in range(8):
                first, last = (info.offset + e * stride) // PAGE, (info.offset + (e + 1) * stride - 1) // PAGE
                inner = pages[first + 1 : last]  # pages wholly inside expert e
                if e in experts:
                    assert all(inner), (layer, tensor, e)
                else:
                    assert not any(inner), (layer, tensor, e, sum(inner))


def _expert_pages(folder: Path, layer: str, e: int, experts: int = 8) -> list[bool]:
    """The cached state of the pages wholly inside expert `e` of `layer`, both fused tensors."""
    unit = next(u for u in fmt.read(folder).units if f"{layer}.gate_up_proj" in u.tensors)
    pages = models.cached_pages(folder / unit.file)
    out: list[bool] = []
    for tensor in ("gate_up_proj", "down_proj"):
        info = unit.tensors[f"{layer}.{tensor}"]
        stride = info.length // experts
        first, last = (info.offset + e * stride) // PAGE, (info.offset + (e + 1) * stride - 1) // PAGE
        out += pages[first + 1 : last]
    return out


def test_a_budget_keeps_the_most_used_experts_resident_and_drops_the_others(disk_dir: Path) -> None:
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    ref = models.pretrained(transformers.MixtralForCausalLM, src)
    m = fmt.read(folder)
    fused = [
        i for u in m.units for n, i in u.tensors.items() if n.endswith(("experts.gate_up_proj", "experts.down_proj"))
    ]
    dense = sum(i.length for u in m.units for i in u.tensors.values()) - sum(i.length for i in fused)
    expert_bytes = (64 * 128 + 64 * 64) * 4  # gate_up [2I, H] + down [H, I] slices, fp32
    # Room for the dense tensors and 2 experts per layer: exactly what a one-token forward uses.
    # No reader thread: pages are dropped as each unit finishes, not later, so the checks see them gone.
    budget = dense + 2 * 2 * expert_bytes
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=budget, prefetch=0)
    assert stream_of(model).policy.plan.expert_cache_bytes == 2 * 2 * expert_bytes
    chosen = models.chosen_experts(model)
    x = models.ids(batch=1, seq=1)
    with torch.no_grad():
        want = ref(x).logits
        with pylomin.profile(model) as cold:
            assert torch.equal(model(x).logits, want)
        for layer, kept in chosen.items():
            assert len(kept) == 2
            for e in range(8):
                pages = _expert_pages(folder, layer, e)
                assert all(pages) if e in kept else not any(pages), (layer, e)  # the default drops the others
        with pylomin.profile(model) as warm:
            assert torch.equal(model(x).logits, want)
    assert cold.totals()["expert_hit_rate"] == 0.0 and cold.totals()["expert_bytes"] == 2 * 2 * expert_bytes
    t = warm.totals()
    assert (t["expert_lookups"], t["expert_hits"], t["expert_bytes"]) == (4, 4, 0)  # all kept: nothing read
    assert "100% kept resident" in warm.verdict()
    del model  # unloading gives the kept experts' pages back too
    gc.collect()
    for layer in chosen:
        for e in range(8):
            assert not any(_expert_pages(folder, layer, e)), (layer, e)


def test_without_a_budget_nothing_is_kept_and_every_forward_reads_its_experts(disk_dir: Path) -> None:
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=0)
    x = models.ids(batch=1, seq=1)
    with torch.no_grad(), pylomin.profile(model) as prof:
        model(x)
        model(x)
    t = prof.totals()
    assert (t["expert_lookups"], t["expert_hits"]) == (8, 0)
    assert t["expert_bytes"] == 8 * (64 * 128 + 64 * 64) * 4


def test_a_random_access_range_larger_than_the_read_ahead_window_is_read_in_large_reads(disk_dir: Path) -> None:
    # The kernel reads only the first read-ahead window (read_ahead_kb) of one POSIX_FADV_WILLNEED;
    # the rest of a random-access range would be faulted in from disk a page at a time.
    import resource

    from safetensors.torch import save_file

    save_file({"table.weight": torch.randn(2**20, 16)}, disk_dir / "big.safetensors")  # 64 MiB
    folder = pylomin.convert(disk_dir / "big.safetensors", disk_dir / "out", progress=False)
    m = fmt.read(folder)
    with pylomin.runtime.store.Store(folder, m) as store:
        where = store.location("table.weight")
        store.random_access(where)
        models.evict([folder / u.file for u in m.units])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        store.read_exactly([where])
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - before
        assert all(models.cached_pages(folder / m.units[0].file)[where[1] // PAGE + 1 : (where[1] + where[2]) // PAGE])
    assert faults < 1000, faults  # page by page, it would be ~16000 (64 MiB / 4 KiB); other threads fault too


def test_a_prompt_reads_experts_ahead_whole_and_a_decode_token_reads_only_the_chosen(disk_dir: Path) -> None:
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    ref = models.pretrained(transformers.MixtralForCausalLM, src)
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=0)
    whole = 8 * (64 * 128 + 64 * 64) * 4  # both fused tensors of one layer
    prompt, token = models.ids(batch=1, seq=16), models.ids(batch=1, seq=1)  # 16 tokens x top-2 >= 2 x 8 experts
    with torch.no_grad():
        model(prompt)  # records the execution order
        with pylomin.profile(model) as wide:
            assert torch.equal(model(prompt).logits, ref(prompt).logits)
        with pylomin.profile(model) as narrow:
            assert torch.equal(model(token).logits, ref(token).logits)
    ahead = [s for s in wide.spans if s.kind == "read" and s.unit.endswith("mlp.experts")]
    assert ahead and all(s.nbytes == whole for s in ahead)  # read ahead by the reader, overlapped
    assert all(s.nbytes == 0 for s in wide.spans if s.kind == "experts")  # resident when the router chose
    assert not [s for s in narrow.spans if s.kind == "read" and s.unit.endswith("mlp.experts")]
    assert sum(s.nbytes for s in narrow.spans if s.kind == "experts") == 2 * 2 * whole // 8  # top-2, 2 layers


# --- the expert cache, a pure policy ---------------------------------------------------------------


def test_without_a_half_life_the_expert_cache_keeps_the_most_used_experts() -> None:
    cache = ExpertCache(capacity=3 * 10, sizes={0: 10, 1: 10}, half_life=None)
    assert cache.use(0, [1, 2]) == ([1, 2], [])  # read both, keep both
    assert cache.use(1, [5, 6]) == ([5, 6], [])  # room for one: 5 kept
    assert cache.kept == {(0, 1), (0, 2), (1, 5)}
    assert cache.use(1, [6, 7]) == ([6, 7], [(0, 1)])  # 6 used twice now: it takes a once-used one's place
    assert cache.kept_in(1) == {5, 6} and cache.kept_in(0) == {2}
    assert cache.use(0, [2, 3]) == ([3], [])  # 2 hits; 3 (used once) displaces nobody used once
    assert (cache.hits, cache.lookups) == (1, 8)
    assert cache.hit_rate == 1 / 8
    assert cache.kept_bytes == 30


@pytest.mark.parametrize("half_life", [None, 32.0])
def test_the_expert_cache_never_drops_an_expert_the_same_call_uses(half_life: float | None) -> None:
    cache = ExpertCache(capacity=2 * 10, sizes={0: 10}, half_life=half_life)
    cache.use(0, [0, 1])
    cache.use(0, [2])
    cache.use(0, [2])  # 2 used twice, 0 and 1 once: 2 replaces one of them
    assert (0, 2) in cache.kept and len(cache.kept) == 2
    kept_once = next(e for g, e in cache.kept if e != 2)
    misses, dropped = cache.use(0, [kept_once, 3, 3])
    assert (0, kept_once) not in dropped and misses == [3, 3]


def test_with_a_half_life_recent_uses_outweigh_old_ones() -> None:
    lfu = ExpertCache(capacity=10, sizes={0: 10, 1: 10}, half_life=None)
    decayed = ExpertCache(capacity=10, sizes={0: 10, 1: 10}, half_life=2)
    for cache in (lfu, decayed):
        for _ in range(3):  # three passes: expert 0 of group 0 used in each
            cache.use(0, [0])
            cache.use(1, [])
        for i in range(6):  # then six passes, expert 1 used in the first and the fourth
            cache.use(0, [1] if i % 3 == 0 else [])
            cache.use(1, [])
    assert lfu.kept == {(0, 0)}  # 3 uses against 2
    assert decayed.kept == {(0, 1)}  # at 1's second use: 0's uses 4-6 passes old weigh 0.55, 1's (0 and 3) 1.35
    ties = ExpertCache(capacity=10, sizes={0: 10}, half_life=2)
    ties.use(0, [0])
    assert ties.use(0, [1]) == ([1], [(0, 0)])  # a newer single use outweighs an older one
    with pytest.raises(ValueError, match="`half_life` must be a positive number"):
        ExpertCache(capacity=10, sizes={0: 10}, half_life=0)


def test_an_expert_larger_than_the_cache_is_read_never_kept() -> None:
    cache = ExpertCache(capacity=5, sizes={0: 10})
    assert cache.use(0, [0]) == ([0], []) and cache.use(0, [0]) == ([0], [])
    assert cache.kept == set() and cache.hit_rate == 0.0


def test_a_smaller_expert_cache_drops_the_least_valuable_first() -> None:
    lfu = ExpertCache(capacity=3 * 10, sizes={0: 10}, half_life=None)
    decayed = ExpertCache(capacity=3 * 10, sizes={0: 10}, half_life=2)
    for cache in (lfu, decayed):
        for chosen in ([0, 1, 2], [0], [0], [0], [1], [], [], [], [2], [2]):
            cache.use(0, chosen)
    assert lfu.resize(10) == [(0, 1), (0, 2)] and lfu.kept == {(0, 0)}  # uses: 0 four times, 2 thrice, 1 twice
    # decayed to pass 10: 0's four uses (passes 1-4) weigh 0.32, 1's (1, 5) 0.22, 2's (1, 9, 10) 1.75
    assert decayed.resize(10) == [(0, 1), (0, 0)] and decayed.kept == {(0, 2)}
    assert decayed.kept_bytes == 10 and decayed.resize(30) == []
