"""Interrupts and failures leave a streamed model as it was: Ctrl-C, a dead folder, no descriptors, a failed re-check."""

from __future__ import annotations

import errno
import gc
import linecache
import mmap
import os
import resource
import shutil
import sys
import threading
import types
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn

import pylomin
from pylomin._os import Memory, read_memory
from pylomin.format import manifest as fmt
from pylomin.modeling import params_on_meta
from pylomin.runtime.model import stream_of
from pylomin.runtime.prefetch import Prefetcher
from pylomin.runtime.store import Store
from tests import models
from tests.test_layout import mixtral

PAGE = mmap.PAGESIZE


class CtrlC:
    """Raises `KeyboardInterrupt` from inside a module's forward, once: what Ctrl-C does at that point."""

    def __init__(self, module: nn.Module) -> None:
        self.fired = False
        self.handle = module.register_forward_hook(self)

    def __call__(self, module: nn.Module, args: object, output: object) -> None:
        if not self.fired:
            self.fired = True
            raise KeyboardInterrupt


def held_slots(model: nn.Module) -> list[str]:
    stream = stream_of(model)
    return [s.stored_name for ss in stream.lifecycle.pager.slots.values() for s in ss if s.holders and not s.pinned]


def mapped_bytes(folder: Path) -> int:
    """Bytes of the folder's unit files mapped into this process now (smaps Rss)."""
    return sum(models.kib(m["Rss"]) for m in models.mappings_of(str(folder.resolve())))


def settled(model: nn.Module) -> nn.Module:
    """`model` once its reader has finished what it reads ahead for the next pass (it reads asynchronously)."""
    reader = stream_of(model).reader
    if reader is not None:
        for job in list(reader._pending.values()):
            assert job.done.wait(10)
    return model


@pytest.mark.parametrize("prefetch", [0, 2])
def test_ctrl_c_mid_forward_then_the_next_forward_runs_as_on_a_fresh_model(hf_dir, converted, prefetch: int) -> None:
    folder = converted("llama")
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, prefetch=prefetch, memory_budget=0)
    stream = stream_of(model)
    x = models.ids()
    with torch.no_grad():
        model(x)  # records the order
        settled(model)
        order = None if stream.reader is None else list(stream.reader.order)
        after_a_forward = mapped_bytes(folder)  # with the next pass's first units, read ahead
        ctrl_c = CtrlC(model.model.layers[1].mlp)
        with pytest.raises(KeyboardInterrupt):
            model(x)
        assert held_slots(model)  # torch skipped every post-hook: what the interrupted units held is still held
        assert torch.equal(model(x).logits, ref(x).logits)
    settled(model)
    assert held_slots(model) == []
    assert all(p.is_meta for p in model.parameters())
    assert mapped_bytes(folder) == after_a_forward
    assert stream.lifecycle.passes == 0
    if stream.reader is not None:
        assert stream.reader.passes == 0 and stream.reader.order == order
    ctrl_c.handle.remove()


def test_ctrl_c_during_generate_leaves_generate_exact(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, memory_budget=0)
    x = models.ids(1, 6)
    options = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    calls = [0]

    def on_third_token(module: nn.Module, args: object, output: object) -> None:
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt

    handle = model.transformer.h[2].register_forward_hook(on_third_token)
    with pytest.raises(KeyboardInterrupt):
        model.generate(x, **options)
    handle.remove()
    assert torch.equal(model.generate(x, **options), ref.generate(x, **options))
    assert held_slots(model) == []


def test_ctrl_c_in_a_prompt_leaves_decode_reading_only_the_chosen_experts(disk_dir: Path) -> None:
    # 8 experts, top-2: a 12-token prompt chooses most experts and reads layers whole; one
    # decode token must read its 2 experts per layer again, as on a fresh model.
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    # Guessing off: a token then reads exactly its chosen experts (test_expert_guessing covers guesses).
    model = models.load_unguessed(folder, transformers.MixtralForCausalLM, drop_page_cache=False, memory_budget=0)
    chosen = models.chosen_experts(model)
    token = models.ids(batch=1, seq=1)
    with torch.no_grad():
        ctrl_c = CtrlC(model.model.layers[0])
        with pytest.raises(KeyboardInterrupt):
            model(models.ids(batch=1, seq=12))
        ctrl_c.handle.remove()
        model(token)  # recovers what the interrupted prompt left
        models.evict([folder / u.file for u in fmt.read(folder).units])
        chosen.clear()
        model(token)
    m = fmt.read(folder)
    for layer, experts in chosen.items():
        unit = next(u for u in m.units if f"{layer}.gate_up_proj" in u.tensors)
        pages = models.cached_pages(folder / unit.file)
        info = unit.tensors[f"{layer}.gate_up_proj"]
        stride = info.length // 8
        for e in set(range(8)) - experts:
            first, last = (info.offset + e * stride) // PAGE, (info.offset + (e + 1) * stride - 1) // PAGE
            assert not any(pages[first + 1 : last]), (layer, e)  # an expert nobody chose was read


def test_a_removed_folder_never_hangs_or_fails_the_next_forward(hf_dir, tmp_path: Path) -> None:
    # `pylomin cache rm` or a re-convert while a model is loaded: its files stay open and mapped.
    folder = pylomin.convert(hf_dir("llama"), tmp_path / "out", progress=False)
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, prefetch=2, memory_budget=0)
    x = models.ids()
    with torch.no_grad():
        model(x)
        shutil.rmtree(folder)
        for _ in range(2):
            assert torch.equal(model(x).logits, ref(x).logits)
    assert stream_of(model).reader._thread.is_alive()


def test_no_descriptors_left_never_hangs_or_fails_a_forward(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, prefetch=2, memory_budget=0)
    x = models.ids()
    gc.collect()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)  # open(2) takes the lowest free number
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))  # no descriptor can be opened now
    try:
        with pytest.raises(OSError):
            open(os.devnull)  # noqa: SIM115
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(model(x).logits, ref(x).logits)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def reader_for(tmp_path: Path, **kwargs: object) -> tuple[Store, Prefetcher]:
    torch.save({f"{i}.weight": torch.randn(64, 64) for i in range(4)}, tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    manifest = fmt.read(folder)
    store = Store(folder, manifest)
    ranges = {i: [store.location(f"{i}.weight")] for i in range(4)}
    return store, Prefetcher(store, ranges, list(range(4)), max_units=2, max_bytes=2**30, **kwargs)  # type: ignore[arg-type]


def test_entering_units_after_close_never_waits(tmp_path: Path) -> None:
    store, reader = reader_for(tmp_path)
    reader.close()
    for target in (0, 1, 2, 3, 0):  # nobody reads these any more: each is paged in on demand
        reader.enter(target)
    assert not reader._queue and not reader._pending
    store.close()


def test_close_on_the_reader_thread_returns(tmp_path: Path) -> None:
    # A garbage collection on the reader thread can run a model's finalizer (which closes its reader)
    # anywhere, inside the reader's lock too.
    closed = threading.Event()
    reader: Prefetcher

    def stage(target: int) -> None:
        with reader._lock:
            reader.close()
        closed.set()

    store, reader = reader_for(tmp_path, stage=stage)
    reader.enter(0)  # queues 1 and 2; staging 1 closes the reader from its own thread
    assert closed.wait(10)
    reader._thread.join(10)
    assert not reader._thread.is_alive()
    reader.enter(1)
    reader.enter(2)
    store.close()


def test_a_failed_memory_recheck_leaves_the_pass_counts_whole(hf_dir, converted, tmp_path: Path) -> None:
    folder = converted("gpt2")
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"))
    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel, memory_budget="auto", prefetch=2)
    stream = stream_of(model)
    policy = stream.policy
    assert policy.adaptive and stream.reader is not None

    def vanished() -> Memory:  # the cgroup's files went away between two forwards
        raise OSError(errno.ENOENT, "No such file or directory", "/sys/fs/cgroup/memory.max")

    policy.read = vanished
    policy.checked_at -= 10
    x = models.ids()
    with torch.no_grad(), pytest.raises(OSError, match="memory.max"):
        model(x)
    assert stream.lifecycle.passes == 0 and stream.reader.passes == 0
    policy.read = read_memory
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    assert stream.lifecycle.passes == 0 and stream.reader.passes == 0


def test_releasing_a_tensor_keeps_the_pages_it_shares_with_a_neighbour(tmp_path: Path) -> None:
    # Two tensors in one file, the first ending inside a page the second begins in.
    torch.save({"a.weight": torch.randn(1500), "a.bias": torch.randn(3000)}, tmp_path / "m.pt")
    folder = pylomin.convert(tmp_path / "m.pt", tmp_path / "out", progress=False)
    manifest = fmt.read(folder)
    with Store(folder, manifest, drop_page_cache=False) as store:
        (file, a_at, a_len), (_, b_at, b_len) = store.location("a.weight"), store.location("a.bias")
        first, second = (a_at, a_len), (b_at, b_len)
        if first[0] > second[0]:
            first, second = second, first
        assert first[0] + first[1] <= second[0] and (first[0] + first[1]) // PAGE == second[0] // PAGE
        store.prefetch(fmt.Range(file, 0, manifest.units[0].size))
        shared = (first[0] + first[1]) // PAGE
        assert mapped_bytes(folder) > (shared + 1) * PAGE
        store.release(fmt.Range(file, *second))
        # Pages 0..shared hold the header and the first tensor: they stay mapped; the rest goes.
        assert mapped_bytes(folder) == (shared + 1) * PAGE


def test_building_on_meta_leaves_other_threads_modules_real() -> None:
    inside, built = threading.Event(), threading.Event()
    other: list[nn.Linear] = []

    def elsewhere() -> None:
        inside.wait(10)
        other.append(nn.Linear(4, 4))
        built.set()

    thread = threading.Thread(target=elsewhere)
    thread.start()
    with params_on_meta():
        mine = nn.Linear(4, 4)
        inside.set()
        assert built.wait(10)
    thread.join()
    assert mine.weight.is_meta
    assert not other[0].weight.is_meta and not other[0].bias.is_meta


def interrupt_at_line(n: int, files: set[str]) -> tuple[object, list[int]]:
    """A trace function raising `KeyboardInterrupt` at the `n`-th line run in `files`: Ctrl-C landing there."""
    seen = [0]

    def local(frame: types.FrameType, event: str, arg: object) -> object:
        # Not at a `with` line: its line event also comes after `__enter__` and before `__exit__`,
        # where the interpreter never delivers a signal (a lock would stay held only in this test).
        if event == "line" and not linecache.getline(frame.f_code.co_filename, frame.f_lineno).lstrip().startswith(
            "with "
        ):
            seen[0] += 1
            if seen[0] == n:
                raise KeyboardInterrupt
        return local

    def calls(frame: types.FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename in files else None

    return calls, seen


def test_ctrl_c_at_any_line_of_the_hooks_leaves_other_threads_right_and_nothing_held(hf_dir, converted) -> None:
    # Ctrl-C lands between any two statements of the hooks, not only where a module raises: each line
    # of the hooks and the reader's entry points that one forward runs is interrupted once. Another
    # thread then runs the model while that call's leftovers are still there (only this thread
    # recovers them), and this thread's next forward recovers them.
    from pylomin.runtime import lifecycle, pager, prefetch

    files = {lifecycle.__file__, pager.__file__, prefetch.__file__}
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"))
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, prefetch=2, memory_budget=0)
    stream = stream_of(model)
    x = models.ids(1, 5)
    with torch.no_grad():
        want = ref(x).logits
        tracer, seen = interrupt_at_line(-1, files)
        sys.settrace(tracer)  # type: ignore[arg-type]
        try:
            model(x)
        finally:
            sys.settrace(None)
    lines = seen[0]
    assert 100 < lines < 2000, lines
    for n in range(1, lines + 1):  # every line
        tracer, _ = interrupt_at_line(n, files)
        with torch.no_grad():
            sys.settrace(tracer)  # type: ignore[arg-type]
            try:
                model(x)
            except KeyboardInterrupt:
                pass
            finally:
                sys.settrace(None)
        other: list[object] = []

        def elsewhere(other: list[object] = other) -> None:
            try:
                with torch.no_grad():
                    other.append(model(x).logits)
            except Exception as e:
                other.append(e)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(30)
        assert other, f"line {n}: another thread's forward hangs"
        assert isinstance(other[0], torch.Tensor) and torch.equal(other[0], want), (n, other[0])
        with torch.no_grad():
            assert torch.equal(model(x).logits, want), n
        settled(model)
        assert held_slots(model) == [] and stream.lifecycle.passes == 0, n
        assert all(p.is_meta for p in model.parameters()), n
