"""Bad options are refused at the call, before anything is loaded, with what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

import pylomin


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(prefetch=-1), r"prefetch=-1: give a whole number of units, 0 or more"),
        (dict(prefetch=1.5), r"prefetch=1.5: give a whole number"),
        (dict(prefetch=True), r"prefetch=True: give a whole number"),
        (dict(prefetch_bytes=-5), r"prefetch_bytes=-5: a size cannot be negative"),
        (dict(prefetch_bytes="lots"), r"cannot read 'lots' as a size"),
        (dict(memory_budget=-1), r"memory_budget=-1: a size cannot be negative"),
        (dict(memory_budget=[1]), r"memory_budget=\[1\]: give a number of bytes"),
        (dict(dtype=torch.int8), r"dtype=torch.int8: give a floating-point dtype"),
        (dict(dtype="float17"), r"unknown dtype `float17`"),
        (dict(drop_page_cache="no"), r"drop_page_cache='no': give True or False"),
        (dict(device="tpu"), r"device='tpu' is not a device.*'cpu', 'cuda' or 'cuda:N'"),
        (dict(device="meta"), r"device='meta': pylomin streams to 'cpu' or a CUDA device"),
    ],
)
def test_bad_options_are_refused_before_anything_is_read(options: dict, match: str, tmp_path: Path) -> None:
    # The folder does not exist: the option is checked first, so the error is about the option.
    with pytest.raises(ValueError, match=match):
        pylomin.load_streaming(tmp_path / "missing", transformers.BertModel, **options)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_at_the_call(converted) -> None:
    with pytest.raises(ValueError, match=r"device='cuda', but this torch sees no CUDA device.*use device='cpu'"):
        pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, device="cuda")


def test_lazy_loading_checks_its_options_too() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="prefetch=-2"):
        pylomin.lazy_loading(model, prefetch=-2)
    assert model[0].weight.device.type == "cpu"  # untouched


def test_good_options_are_accepted(converted) -> None:
    model = pylomin.load_streaming(
        converted("gpt2"),
        transformers.GPT2LMHeadModel,
        device=torch.device("cpu"),
        dtype="float32",
        prefetch=0,
        prefetch_bytes="1.5 MiB",
        memory_budget=0,
        drop_page_cache=False,
    )
    assert isinstance(model, torch.nn.Module)
    pylomin.unload_(model)
