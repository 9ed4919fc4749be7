"""Copies made ahead of use (a device stager) or kept resident (a budget with a cast): no leaks, no second copy."""

from __future__ import annotations

import gc
import threading
import weakref
from pathlib import Path

import torch
from torch import nn

import pylomin
from pylomin.format import manifest as fmt
from pylomin.modeling import build_on_meta
from pylomin.runtime.model import stream_of
from pylomin.runtime.options import Options
from pylomin.runtime.streaming import attach_
from tests import models

MiB = 2**20


def stack(depth: int = 8, dim: int = 512) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Sequential(nn.Linear(dim, dim), nn.Tanh()) for _ in range(depth))).eval()


def converted_stack(tmp_path: Path) -> tuple[Path, nn.Module]:
    ref = stack()
    torch.save(ref.state_dict(), tmp_path / "s.pt")
    return pylomin.convert(tmp_path / "s.pt", tmp_path / "out", progress=False), ref


class CpuCopy:
    """A stand-in for the CUDA pinned copy: same contract (a copy and its event), on the CPU; counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, src: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, None]:
        self.calls += 1
        return src.to(dtype or src.dtype, copy=True), None


def readers() -> int:
    return sum(t.name == "pylomin-prefetch" for t in threading.enumerate())


def test_a_model_with_a_stager_is_garbage_collected(tmp_path: Path, open_fds) -> None:
    folder, ref = converted_stack(tmp_path)
    gc.collect()
    threads, fds = readers(), open_fds()
    copy = CpuCopy()
    model = build_on_meta(stack, folder, None)
    attach_(model, folder, fmt.read(folder), Options.check(memory_budget=0), copy=copy)
    x = torch.randn(4, 512)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref(x))
    assert copy.calls > 0  # units were staged on the reader thread and taken by the hooks
    assert readers() == threads + 1
    alive = weakref.ref(model)
    del model
    gc.collect()
    # The reader thread must not reference the model (a bound method would): it is collected,
    # its reader stops and its files close.
    assert alive() is None
    assert readers() == threads
    assert open_fds() == fds


def test_unload_drops_copies_staged_but_never_used(tmp_path: Path) -> None:
    folder, ref = converted_stack(tmp_path)
    model = build_on_meta(stack, folder, None)
    attach_(model, folder, fmt.read(folder), Options.check(prefetch=4, memory_budget=0), copy=CpuCopy())
    with torch.no_grad():
        model(torch.randn(1, 512))
    stager = stream_of(model).lifecycle.pager.stager
    assert stager is not None
    pylomin.unload_(model)
    assert stager.pop("0.0.weight") is None and not stager._staged


def unit_file_rss(folder: Path) -> int:
    return sum(models.kib(m["Rss"]) for m in models.mappings_of(str(folder.resolve())))


def test_a_budget_with_a_cast_keeps_one_copy_not_two(tmp_path: Path) -> None:
    folder, ref = converted_stack(tmp_path)
    model_bytes = fmt.read(folder).nbytes  # 8 MiB of fp32
    # Zero-copy (no cast): the resident parameters are the file's pages, mapped.
    plain = pylomin.load_streaming(folder, stack, memory_budget="1GiB")
    assert unit_file_rss(folder) >= model_bytes * 0.9
    pylomin.unload_(plain)
    # A cast: the bf16 copies are the resident set; the file's pages are not kept mapped besides.
    model = pylomin.load_streaming(folder, stack, memory_budget="1GiB", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in model.parameters())
    assert unit_file_rss(folder) < MiB, unit_file_rss(folder)
    x = torch.randn(4, 512)
    with torch.no_grad():
        assert torch.equal(model(x.bfloat16()), ref.to(torch.bfloat16)(x.bfloat16()))
    assert unit_file_rss(folder) < MiB
