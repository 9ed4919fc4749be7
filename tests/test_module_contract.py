"""A streamed model is an ordinary module where it can be, and says why not where it cannot."""

from __future__ import annotations

import copy
import pickle
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin.format import manifest as fmt
from pylomin.runtime.model import stream_of
from tests import models, python


@pytest.mark.parametrize("memory_budget", [0, "auto"])
def test_a_forward_after_unload_says_the_model_was_unloaded(converted, memory_budget: object) -> None:
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, memory_budget=memory_budget)
    pylomin.unload_(model)
    with pytest.raises(pylomin.PylominError, match=r"was unloaded by `pylomin.unload_`.*load_streaming"):
        model(models.ids())


def test_moving_where_it_already_is_is_a_no_op_and_elsewhere_says_how(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, memory_budget=0)
    assert model.to("cpu") is model and model.cpu() is model and model.float() is model
    assert model.to(torch.device("cpu"), torch.float32) is model and model.to(dtype=torch.float32) is model
    with pytest.raises(pylomin.PylominError, match=r"runs on `cpu`.*load_streaming\(\.\.\., device='cuda:1'\)"):
        model.to("cuda:1")
    with pytest.raises(pylomin.PylominError, match=r"dtype=torch.float16"):
        model.half()
    with pytest.raises(pylomin.PylominError, match=r"placeholders on meta already.*unload_"):
        model.to("meta")
    with torch.no_grad():
        assert torch.equal(model(models.ids()).logits, ref(models.ids()).logits)


def test_state_dict_holds_the_real_tensors_and_save_pretrained_round_trips(hf_dir, converted, tmp_path: Path) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, memory_budget=0)
    state, want = model.state_dict(), ref.state_dict()
    assert state.keys() == want.keys()
    for key, value in state.items():
        assert not value.is_meta and torch.equal(value, want[key]), key
    # Tied names share one tensor, as they share one parameter.
    assert state["lm_head.weight"] is state["transformer.wte.weight"]
    block = model.transformer.h[1].state_dict()
    assert torch.equal(block["mlp.c_fc.weight"], want["transformer.h.1.mlp.c_fc.weight"])
    model.save_pretrained(tmp_path / "saved")
    again = models.pretrained(transformers.GPT2LMHeadModel, tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(models.ids()).logits, ref(models.ids()).logits)


def test_training_is_refused_with_the_reason(converted) -> None:
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, memory_budget=0)
    out = model(models.ids(), labels=models.ids())
    with pytest.raises(pylomin.PylominError, match="for inference.*torch.no_grad"):
        out.loss.backward()


def test_pickling_says_what_to_save_instead(converted) -> None:
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM)
    assert type(model).__name__ == "LlamaForCausalLM" and isinstance(model, transformers.LlamaForCausalLM)
    for dump in (pickle.dumps, copy.deepcopy, lambda m: torch.save(m, Path("/dev/null"))):
        with pytest.raises(TypeError, match=r"cannot be pickled.*state_dict\(\)"):
            dump(model)


def test_a_quantized_model_is_where_it_is_too(tmp_path: Path) -> None:
    from tests.test_quant import llama

    llama().save_pretrained(tmp_path / "src")
    folder = pylomin.convert(tmp_path / "src", tmp_path / "int8", quantize="int8", progress=False)
    assert fmt.read(folder).quantization.modules  # type: ignore[union-attr]
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, memory_budget=0)
    assert model.float() is model and model.to("cpu", torch.float32) is model  # bf16 scales are not weights


def test_a_class_by_its_import_path_as_the_cli_takes_it(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(converted("gpt2"), "transformers.GPT2LMHeadModel")
    assert type(model).__name__ == "GPT2LMHeadModel"
    with torch.no_grad():
        assert torch.equal(model(models.ids()).logits, ref(models.ids()).logits)
    with pytest.raises(ValueError, match="cannot import `transformers.NoSuchModel`"):
        pylomin.load_streaming(converted("gpt2"), "transformers.NoSuchModel")


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_automodel_on_a_folder_with_a_head_loads_the_base_model(hf_dir, converted, name: str, caplog) -> None:
    # As transformers' AutoModel does: the base model, its names without the head model's prefix.
    folder = converted(name)
    ref = models.pretrained(transformers.AutoModel, hf_dir(name))
    with caplog.at_level("INFO", logger="pylomin.runtime.model"):
        model = pylomin.load_streaming(folder, transformers.AutoModel, memory_budget=0)
    assert type(model).__name__ == type(ref).__name__
    if name == "llama":  # its own lm_head (GPT-2's is the embedding table, stored once)
        assert "does not use 1 tensor(s) of the checkpoint's head: ['lm_head.weight']" in caplog.text
    units = {u.name for u in fmt.read(folder).units}
    prefix = ref.base_model_prefix + "."
    hooked = {n for n, m in model.named_modules() if m in stream_of(model).lifecycle.index}
    assert {prefix + n for n in hooked if n} <= units  # paged by the converted units, not leaf by leaf
    with torch.no_grad():
        for x in (models.ids(), models.ids(1, 3)):
            assert torch.equal(model(x).last_hidden_state, ref(x).last_hidden_state)
    r = python.cli("run", str(folder), "--seq", "8", "--runs", "1")  # AutoModel by default
    assert r.returncode == 0, r.stderr
