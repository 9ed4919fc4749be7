"""The plan as plain data: resident set, read-ahead, kernel hints and byte ranges, without threads or files."""

from __future__ import annotations

from pylomin.runtime.experts import ExpertCache
from pylomin.runtime.policy import Target, make_plan, merge

# A GPT-2-like model: an embedding table tied to the LM head, positions, two blocks.
TARGETS = [
    Target("wte", ("wte.weight",), lookup=True),
    Target("wpe", ("wpe.weight",), lookup=True),
    Target("h.0", ("h.0.w", "h.0.b")),
    Target("h.1", ("h.1.w", "h.1.b")),
    Target("lm_head", ("wte.weight",)),
]
LOCATIONS = {
    "wte.weight": ("u0", 64, 4000),
    "wpe.weight": ("u1", 64, 1000),
    "h.0.w": ("u2", 64, 3000),
    "h.0.b": ("u2", 3064, 100),
    "h.1.w": ("u3", 64, 3000),
    "h.1.b": ("u3", 3064, 100),
}


def test_no_budget_streams_everything() -> None:
    plan = make_plan(TARGETS, LOCATIONS)
    assert plan.resident == frozenset() and plan.resident_bytes == 0
    assert plan.read_ahead == (False, False, True, True, True)  # lookups are never read ahead
    assert plan.streamed == [2, 3, 4]
    assert plan.names == ("wte", "wpe", "h.0", "h.1", "lm_head")
    assert plan.largest_streamed == 4000  # the tied table, read whole by the head


def test_a_units_tensors_are_one_merged_range() -> None:
    plan = make_plan(TARGETS, LOCATIONS)
    assert plan.ranges[2] == (("u2", 64, 3100),)
    assert plan.ranges[4] == (("u0", 64, 4000),)


def test_tied_weights_first_then_the_larger_then_lookups() -> None:
    # 4000 (tied, used twice) fits; then at equal use the larger first (h.0.w, h.1.w do not fit,
    # the biases do); the lookup-only table (wpe) last: it would not fit any more.
    plan = make_plan(TARGETS, LOCATIONS, memory_budget=5150)
    assert plan.resident == {"wte.weight", "h.0.b", "h.1.b"}
    assert plan.resident_bytes == 4200
    assert plan.read_ahead == (False, False, True, True, False)  # the head's only tensor is resident
    roomier = make_plan(TARGETS, LOCATIONS, memory_budget=7300)
    assert roomier.resident == {"wte.weight", "h.0.w", "h.0.b", "h.1.b"}  # wpe (1000) still last


def test_a_budget_larger_than_the_model_keeps_everything_and_reads_nothing_ahead() -> None:
    plan = make_plan(TARGETS, LOCATIONS, memory_budget=10**9)
    assert plan.resident == set(LOCATIONS)
    assert plan.streamed == [] and plan.largest_streamed == 0


def test_only_tables_that_are_only_looked_up_are_random_access() -> None:
    plan = make_plan(TARGETS, LOCATIONS)
    assert plan.random_access == (("u1", 64, 1000),)  # wpe; not wte, which the head reads whole
    untied = make_plan(TARGETS[:4], LOCATIONS)
    assert untied.random_access == (("u1", 64, 1000), ("u0", 64, 4000))


def test_the_window_is_carried_as_given() -> None:
    plan = make_plan(TARGETS, LOCATIONS, prefetch_units=3, prefetch_bytes=12345)
    assert (plan.prefetch_units, plan.prefetch_bytes) == (3, 12345)


def test_merge_joins_touching_ranges_per_file_only() -> None:
    ranges = [("b", 0, 10), ("a", 10, 5), ("a", 0, 10), ("a", 30, 1), ("b", 5, 2)]
    assert merge(ranges) == [("a", 0, 15), ("a", 30, 1), ("b", 0, 10)]


def test_fused_experts_are_read_per_expert_never_ahead() -> None:
    targets = [Target("layer", ("attn.w", "experts.up")), Target("experts", ("experts.down",))]
    locations = {"attn.w": ("u0", 64, 1000), "experts.up": ("u1", 64, 8 * 4096), "experts.down": ("u2", 64, 8 * 2048)}
    plan = make_plan(targets, locations, experts={"experts.up": 8, "experts.down": 8})
    assert plan.ranges == ((("u0", 64, 1000),), ())  # the layer reads its attention only; experts never whole
    assert plan.read_ahead == (True, False)
    assert set(plan.random_access) == {locations["experts.up"], locations["experts.down"]}
    up = plan.experts["experts.up"]
    assert (up.stride, up.count) == (4096, 8)
    assert up.ranges([5, 2, 3, 9]) == [
        ("u1", 64 + 2 * 4096, 2 * 4096),
        ("u1", 64 + 5 * 4096, 4096),
    ]  # 9: no such expert
    assert plan.largest_streamed == 1000


def test_experts_get_what_the_budget_leaves_after_the_dense_tensors() -> None:
    targets = [Target("layer", ("attn.w", "experts.up")), Target("experts", ("experts.down",))]
    locations = {"attn.w": ("u0", 64, 1000), "experts.up": ("u1", 64, 8 * 4096), "experts.down": ("u2", 64, 8 * 2048)}
    fused = {"experts.up": 8, "experts.down": 8}
    plan = make_plan(targets, locations, memory_budget=1000 + 3 * 6144, experts=fused)
    assert plan.resident == {"attn.w"}  # every token uses it; an expert, a few tokens
    assert plan.expert_cache_bytes == 3 * 6144 and set(plan.experts) == set(fused)
    everything = make_plan(targets, locations, memory_budget=1000 + 8 * 6144, experts=fused)
    assert everything.resident == set(locations)  # all fit: resident, nothing to cache
    assert set(everything.experts) == set(fused)
    assert everything.expert_cache_bytes == 0
    assert make_plan(targets, locations, experts=fused).expert_cache_bytes == 0


def test_the_expert_cache_keeps_the_most_used_experts() -> None:
    cache = ExpertCache(capacity=3 * 10, sizes={0: 10, 1: 10})
    assert cache.use(0, [1, 2]) == ([1, 2], [])  # read both, keep both
    assert cache.use(1, [5, 6]) == ([5, 6], [])  # room for one: 5 kept
    assert cache.kept == {(0, 1), (0, 2), (1, 5)}
    assert cache.use(1, [6, 7]) == ([6, 7], [(0, 1)])  # 6 used twice now: it takes a once-used one's place
    assert cache.kept_in(1) == {5, 6} and cache.kept_in(0) == {2}
    assert cache.use(0, [2, 3]) == ([3], [])  # 2 hits; 3 (used once) displaces nobody used once
    assert (cache.hits, cache.lookups) == (1, 8)
    assert cache.hit_rate == 1 / 8
    assert cache.kept_bytes == 30


def test_the_expert_cache_never_drops_an_expert_the_same_call_uses() -> None:
    cache = ExpertCache(capacity=2 * 10, sizes={0: 10})
    cache.use(0, [0, 1])
    cache.use(0, [2])
    cache.use(0, [2])  # 2 used twice, 0 and 1 once: 2 replaces one of them
    assert (0, 2) in cache.kept and len(cache.kept) == 2
    kept_once = next(e for g, e in cache.kept if e != 2)
    misses, dropped = cache.use(0, [kept_once, 3, 3])
    assert (0, kept_once) not in dropped and misses == [3, 3]


def test_an_expert_larger_than_the_cache_is_read_never_kept() -> None:
    cache = ExpertCache(capacity=5, sizes={0: 10})
    assert cache.use(0, [0]) == ([0], []) and cache.use(0, [0]) == ([0], [])
    assert cache.kept == set() and cache.hit_rate == 0.0


def test_ranges_only_padding_apart_merge() -> None:
    # a.bias ends at 200; the next tensor starts at the next multiple of 64, 256: padding between.
    assert merge([("u", 256, 100), ("u", 0, 200)]) == [("u", 0, 356)]
    assert merge([("u", 0, 200), ("u", 320, 64)]) == [("u", 0, 200), ("u", 320, 64)]  # a tensor at 256 lies between
    assert merge([("u", 0, 200), ("v", 256, 8)]) == [("u", 0, 200), ("v", 256, 8)]
