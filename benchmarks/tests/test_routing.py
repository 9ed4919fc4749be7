"""The routing benchmark's parts on a minuscule mixture-of-experts trained for a few seconds into a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import routing
from benchmarks.harness import trained

TINY_MOE = dict(
    trained.MOE_CONFIG,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=16,
)
RECIPE = trained.Recipe(
    moe_minutes=0.03,
    vocab=300,
    seq=32,
    batch=4,
    warmup_steps=2,
    moe_config=TINY_MOE,
    corpus_bytes=200_000,
    eval_tokens=512,
)


@pytest.fixture(scope="module")
def moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained.moe(tmp_path_factory.mktemp("models"), RECIPE)


def test_the_moe_folder_loads_with_transformers_and_says_how_it_was_trained(moe: Path) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(moe)
    assert isinstance(model, transformers.Qwen3MoeForCausalLM)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert not model.config.output_router_logits and model.config.router_aux_loss_coef == 0.01
    record = json.loads((moe / "train.json").read_text())
    assert record["architecture"] == "Qwen3MoeForCausalLM" and record["role"] == "moe"
    assert record["steps"] >= 2 and 0 < record["heldout_loss"] < 10
    assert trained.moe(moe.parent, RECIPE) == moe and not list(moe.parent.glob(".*"))


def test_traces_guesses_and_cache_policies(moe: Path) -> None:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(moe).eval()
    sequences = trained.heldout_ids(2, 12, moe.parent)
    assert [len(s) for s in sequences] == [12, 12]
    trace, ranks = routing.record(model, sequences)
    assert len(trace) == 24 and all(len(t) == 3 and all(len(c) == 2 for c in t) for t in trace)
    assert ranks["post"].shape == (24, 3, 4)
    assert all(len(set(r)) == 4 for r in ranks["post"].flatten(0, 1).tolist())  # distinct experts, best first
    assert all(0 <= r <= 1 for r in routing.recall(trace, ranks["post"], 2))
    wide, narrow = routing.recall(trace, ranks["post"], 4), routing.recall(trace, ranks["post"], 2)
    assert all(w >= n for w, n in zip(wide, narrow, strict=True))
    rates = routing.hit_rates(trace, expert_bytes=100, experts=3 * 8)
    for share in ("10%", "25%", "50%"):
        assert all(rates["Belady (oracle)"][share] >= r[share] for r in rates.values())
    assert rates["LRU"]["10%"] <= rates["LRU"]["50%"]
