"""memory_budget="auto": the decision at a few figures, and a model that follows the memory it may use."""

from __future__ import annotations

import functools
import gc
import itertools
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin._os import Memory, read_memory
from pylomin.format import manifest as fmt
from pylomin.modeling import pass_bytes
from pylomin.runtime.model import stream_of
from pylomin.runtime.policy import HEADROOM, decide
from tests import models

MiB, GiB = 2**20, 2**30
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _collect_earlier_models() -> None:
    """Streamed models of earlier tests count against this one's memory until they are collected."""
    gc.collect()


def memory(available: int) -> Memory:
    return Memory(available, 16 * GiB, "test")


def const(nbytes: int):  # every unit as large: the largest streamed one never shrinks
    return lambda budget: nbytes


def test_keeping_more_resident_can_shrink_the_window() -> None:
    # A 200 MiB head and 20 MiB layers: once the head is resident, the window is three layers.
    d = decide(
        memory(HEADROOM + 500 * MiB),
        GiB,
        lambda budget: 20 * MiB if budget >= 200 * MiB else 200 * MiB,
        headroom=HEADROOM,
        prefetch_units=2,
        prefetch_bytes=256 * MiB,
    )
    assert (d.prefetch_units, d.memory_budget) == (2, 500 * MiB - 3 * 20 * MiB)


def test_a_model_that_fits_is_kept_whole_and_warm() -> None:
    d = decide(memory(4 * GiB), GiB, const(100 * MiB), headroom=HEADROOM, prefetch_units=2, prefetch_bytes=256 * MiB)
    assert (d.memory_budget, d.drop_page_cache, d.fits) == (GiB, False, True)
    assert "is kept resident" in d.describe()
    # The user's word on the page cache wins.
    forced = decide(
        memory(4 * GiB),
        GiB,
        const(100 * MiB),
        headroom=HEADROOM,
        prefetch_units=2,
        prefetch_bytes=256 * MiB,
        drop_page_cache=True,
    )
    assert forced.drop_page_cache is True and forced.fits


def test_half_the_model_keeps_what_fits_beside_the_window_and_drops_streamed_pages() -> None:
    model, unit = GiB, 50 * MiB
    d = decide(
        memory(HEADROOM + model // 2), model, const(unit), headroom=HEADROOM, prefetch_units=2, prefetch_bytes=256 * MiB
    )
    assert not d.fits and d.drop_page_cache
    assert d.prefetch_units == 2
    assert d.memory_budget == model // 2 - 3 * unit  # the running unit and two read ahead
    assert "GiB streamed" in d.describe()


def test_a_window_that_would_not_fit_shrinks() -> None:
    # Room for two units: the running one and one read ahead; none resident.
    d = decide(
        memory(HEADROOM + 100 * MiB),
        GiB,
        const(50 * MiB),
        headroom=HEADROOM,
        prefetch_units=2,
        prefetch_bytes=256 * MiB,
    )
    assert (d.prefetch_units, d.memory_budget) == (1, 0)
    tight = decide(
        memory(HEADROOM + 60 * MiB), GiB, const(50 * MiB), headroom=HEADROOM, prefetch_units=2, prefetch_bytes=256 * MiB
    )
    assert (tight.prefetch_units, tight.memory_budget) == (0, 10 * MiB)
    # prefetch_bytes bounds the window too.
    small = decide(
        memory(HEADROOM + 600 * MiB),
        GiB,
        const(50 * MiB),
        headroom=HEADROOM,
        prefetch_units=4,
        prefetch_bytes=120 * MiB,
    )
    assert small.prefetch_units == 2
    nothing = decide(memory(0), GiB, const(50 * MiB), headroom=HEADROOM, prefetch_units=2, prefetch_bytes=256 * MiB)
    assert (nothing.prefetch_units, nothing.memory_budget) == (0, 0)


def test_auto_on_a_roomy_machine_keeps_the_model_resident(hf_dir, converted) -> None:
    folder = converted("gpt2")
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)  # defaults: "auto"
    stream = stream_of(model)
    m = fmt.read(folder)
    assert stream.policy.plan.resident_bytes == m.nbytes and not stream.store.drop_page_cache
    assert "is kept resident" in stream.policy.note
    x = models.ids()
    with torch.no_grad(), pylomin.profile(model) as prof:
        assert torch.equal(model(x).logits, ref(x).logits)
    assert prof.totals()["read_bytes"] == 0  # nothing streams
    assert all(p.device.type == "cpu" for p in model.parameters())  # never paged out
    assert "is kept resident" in prof.verdict()


def fake_machine(root: Path, available: int) -> Path:
    (root / "proc").mkdir(parents=True, exist_ok=True)
    (root / "proc" / "meminfo").write_text(f"MemTotal: {16 * GiB // 1024} kB\nMemAvailable: {available // 1024} kB\n")
    return root


def test_the_resident_part_follows_the_memory_available(hf_dir, converted, tmp_path: Path) -> None:
    folder = converted("gpt2")
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)
    stream = stream_of(model)
    policy = stream.policy
    assert policy.adaptive
    now = [policy.checked_at]
    policy.clock = lambda: now[0]
    policy.read = lambda: read_memory(tmp_path)  # the reader itself, on a machine we control
    total = fmt.read(folder).nbytes
    x = models.ids()
    with torch.no_grad():
        want = ref(x).logits

        def forward_after(seconds: float) -> torch.Tensor:
            now[0] += seconds
            return model(x).logits

        # Shrinks to 40 % of the model: units are given back, the tied table (used twice) stays.
        fake_machine(tmp_path, policy.headroom + int(0.4 * total))
        assert torch.equal(forward_after(0.5), want)  # not a second yet: nothing re-read
        assert stream.policy.plan.resident_bytes == total
        assert torch.equal(forward_after(1.0), want)
        shrunk = stream.policy.plan
        assert 0 < shrunk.resident_bytes <= 0.4 * total and stream.store.drop_page_cache
        assert "transformer.wte.weight" in shrunk.resident
        streamed = [n for n in fmt.read(folder).tensor_index() if n not in shrunk.resident]
        assert streamed and all(p.device.type == "meta" for n, p in model.named_parameters() if n in streamed)
        assert torch.equal(forward_after(1.0), want)  # streams the rest, same answer
        # Memory comes back: the model is whole again.
        fake_machine(tmp_path, 8 * GiB)
        assert torch.equal(forward_after(1.0), want)
        assert stream.policy.plan.resident_bytes == total and not stream.store.drop_page_cache
        assert all(p.device.type == "cpu" for p in model.parameters())
        assert torch.equal(forward_after(1.0), want)


def test_units_are_given_back_before_a_forward_that_will_allocate_them(hf_dir, converted, tmp_path: Path) -> None:
    folder = converted("llama")
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM)
    policy = stream_of(model).policy
    total = fmt.read(folder).nbytes
    assert policy.plan.resident_bytes == total
    now = [policy.checked_at]
    policy.clock = lambda: now[0]
    policy.headroom = 0  # the tiny model's forwards allocate far less than the real headroom
    big, small = models.ids(batch=16, seq=48), models.ids(batch=1, seq=1)
    reserve = pass_bytes(model.config, 16, 48)
    assert reserve > total  # the model is tiny; its batch is not
    # Room for the whole model beside a small forward, for half of it beside the big one.
    policy.read = lambda: read_memory(fake_machine(tmp_path, reserve + total // 2))
    with torch.no_grad():
        # Within the second, but the forward will allocate what the model holds: planned for before it runs.
        assert torch.equal(model(big).logits, ref(big).logits)
        assert 0 < policy.plan.resident_bytes <= total // 2 + total // 32
        now[0] += 2.0  # a small forward a while later: the model is whole again
        assert torch.equal(model(small).logits, ref(small).logits)
        assert policy.plan.resident_bytes == total


def test_every_decision_is_logged_with_its_figures(hf_dir, converted, tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="pylomin"):
        model = pylomin.load_streaming(converted("bert"), transformers.BertModel)
    assert any("available of" in r.getMessage() and "kept resident" in r.getMessage() for r in caplog.records)
    policy = stream_of(model).policy
    assert policy.adaptive
    policy.read = lambda: read_memory(fake_machine(tmp_path, policy.headroom))  # nothing to spare
    policy.clock = lambda: 1e9
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pylomin"), torch.no_grad():
        model(models.ids())
    assert any("streamed" in r.getMessage() and "was" in r.getMessage() for r in caplog.records)


def test_explicit_budgets_stay_fixed(converted) -> None:
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, memory_budget=0)
    stream = stream_of(model)
    assert not stream.policy.adaptive and stream.policy.plan.resident_bytes == 0 and stream.store.drop_page_cache
    warm = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, memory_budget="1MiB")
    assert not stream_of(warm).policy.adaptive


CHILD = """
import json, sys, torch, transformers, pylomin
from pylomin.runtime.model import stream_of
folder, out = sys.argv[1], sys.argv[2]
model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM)
stream = stream_of(model)
x = torch.arange(64).reshape(1, 64) % 1000
with torch.no_grad():
    logits = model(x).logits
    logits = model(x).logits
torch.save(logits, out + ".pt")
json.dump({"resident": stream.policy.plan.resident_bytes, "note": stream.policy.note}, open(out, "w"))
"""


@pytest.mark.slow
def test_a_cgroup_limited_process_keeps_half_and_streams_the_rest(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks.harness import cgroup  # the benchmarks' cgroup runner: page cache dropped first

    why = cgroup.unavailable()
    if why is not None:
        pytest.skip(why)
    # A 330 MiB Llama; the child is allowed its own baseline (measured) + the headroom + half the model.
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=16, num_attention_heads=8
    )
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path / "src")
    folder = pylomin.convert(tmp_path / "src", tmp_path / "out", progress=False)
    nbytes = fmt.read(folder).nbytes
    with torch.no_grad():
        want = ref(torch.arange(64).reshape(1, 64) % 1000).logits
    del ref
    gc.collect()
    baseline = cgroup.run_capped(
        [sys.executable, "-c", "import torch, transformers, pylomin, transformers.models.llama"], 4 * GiB, 300
    )
    assert baseline.ok, baseline.reason
    out = tmp_path / "child.json"
    # The decision keeps a fixed headroom free: half the model is what is left beside it (with the
    # headroom counted in, a busy machine's baseline peak decides whether anything fits).
    limit = baseline.max_usage + HEADROOM + nbytes // 2
    run = cgroup.run_capped([sys.executable, "-c", CHILD, str(folder), str(out)], limit, 300)
    assert run.ok, run.reason  # no OOM kill
    got = json.loads(out.read_text())
    assert 0 < got["resident"] < nbytes, got  # part kept, part streamed
    assert "streamed" in got["note"], got
    assert torch.equal(torch.load(f"{out}.pt"), want)


class _TableAndLayers(torch.nn.Module):
    """A 12 MiB embedding table (looked up, never read whole) before four 256 KiB layers."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(196608, 16)
        self.up = torch.nn.Linear(16, 256, bias=False)
        self.layers = torch.nn.Sequential(*(torch.nn.Linear(256, 256, bias=False) for _ in range(4)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.layers(self.up(self.table(ids)))


def test_a_lookup_table_never_sizes_the_read_ahead_window(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = _TableAndLayers().eval()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False, unit="leaf")
    model = pylomin.load_streaming(folder, _TableAndLayers)
    policy = stream_of(model).policy
    assert policy.adaptive
    # Room for the running layer and two ahead (3 x 256 KiB), nowhere near the 12 MiB table.
    policy.read = lambda: read_memory(fake_machine(tmp_path / "machine", policy.headroom + MiB))
    policy.clock = lambda: 1e9
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))
    plan = stream_of(model).policy.plan
    assert plan.prefetch_units == 2  # sized by a 256 KiB layer, not the table (which would leave none)
    assert "table.weight" not in plan.resident  # looked up a few rows at a time: last in line


def test_two_models_in_one_process_share_the_memory_instead_of_both_taking_it(converted, tmp_path: Path) -> None:
    # Each model's resident pages are page cache, which the memory figure counts as reclaimable:
    # without accounting, each would see the other's pages as free and keep everything.
    folder = converted("gpt2")
    total = fmt.read(folder).nbytes
    first = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)
    second = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)
    for model in (first, second):
        policy = stream_of(model).policy
        assert policy.adaptive
        # Room for one and a half models beside the headroom: the figure includes both models' pages.
        fake_machine(tmp_path, policy.headroom + int(1.5 * total))
        policy.read = functools.partial(read_memory, tmp_path)
        policy.clock = itertools.count(policy.checked_at + 2, 2).__next__  # two seconds a forward
    x = models.ids()
    with torch.no_grad():
        want = first(x).logits  # re-checks: the other keeps it all, so this one keeps half
        assert torch.equal(second(x).logits, want)  # re-checks: the first keeps half now
    a, b = stream_of(first).policy.plan.resident_bytes, stream_of(second).policy.plan.resident_bytes
    assert a < total and a + b <= 1.5 * total, (a, b, total)
    pylomin.unload_(second)  # gone: its pages no longer count against the first
    with torch.no_grad():
        assert torch.equal(first(x).logits, want)
    assert stream_of(first).policy.plan.resident_bytes == total
