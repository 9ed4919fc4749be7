"""The memory policy as plain data: the plan (resident set, read-ahead, kernel hints, byte ranges) and how
"auto" follows the memory figure, without threads, files or a model."""

from __future__ import annotations

import gc

from pylomin._os import Memory
from pylomin.format.manifest import Range
from pylomin.runtime.policy import HEADROOM, MemoryPolicy, Target, make_plan, merge

# A GPT-2-like model: an embedding table tied to the LM head, positions, two blocks.
TARGETS = [
    Target("wte", ("wte.weight",), lookup=True),
    Target("wpe", ("wpe.weight",), lookup=True),
    Target("h.0", ("h.0.w", "h.0.b")),
    Target("h.1", ("h.1.w", "h.1.b")),
    Target("lm_head", ("wte.weight",)),
]
LOCATIONS = {
    "wte.weight": Range("u0", 64, 4000),
    "wpe.weight": Range("u1", 64, 1000),
    "h.0.w": Range("u2", 64, 3000),
    "h.0.b": Range("u2", 3064, 100),
    "h.1.w": Range("u3", 64, 3000),
    "h.1.b": Range("u3", 3064, 100),
}
MODEL = 11200  # bytes of the tensors above


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


def test_ranges_only_padding_apart_merge() -> None:
    # a.bias ends at 200; the next tensor starts at the next multiple of 64, 256: padding between.
    assert merge([("u", 256, 100), ("u", 0, 200)]) == [("u", 0, 356)]
    assert merge([("u", 0, 200), ("u", 320, 64)]) == [("u", 0, 200), ("u", 320, 64)]  # a tensor at 256 lies between
    assert merge([("u", 0, 200), ("v", 256, 8)]) == [("u", 0, 200), ("v", 256, 8)]


class Machine:
    """The memory figure and the clock a policy reads, set by the test."""

    def __init__(self, available: int):
        self.available, self.now = available, 0.0
        gc.collect()  # what streamed models other tests left alive keep resident, the policies subtract
        self.others = sum(p.plan.resident_bytes for p in MemoryPolicy._host)

    def read(self) -> Memory:
        return Memory(self.available + self.others, 2**34, "test")

    def policy(self, **kwargs: object) -> MemoryPolicy:
        options: dict[str, object] = dict(
            memory_budget=None, prefetch_units=2, prefetch_bytes=2**20, drop_page_cache=None
        )
        options.update(kwargs)
        return MemoryPolicy(TARGETS, LOCATIONS, read=self.read, clock=lambda: self.now, **options)  # type: ignore[arg-type]


def test_auto_keeps_a_model_that_fits_whole_and_warm() -> None:
    policy = Machine(HEADROOM + MODEL).policy()
    assert policy.adaptive and policy.plan.resident_bytes == MODEL and not policy.drop_page_cache
    assert "is kept resident" in policy.note


def test_auto_follows_the_figure_between_forwards_at_most_once_a_second() -> None:
    machine = Machine(HEADROOM + MODEL)
    policy = machine.policy()
    machine.available = HEADROOM + MODEL // 2
    machine.now = 0.5
    assert policy.recheck() is None  # not a second yet: nothing read
    machine.now = 1.5
    shrunk = policy.recheck()
    assert shrunk is policy.plan and 0 < shrunk.resident_bytes <= MODEL // 2 and policy.drop_page_cache
    machine.now = 3.0
    assert policy.recheck() is None  # the same figure: the same plan
    machine.available = HEADROOM + MODEL // 2 + MODEL // 64  # noise: less than an eighth more
    machine.now = 4.5
    assert policy.recheck() is None
    machine.available = 2**30
    machine.now = 6.0
    grown = policy.recheck()
    assert grown is not None and grown.resident_bytes == MODEL and not policy.drop_page_cache


def test_a_fixed_budget_never_rereads_the_figure() -> None:
    machine = Machine(0)
    policy = machine.policy(memory_budget=4000, drop_page_cache=False)
    assert not policy.adaptive and policy.note == "" and policy.plan.resident == {"wte.weight"}
    machine.now = 100.0
    assert policy.recheck() is None and not policy.drop_page_cache


def test_policies_of_one_process_share_the_memory_figure() -> None:
    # The room for one model and a half: the second sees the first one's resident pages as taken.
    machine = Machine(HEADROOM + MODEL + MODEL // 2)
    others = machine.others
    first = machine.policy()
    second = machine.policy()
    assert first.plan.resident_bytes == MODEL and second.plan.resident_bytes <= MODEL // 2
    copies = machine.policy(copies=True)  # resident copies are anonymous memory: not counted again
    assert copies.resident_elsewhere() == others + first.plan.resident_bytes + second.plan.resident_bytes
    assert first.resident_elsewhere() == others + second.plan.resident_bytes
    second.close()
    assert first.resident_elsewhere() == others


def test_on_a_gpu_the_plan_follows_its_free_memory_and_the_host_keeps_pages_warm() -> None:
    machine = Machine(HEADROOM + 2 * MODEL)
    policy = machine.policy(gpu=Memory(HEADROOM + MODEL // 2, 2**34, "gpu"))
    assert not policy.adaptive and policy.plan.resident_bytes <= MODEL // 2
    assert not policy.drop_page_cache  # the model fits in the host's page cache
    assert policy not in MemoryPolicy._host


def test_plan_at_answers_for_a_figure_without_following_it() -> None:
    machine = Machine(HEADROOM + MODEL)
    policy = machine.policy(memory_budget=0, prefetch_units=0)
    before = policy.plan
    decision, plan = policy.plan_at(Memory(HEADROOM + MODEL // 2, 2**34, "asked"), prefetch_units=2)
    assert policy.plan is before and policy.decision is None  # nothing followed
    assert not decision.fits and decision.memory.source == "asked"
    assert plan == policy.plan_for(decision.memory_budget, decision.prefetch_units)
    assert 0 < plan.resident_bytes <= MODEL // 2 and plan.prefetch_units == decision.prefetch_units
    roomy, whole = policy.plan_at(Memory(HEADROOM + MODEL, 2**34, "asked"))
    assert roomy.fits and whole.resident_bytes == MODEL and whole.streamed == []


def test_a_forward_that_will_allocate_more_is_planned_for_at_once() -> None:
    machine = Machine(HEADROOM + MODEL)
    policy = machine.policy()
    assert policy.plan.resident_bytes == MODEL
    machine.now = 0.1  # not a second since the last re-check, but this forward will allocate half the model
    shrunk = policy.recheck(reserve=HEADROOM + MODEL // 2)
    assert shrunk is not None and 0 < shrunk.resident_bytes <= MODEL // 2
    machine.now = 0.2
    assert policy.recheck(reserve=HEADROOM + MODEL // 2) is None  # the same reserve: nothing new
    assert policy.recheck(reserve=0) is None  # less: followed at the next re-check, not at once
    machine.now = 1.5
    grown = policy.recheck(reserve=0)
    assert grown is not None and grown.resident_bytes == MODEL
    # A reserve within the headroom changes nothing: the headroom is there for it.
    machine.now = 1.6
    assert policy.recheck(reserve=HEADROOM // 2) is None


def test_a_forward_that_cannot_fit_is_warned_about(caplog) -> None:
    import logging

    machine = Machine(HEADROOM + MODEL)
    policy = machine.policy()
    with caplog.at_level(logging.WARNING, logger="pylomin"):
        plan = policy.recheck(reserve=2 * (HEADROOM + MODEL))
    assert plan is not None and plan.resident_bytes == 0
    [record] = caplog.records
    assert "it may be killed for memory; use a smaller batch or a shorter context" in record.getMessage()


def test_a_policy_that_steps_aside_lets_another_come_first_then_gives_back() -> None:
    machine = Machine(HEADROOM + MODEL + MODEL // 2)
    target = machine.policy()
    assert target.plan.resident_bytes == MODEL
    with target.step_aside():
        draft = machine.policy()  # decides as if the target held nothing
    assert draft.plan.resident_bytes == MODEL
    assert target in MemoryPolicy._host
    shrunk = target.recheck()  # at once, without waiting a second
    assert shrunk is not None and shrunk.resident_bytes <= MODEL // 2
