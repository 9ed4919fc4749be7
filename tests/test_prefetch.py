"""The prefetch queue and the memory budget: recorded order, bounded bytes in flight, errors, shutdown."""

from __future__ import annotations

import gc
import os
import threading
from functools import partial
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import pylomin
from pylomin.format import manifest as fmt
from pylomin.runtime.model import stream_of
from pylomin.runtime.options import parse_bytes
from pylomin.tools.memory import PeakRss
from tests import models

MiB = 2**20


class Shuffled(nn.Module):
    """Blocks defined in one order and run in another; `reverse=True` runs them backwards."""

    def __init__(self, dim: int = 64, depth: int = 6) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.run_order = [i for k in (1, 0) for i in range(k, depth, 2)]  # 1, 3, 5, 0, 2, 4

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        for i in reversed(self.run_order) if reverse else self.run_order:
            x = torch.tanh(self.blocks[i](x))
        return x


def prefetcher(model: nn.Module):
    return stream_of(model).reader


def names(model: nn.Module, targets: list[int]) -> list[str]:
    by_module = {m: n for n, m in model.named_modules()}
    return [by_module[stream_of(model).lifecycle.pager.order[t]] for t in targets]


@pytest.fixture
def shuffled(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(0)
    ref = Shuffled().eval()
    torch.save(ref.state_dict(), tmp_path / "s.pt")
    return pylomin.convert(tmp_path / "s.pt", tmp_path / "out", progress=False), ref


def test_order_is_recorded_and_rerecorded(shuffled) -> None:
    folder, ref = shuffled
    model = pylomin.load_streaming(folder, Shuffled)
    assert names(model, prefetcher(model).order) == [f"blocks.{i}" for i in range(6)]  # module order first
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert names(model, prefetcher(model).order) == [f"blocks.{i}" for i in (1, 3, 5, 0, 2, 4)]
        assert torch.equal(model(x, reverse=True), ref(x, reverse=True))
        assert names(model, prefetcher(model).order) == [f"blocks.{i}" for i in (4, 2, 0, 5, 3, 1)]


def test_bytes_and_units_in_flight_are_bounded(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ref = nn.Sequential(*(nn.Linear(256, 256) for _ in range(12))).eval()  # 257 KiB per unit
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    unit = max(u.nbytes for u in fmt.read(folder).units)
    factory = lambda: nn.Sequential(*(nn.Linear(256, 256) for _ in range(12)))  # noqa: E731  (fresh modules per load)
    for units, nbytes, bound in [(3, 10 * MiB, 3 * unit), (8, 2 * unit + 100, 2 * unit), (1, 10 * MiB, unit)]:
        model = pylomin.load_streaming(folder, factory, prefetch=units, prefetch_bytes=nbytes, memory_budget=0)
        seen: list[tuple[int, int]] = []
        reader = prefetcher(model)

        def record(*_: object, reader=reader, seen=seen) -> None:
            seen.append((reader.bytes_in_flight, len(reader._pending)))

        for m in model:  # runs after pylomin's pre-hook, while the unit is materialized
            m.register_forward_pre_hook(record)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(torch.ones(2, 256)), ref(torch.ones(2, 256)))
        assert max(b for b, _ in seen) <= bound, (units, nbytes, seen)
        assert max(n for _, n in seen) <= units
        assert max(b for b, _ in seen) > 0  # it did read ahead
        pylomin.unload_(model)


def test_peak_memory_within_bytes_in_flight_plus_one_unit(medium_bert: Path) -> None:
    folder = medium_bert
    unit = max(u.nbytes for u in fmt.read(folder).units)
    x = torch.randint(0, 1000, (1, 32))
    model = pylomin.load_streaming(folder, transformers.BertModel, prefetch=2, prefetch_bytes=2 * unit)
    with torch.no_grad():
        model(x)
        with PeakRss() as peak:
            model(x)
    # File-backed pages: bytes in flight (2 units) + the running unit, plus page rounding.
    assert peak.file <= 3 * unit + 2 * MiB, peak
    assert peak.total <= 3 * unit + 24 * MiB, peak


def test_reader_error_surfaces_in_the_calling_thread(tmp_path: Path) -> None:
    torch.manual_seed(0)
    torch.save(nn.Sequential(*(nn.Linear(64, 64) for _ in range(6))).state_dict(), tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    before = reader_threads()
    model = pylomin.load_streaming(
        folder, lambda: nn.Sequential(*(nn.Linear(64, 64) for _ in range(6))), prefetch=2, memory_budget=0
    )
    victim = fmt.read(folder).units[4]
    # Damaged after loading: the reader reaches unit 4 (queued when unit 2 starts) before compute does.
    os.truncate(folder / victim.file, 0)
    with pytest.raises(pylomin.PylominError, match=rf"reading unit file `.*{victim.file}` failed"), torch.no_grad():
        model(torch.ones(1, 64))
    assert all(p.device.type == "meta" for p in model.parameters())
    pylomin.unload_(model)
    assert reader_threads() == before


def test_exception_mid_forward_then_correct_forward(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"), dtype=torch.float32)
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, prefetch=3, memory_budget=0)
    with torch.no_grad():
        model(models.ids())
        with pytest.raises(IndexError):
            model(torch.full((1, 3), 10_000))
        assert torch.equal(model(models.ids()).logits, ref(models.ids()).logits)
    assert all(p.device.type == "meta" for p in model.parameters())


def reader_threads() -> int:
    gc.collect()  # models of earlier tests, and their readers, go first
    return sum(t.name == "pylomin-prefetch" for t in threading.enumerate())


def test_shutdown_joins_the_reader(converted) -> None:
    before = reader_threads()
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel)
    assert reader_threads() == before + 1
    with torch.no_grad():
        model(models.ids())
    pylomin.unload_(model)
    assert reader_threads() == before
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel)
    with torch.no_grad():
        model(models.ids())
    del model
    gc.collect()
    assert reader_threads() == before
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, prefetch=0)
    assert prefetcher(model) is None and reader_threads() == before


def test_budget_larger_than_the_model_keeps_everything_resident(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"), dtype=torch.float32)
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, memory_budget="1GiB")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert model.lm_head.weight is model.transformer.wte.weight
    x = models.ids()
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    assert torch.equal(model.generate(x, **kwargs), ref.generate(x, **kwargs))
    assert all(p.device.type == "cpu" for p in model.parameters())
    pylomin.unload_(model)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_partial_budget_pins_tied_weights_first_and_lookup_tables_last(hf_dir, converted) -> None:
    folder = converted("gpt2")
    index = fmt.read(folder).tensor_index()
    wte, wpe = index["transformer.wte.weight"][1].length, index["transformer.wpe.weight"][1].length
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"), dtype=torch.float32)
    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel, memory_budget=wte + wpe)
    resident = {n for n, p in model.named_parameters() if p.device.type == "cpu"}
    # The tied table (read whole by the head, looked up by the embedding) first; the position
    # table, only ever looked up a few rows at a time, after every tensor read whole.
    assert "transformer.wte.weight" in resident and "transformer.wpe.weight" not in resident
    assert len(resident) > 1  # the rest of the budget went to tensors read whole
    assert stream_of(model).policy.plan.resident_bytes <= wte + wpe
    with torch.no_grad():
        assert torch.equal(model(models.ids()).logits, ref(models.ids()).logits)


def test_parse_bytes() -> None:
    assert parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    assert parse_bytes("1.5 KiB") == 1536
    assert parse_bytes(123) == 123
    with pytest.raises(ValueError, match="'lots'"):
        parse_bytes("lots")


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes")).split()[1])


def evict(folder: Path) -> None:
    for unit in fmt.read(folder).units:
        fd = os.open(folder / unit.file, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


class _TiedLM(nn.Module):
    def __init__(self, tied: bool = True):
        super().__init__()
        self.emb = nn.Embedding(4096, 64)
        self.head = nn.Linear(64, 4096, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.parametrize("tied", [True, False])
def test_a_table_tied_to_a_head_keeps_the_kernels_read_ahead(tmp_path: Path, tied: bool) -> None:
    # The head reads the whole table on every forward: page by page, with no read-ahead, that was
    # 3.8x slower on a cold GPT-2-large forward (7.0 s against 1.85 s).
    torch.manual_seed(0)
    ref = _TiedLM(tied).eval()
    torch.save(ref.state_dict(), tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    model = pylomin.load_streaming(folder, partial(_TiedLM, tied), prefetch=0)
    store = stream_of(model).store
    table = folder / store.location("emb.weight")[0]
    assert any("rr" in m["VmFlags"].split() for m in models.mappings_of(str(table))) is not tied
    ids = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), ref(ids))


def test_embedding_lookup_reads_only_the_rows_it_touches(disk_dir: Path) -> None:
    torch.manual_seed(0)
    table = nn.Embedding(32768, 256)  # 32 MiB, 1 KiB per row
    torch.save(table.state_dict(), disk_dir / "e.pt")
    folder = pylomin.convert(disk_dir / "e.pt", disk_dir / "out", progress=False)
    model = pylomin.load_streaming(folder, partial(nn.Embedding, 32768, 256), prefetch=0)
    ids = torch.randint(0, 32768, (1, 64), generator=torch.Generator().manual_seed(0))
    evict(folder)
    before = read_bytes()
    with torch.no_grad():
        assert torch.equal(model(ids), table(ids))
    read = read_bytes() - before
    if read == 0:
        pytest.skip(f"`{folder}` is on a disk file system, but this process counted no bytes read from it")
    # 64 rows on at most 64 pages; without MADV_RANDOM each fault reads up to read_ahead_kb around it.
    assert read <= 64 * 4096 * 4, read
