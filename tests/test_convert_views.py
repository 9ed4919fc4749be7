"""Converting `.pt`/`.bin` files whose tensors are views: every layout a pickle can hold comes out equal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pylomin
from pylomin.format.header import SAFETENSORS_DTYPES
from pylomin.tools.memory import PeakRss
from tests.test_convert import read_back

DTYPES = sorted(SAFETENSORS_DTYPES.values(), key=str)


def sample(dtype: torch.dtype, n: int, seed: int = 0) -> torch.Tensor:
    """`n` distinct-looking values of `dtype` (random bytes, so every dtype gets the same treatment)."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, (n * dtype.itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        return raw % 2 == 1
    return raw.view(dtype)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    # torch.equal is undefined for NaN payloads and some float8 dtypes: compare the bytes.
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(flat_bytes(a), flat_bytes(b))


def flat_bytes(x: torch.Tensor) -> torch.Tensor:
    # Stride 1 explicitly: a one-element tensor is contiguous whatever its stride, and keeps it in reshape.
    return x.contiguous().as_strided((x.numel(),), (1,)).view(torch.uint8)


def convert_and_read(state: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    torch.save(state, folder / "m.pt")
    out = pylomin.convert(folder / "m.pt", folder / "out", progress=False, overwrite=True)
    pylomin.verify(out)
    return read_back(out)


def layouts() -> dict[str, torch.Tensor]:
    base = torch.randn(64, 48)
    shared = torch.randn(100)
    return {
        "transposed.weight": torch.randn(48, 64).t(),
        "rows.weight": base[8:24],
        "cols.weight": base[:, 5:17],
        "every_other.weight": base[::2, ::3],
        "expanded.weight": torch.randn(1, 48).expand(32, 48),
        "scalar_expanded.weight": torch.tensor(3.5).expand(4, 5),
        "offset.weight": shared[10:60].view(5, 10),
        "sibling.weight": shared[60:],  # same storage as offset.weight, another range
        "permuted.weight": torch.randn(2, 3, 4, 5).permute(3, 1, 0, 2),
        "scalar.weight": torch.tensor(1.25),
        "empty.weight": torch.empty(0, 7),
        "empty_view.weight": base[:, 3:3],
        "mask.weight": torch.randn(9, 9).t() > 0,
    }


def test_every_layout_comes_out_equal(tmp_path: Path) -> None:
    state = layouts()
    got = convert_and_read(state, tmp_path)
    assert set(got) == set(state)
    for name, want in state.items():
        assert same_bytes(got[name], want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_in_every_layout(dtype: torch.dtype, tmp_path: Path) -> None:
    base = sample(dtype, 30 * 20).view(30, 20)
    state = {
        "plain.weight": base[:10].clone(),
        "transposed.weight": base.t(),
        "cols.weight": base[:, 3:9],
        "expanded.weight": base[0:1].expand(4, 20),
        "scalar.weight": base[3, 4].clone(),
    }
    got = convert_and_read(state, tmp_path)
    for name, want in state.items():
        assert same_bytes(got[name], want), name


@st.composite
def strided_views(draw: st.DrawFn) -> tuple[torch.Tensor, str]:
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool]))
    ndim = draw(st.integers(0, 4))
    shape = draw(st.lists(st.integers(0, 6), min_size=ndim, max_size=ndim))
    stride = draw(st.lists(st.integers(0, 40), min_size=ndim, max_size=ndim))
    offset = draw(st.integers(0, 50))
    extent = sum((n - 1) * s for n, s in zip(shape, stride, strict=True) if n > 0) + 1
    base = sample(dtype, offset + extent, seed=draw(st.integers(0, 2**16)))
    return base.as_strided(shape, stride, offset), f"{dtype} {shape} {stride} +{offset}"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(views=st.lists(strided_views(), min_size=1, max_size=4))
def test_any_strided_view_comes_out_equal(views: list[tuple[torch.Tensor, str]], tmp_path: Path) -> None:
    state = {f"t{i}.weight": v for i, (v, _) in enumerate(views)}
    got = convert_and_read(state, tmp_path)
    for i, (want, desc) in enumerate(views):
        assert same_bytes(got[f"t{i}.weight"], want), desc


def test_a_large_view_is_copied_in_bounded_memory(tmp_path: Path) -> None:
    # 96 MiB transposed: a whole-tensor `.contiguous()` would put all of it in anonymous memory.
    big = torch.randn(4096, 6144).t()
    torch.save({"w.weight": big}, tmp_path / "m.pt")
    with PeakRss() as peak:
        out = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    assert peak.anon < 56 * 2**20, peak
    assert torch.equal(read_back(out)["w.weight"], big)


def test_a_dtype_safetensors_cannot_store_is_named(tmp_path: Path) -> None:
    torch.save({"ok.weight": torch.ones(2), "z.weight": torch.ones(2, dtype=torch.complex128)}, tmp_path / "m.pt")
    with pytest.raises(pylomin.PylominError, match=r"tensor `z.weight` .*complex128.*re-save"):
        pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_sparse_tensor_is_refused_with_the_fix(tmp_path: Path) -> None:
    torch.save({"s.weight": torch.eye(3).to_sparse()}, tmp_path / "m.pt")
    with pytest.raises(pylomin.PylominError, match=r"tensor `s.weight` .*to_dense"):
        pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
