"""The trained benchmark models' recipe, minuscule: the stdlib split, then a few seconds of training into a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.harness import trained

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
RECIPE = trained.Recipe(
    minutes=0.05,
    vocab=300,
    seq=32,
    batch=4,
    warmup_steps=2,
    target_config={**TINY, "tie_word_embeddings": False},
    draft_config={**TINY, "tie_word_embeddings": True},
    corpus_bytes=200_000,
    eval_tokens=512,
    agree_prompts=2,
    agree_prompt=8,
    agree_new=8,
)


def test_the_heldout_split_is_disjoint_deterministic_and_about_5_percent() -> None:
    every, train, heldout = trained.corpus_files(), trained.train_files(), trained.heldout_files()
    assert every and not any("site-packages" in p.parts for p in every)
    assert set(train).isdisjoint(heldout) and sorted(train + heldout) == sorted(every)
    assert 0.02 < len(heldout) / len(every) < 0.10
    assert trained.heldout_files() == heldout and trained.corpus_files() == every
    # the rule hangs on the relative path alone: these answers hold on every machine and Python
    paths = ("ast.py", "email/parser.py", "os.py", "json/decoder.py")
    assert [trained.is_heldout(r) for r in paths] == [True, True, False, False]
    assert sum(trained.is_heldout(f"m{i}.py") for i in range(2000)) in range(60, 140)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return trained.build(tmp_path_factory.mktemp("models"), RECIPE)


def test_the_folders_load_with_transformers(built: dict[str, Path]) -> None:
    import torch
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(built["target"])
    eos = tok.convert_tokens_to_ids(trained.EOS)
    assert tok.eos_token == trained.EOS and tok.eos_token_id == eos and len(tok) == RECIPE.vocab
    text = trained.read(trained.heldout_files()[0])[:2000]
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
    for key in ("target", "draft"):
        model = transformers.AutoModelForCausalLM.from_pretrained(built[key])
        assert isinstance(model, transformers.LlamaForCausalLM)
        assert model.config.eos_token_id == model.config.bos_token_id == eos
        assert model.generation_config.eos_token_id == eos
        ids = tok("def f(x):\n    return", return_tensors="pt")["input_ids"]
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, min_new_tokens=4)
        assert out.shape == (1, ids.shape[1] + 4)
        record = json.loads((built[key] / "train.json").read_text())
        assert record["steps"] >= 2 and record["tokens_seen"] == record["steps"] * RECIPE.batch * RECIPE.seq
        assert record["bytes"] == sum(p.stat().st_size for p in built[key].glob("*.safetensors"))
        assert 0 < record["heldout_loss"] < 10 and 0 <= record["agreement"]["teacher_forced"] <= 1
    assert (
        model.config.tie_word_embeddings
        and not transformers.AutoConfig.from_pretrained(built["target"]).tie_word_embeddings
    )
    assert not list(built["target"].parent.glob(".*"))  # no temporary folder left behind


def test_a_complete_folder_is_reused_and_prompts_come_from_heldout_files(built: dict[str, Path]) -> None:
    root = built["target"].parent
    stamp = (built["target"] / "model.safetensors").stat().st_mtime_ns
    assert trained.target(root, RECIPE) == built["target"] and trained.draft(root, RECIPE) == built["draft"]
    assert (built["target"] / "model.safetensors").stat().st_mtime_ns == stamp
    texts = trained.prompts(2, 12, root)
    assert len(texts) == 2 and len(set(texts)) == 2
    starts = {trained.read(p)[:200] for p in trained.heldout_files()}
    assert all(any(s.startswith(t) for s in starts) for t in texts)
