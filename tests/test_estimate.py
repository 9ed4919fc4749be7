"""The speed estimate: what the memory policy keeps at a figure, what a decode token reads, and the seconds that follow."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin._os import Memory
from pylomin.format import manifest as fmt
from pylomin.modeling import kv_cache_bytes, pass_bytes
from pylomin.runtime.model import is_streamed, stream_of
from pylomin.runtime.policy import HEADROOM, MemoryPolicy, Plan
from pylomin.tools.plan import Estimate, estimate
from tests import models
from tests.test_layout import mixtral

LLAMA = transformers.LlamaForCausalLM
GIVEN = dict(disk_bytes_per_s=1e9, compute_s=0.01)  # no measurement: the figures are exact


def reserve(model: torch.nn.Module, batch: int = 1, context: int = 2048) -> int:
    """What the estimate sets aside before asking the policy: the KV cache, and a decode step's allocations beyond
    the headroom (none for these tiny models)."""
    step = pass_bytes(model.config, batch, 1, context - 1, logits=1)
    return kv_cache_bytes(model.config, batch, context) + max(0, step - HEADROOM)


def streamed_bytes(policy: MemoryPolicy, plan: Plan) -> int:
    """Bytes the units the plan reads ahead read each token: their tensors not kept resident, experts aside."""
    return sum(
        policy.locations[n].length
        for i in plan.streamed
        for n in set(policy.targets[i].tensors) - plan.resident
        if n not in plan.experts
    )


def test_with_room_for_the_model_everything_stays_and_a_token_costs_its_compute(
    converted: Callable[..., Path],
) -> None:
    e = estimate(converted("llama"), LLAMA, memory="1GiB", **GIVEN)
    assert e.memory == 2**30 and e.fits and e.reason == ""
    assert e.resident_bytes == e.model_bytes == fmt.read(converted("llama")).nbytes
    assert e.read_per_token == 0 and e.seconds_per_token == 0.01 and e.tokens_per_s == pytest.approx(100.0)
    assert e.kv_bytes == kv_cache_bytes(transformers.AutoConfig.from_pretrained(converted("llama")), 1, 2048)


def test_at_half_the_model_a_token_reads_what_the_policy_streams(converted: Callable[..., Path]) -> None:
    folder = converted("llama")
    model = pylomin.load_streaming(folder, LLAMA, memory_budget=0, prefetch=0)
    policy = stream_of(model).policy
    memory = HEADROOM + reserve(model) + policy.model_bytes // 2
    # Loaded here by the estimate: the policy's answer for the default window (2 units).
    decision, plan = policy.plan_at(Memory(memory - reserve(model), memory, "given"), prefetch_units=2)
    e = estimate(folder, LLAMA, memory=memory, **GIVEN)
    assert 0 < e.resident_bytes == plan.resident_bytes < e.model_bytes
    assert e.read_per_token == streamed_bytes(policy, plan) > 0
    assert e.seconds_per_token == pytest.approx(0.01 + e.read_per_token / 1e9)
    # A model loaded with that budget keeps exactly that resident.
    fixed = pylomin.load_streaming(folder, LLAMA, memory_budget=decision.memory_budget)
    assert stream_of(fixed).policy.plan.resident_bytes == e.resident_bytes
    # The model given is asked with its own window (none here), and is still streamed afterwards.
    _, own = policy.plan_at(Memory(memory - reserve(model), memory, "given"))
    mine = estimate(folder, LLAMA, memory=memory, model=model, **GIVEN)
    assert mine.read_per_token == streamed_bytes(policy, own) and is_streamed(model)
    with torch.no_grad():
        assert torch.equal(model(models.ids()).logits, fixed(models.ids()).logits)


def test_moe_reads_the_routed_share_of_the_experts_less_the_cache(tmp_path: Path) -> None:
    src = tmp_path / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, tmp_path / "out", progress=False)
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, memory_budget=0, prefetch=0)
    policy = stream_of(model).policy
    expert = (64 * 128 + 64 * 64) * 4  # one expert of one layer: its gate_up [2I, H] and down [H, I] slices, fp32
    layers = 2

    def ask(room: int, batch: int = 1) -> tuple[Estimate, Plan]:
        memory = HEADROOM + reserve(model, batch) + room
        e = estimate(folder, memory=memory, batch=batch, model=model, **GIVEN)
        return e, policy.plan_at(Memory(memory - reserve(model, batch), memory, "given"))[1]

    # Only the running unit's room: nothing resident, no expert cache; top-2 of 8 per layer.
    e, plan = ask(policy.largest_streamed(0))
    assert plan.resident_bytes == 0 and plan.expert_cache_bytes == 0 and len(plan.experts) == 2 * layers
    assert e.read_per_token == streamed_bytes(policy, plan) + layers * 2 * expert
    # Two sequences choose 8 * (1 - (6/8)^2) = 3.5 distinct experts per layer, on average.
    e2, _ = ask(policy.largest_streamed(0), batch=2)
    assert e2.read_per_token == streamed_bytes(policy, plan) + layers * round(3.5 * expert)
    # The dense tensors resident and room for 4 of the 16 experts: a quarter of the chosen ones are kept.
    dense = sum(policy.locations[n].length for n in policy.locations if n not in plan.experts)
    e, plan = ask(dense + 4 * expert)
    assert plan.expert_cache_bytes == 4 * expert and streamed_bytes(policy, plan) == 0
    assert e.read_per_token == layers * round(2 * expert * (1 - 4 / 16))
    # Every expert fits: nothing is read.
    e, plan = ask(policy.model_bytes)
    assert e.read_per_token == 0 and e.resident_bytes == e.model_bytes


def test_a_kv_cache_that_cannot_fit_is_refused_with_its_figures(converted: Callable[..., Path]) -> None:
    folder = converted("llama")
    e = estimate(folder, LLAMA, memory="512MiB", batch=1024, context=4096, **GIVEN)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert e.kv_bytes == kv_cache_bytes(config, 1024, 4096) > 2**30 and not e.fits
    assert "KV cache for batch 1024 x 4096 tokens" in e.reason and f"({e.kv_bytes / 2**30:.2f} GiB)" in e.reason
    assert "the memory is 0.50 GiB" in e.reason and "smaller batch or context" in e.reason
    assert "does not fit" in e.describe()
    assert estimate(folder, LLAMA, memory="512MiB", batch=1, context=4096, **GIVEN).fits


def test_given_figures_make_it_deterministic(converted: Callable[..., Path]) -> None:
    folder = converted("llama")
    first = estimate(folder, "transformers.LlamaForCausalLM", memory=HEADROOM + 4096, **GIVEN)
    assert first == estimate(folder, LLAMA, memory=HEADROOM + 4096, **GIVEN)
    assert first.disk_bytes_per_s == 1e9 and first.compute_s == 0.01
    assert first.seconds_per_token == 0.01 + first.read_per_token / 1e9
    text = first.describe()
    assert f"{first.tokens_per_s:.2f} tok/s" in text and "1.00 GB/s" in text and "resident" in text


def test_the_measured_figures_are_positive_and_leave_no_page_cached(disk_dir: Path) -> None:
    src = disk_dir / "src"
    torch.manual_seed(0)
    models.llama().save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    e = estimate(folder, LLAMA)
    for figure in (e.memory, e.disk_bytes_per_s, e.compute_s, e.seconds_per_token, e.tokens_per_s):
        assert figure > 0 and math.isfinite(figure), e
    assert any("a cold read of" in n for n in e.notes) and any("one-row product" in n for n in e.notes)
    assert any(n.startswith("memory: ") and "given" not in n for n in e.notes)  # read as "auto" reads it
    for unit in fmt.read(folder).units:  # the read dropped its pages again; the model it loaded was unloaded
        assert not any(models.cached_pages(folder / unit.file)), unit.file


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch=0), "batch=0"),
        (dict(context=-1), "context=-1"),
        (dict(memory=-5), "cannot be negative"),
        (dict(memory="lots"), "cannot read 'lots' as a size"),
        (dict(compute_s=0.0), "compute_s=0.0"),
        (dict(disk_bytes_per_s=math.nan), "disk_bytes_per_s=nan"),
    ],
)
def test_bad_arguments_are_refused(converted: Callable[..., Path], kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        estimate(converted("llama"), LLAMA, **kwargs)  # type: ignore[arg-type]
