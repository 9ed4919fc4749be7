"""Reliability: fuzzed input, a killed or starved converter, many threads and forwards, shared pages."""

from __future__ import annotations

import gc
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import pylomin
from pylomin.format import manifest as fmt
from pylomin.tools.memory import rss
from tests import models, python

MiB = 2**20
DOCUMENTED = (pylomin.PylominError, FileNotFoundError, ValueError)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def valid_manifest(folder: Path) -> dict:
    torch.save({"a.weight": torch.ones(3, 2), "b.0.weight": torch.zeros(4)}, folder / "m.pt")
    pylomin.convert(folder / "m.pt", folder / "out", progress=False)
    return json.loads((folder / "out" / fmt.MANIFEST_NAME).read_text())


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_manifests_raise_only_documented_errors(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    folder = tmp_path_factory.mktemp("fuzz")
    doc = valid_manifest(folder)
    # Replace one field somewhere in a valid manifest with arbitrary JSON, or the whole file with bytes.
    choice = data.draw(st.sampled_from(["field", "unit-field", "tensor-field", "bytes"]))
    target = folder / "out" / fmt.MANIFEST_NAME
    if choice == "bytes":
        target.write_bytes(data.draw(st.binary(max_size=200)))
    else:
        node = doc if choice == "field" else doc["units"][0]
        if choice == "tensor-field":
            node = next(iter(doc["units"][0]["tensors"].values()))
        node[data.draw(st.sampled_from(sorted(node)))] = data.draw(json_values)
        target.write_text(json.dumps(doc))
    try:
        fmt.read(folder / "out")
        pylomin.load_streaming(folder / "out", lambda: torch.nn.Module())  # binds nothing: keys mismatch
    except DOCUMENTED:
        return


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    blob=st.binary(max_size=300),
    header=st.one_of(st.none(), json_values),
    suffix=st.sampled_from([".safetensors", ".bin"]),
)
def test_fuzzed_sources_raise_only_documented_errors(
    tmp_path_factory: pytest.TempPathFactory, blob: bytes, header: object, suffix: str
) -> None:
    folder = tmp_path_factory.mktemp("src")
    src = folder / f"m{suffix}"
    if header is not None and suffix == ".safetensors":
        raw = json.dumps(header).encode()
        blob = len(raw).to_bytes(8, "little") + raw + blob
    src.write_bytes(blob)
    try:
        pylomin.convert(src, folder / "out", progress=False)
    except DOCUMENTED:
        assert not (folder / "out").exists()


def big_checkpoint(folder: Path, units: int = 48) -> Path:
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"layers.{i}.weight": torch.randn(512, 1024, generator=g) for i in range(units)}, folder / "m.safetensors"
    )
    return folder / "m.safetensors"  # 2 MiB a unit


@pytest.mark.slow
def test_converter_killed_at_random_points_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    src = big_checkpoint(tmp_path)
    out = tmp_path / "out"
    code = f"""
        import sys, time
        import pylomin.converter.convert, transformers  # imported before the clock starts: kills land in the work
        from pylomin.tools.cli import main
        print("START", flush=True)
        t0 = time.perf_counter()
        main(["convert", {str(src)!r}, {str(out)!r}, "--quiet", "--overwrite"])
        print(time.perf_counter() - t0, flush=True)
    """

    def start() -> subprocess.Popen[str]:
        proc = python.start(code, stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "START"
        return proc

    proc = start()
    duration = float(proc.communicate()[0])
    rng = random.Random(0)
    seen = {"absent": 0, "complete": 0, "leftovers": 0}
    for fresh in (True, True, True, True, False, False, False, False):
        if fresh and out.exists():
            shutil.rmtree(out)
        existed = out.exists()
        proc = start()
        time.sleep(rng.uniform(0, duration * 1.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            pylomin.verify(out)  # a folder that exists is complete: the old one or the new one
            seen["complete"] += 1
        else:
            assert not existed, "an existing complete folder was lost"  # the swap is atomic
            seen["absent"] += 1
        seen["leftovers"] += any(".pylomin-tmp-" in p.name for p in tmp_path.iterdir())
    assert seen["leftovers"] > 0, seen  # some kills landed mid-conversion
    start().communicate()  # the next run removes what killed runs left
    assert [p.name for p in tmp_path.iterdir() if ".pylomin-tmp-" in p.name] == []
    pylomin.verify(out)


def test_disk_full_is_a_clear_error_and_leaves_nothing(tmp_path: Path) -> None:
    src = big_checkpoint(tmp_path, units=2)
    code = f"""
        import resource, signal, sys
        from pylomin.tools.cli import main
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, 2**20))  # per file: each unit is 2 MiB
        sys.exit(main(["convert", {str(src)!r}, {str(tmp_path / "out")!r}, "--quiet"]))
    """
    res = python.run(code)
    assert res.returncode == 2, res.stderr
    assert (
        res.stderr.startswith("pylomin: error: ") and "Is the disk full" in res.stderr and "Traceback" not in res.stderr
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.slow
def test_four_threads_by_25_forwards(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.GPT2LMHeadModel, hf_dir("gpt2"), dtype=torch.float32)
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel, prefetch=3)
    inputs = [models.ids(1 + s % 3, 5 + s, seed=s) for s in range(5)]
    with torch.no_grad():
        want = [ref(x).logits for x in inputs]
    bad: list[tuple[int, int]] = []

    def work(k: int) -> None:
        with torch.no_grad():
            for i in range(25):
                j = (i * 7 + k) % len(inputs)
                if not torch.equal(model(inputs[j]).logits, want[j]):
                    bad.append((k, i))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert bad == []


def resources() -> tuple[int, int, int, int]:
    gc.collect()  # models earlier tests dropped: their readers and files go now, not mid-count
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return rss().total, len(os.listdir("/proc/self/fd")), maps, threading.active_count()


@pytest.mark.slow
@pytest.mark.parametrize("prefetch", [0, 2])
def test_a_failed_call_in_one_thread_never_releases_another_threads_parameters(prefetch: int) -> None:
    # Thread B is inside block 0 (its weights paged in) when thread A calls the same block and a hook
    # that runs before pylomin's raises. The post-hook still runs for A (torch calls it on errors);
    # it must give back only what A took: nothing.
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    model = torch.nn.Sequential(block, torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        want = model(x)
    pylomin.lazy_loading(model, target_modules=["0", "1"], prefetch=prefetch)
    inside, go = threading.Event(), threading.Event()
    b_thread: list[threading.Thread] = []

    def pause_b(module, args):
        if threading.current_thread() is b_thread[0]:
            inside.set()
            assert go.wait(30)

    def fail_a(module, args):
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("a hook before pylomin's failed")

    block[1].register_forward_pre_hook(pause_b)
    block.register_forward_pre_hook(fail_a, prepend=True)
    got: list[torch.Tensor | BaseException] = []

    def run_b() -> None:
        try:
            with torch.no_grad():
                got.append(model(x))
        except BaseException as e:  # noqa: BLE001  (reported below)
            got.append(e)

    b_thread.append(threading.Thread(target=run_b))
    b_thread[0].start()
    assert inside.wait(30)
    with pytest.raises(RuntimeError, match="a hook before pylomin's failed"), torch.no_grad():
        block(x)
    go.set()
    b_thread[0].join(30)
    assert len(got) == 1 and isinstance(got[0], torch.Tensor), got
    assert torch.equal(got[0], want)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_500_forwards_do_not_grow_anything(converted) -> None:
    x = models.ids(2, 16)
    folder, cls = converted("llama"), transformers.LlamaForCausalLM  # converted and imported before counting
    pylomin.unload_(pylomin.load_streaming(folder, cls))
    start = resources()
    model = pylomin.load_streaming(folder, cls)
    with torch.no_grad():
        for _ in range(20):
            model(x)
        warm = resources()
        for _ in range(480):
            model(x)
    end = resources()
    assert end[0] - warm[0] < 8 * MiB, (warm, end)  # resident set
    assert (end[1], end[3]) == (warm[1], warm[3]), (warm, end)  # fds and threads: exactly the same
    assert end[2] - warm[2] <= 8, (warm, end)  # mappings: the allocator may add a few, a leak adds 480
    pylomin.unload_(model)
    after = resources()
    assert (after[1], after[3]) == (start[1], start[3]) and after[2] - start[2] <= 8, (start, after)


def test_two_processes_share_the_page_cache(converted) -> None:
    folder = converted("llama")
    nbytes = fmt.read(folder).nbytes
    code = f"""
        import sys, torch, transformers, pylomin
        from tests import models, python
        # Everything resident and mapped for the process lifetime, page cache kept.
        model = pylomin.load_streaming({str(folder)!r}, transformers.LlamaForCausalLM, memory_budget="1GiB", drop_page_cache=False)
        with torch.no_grad():
            model(models.ids())
        print("READY", flush=True)
        sys.stdin.readline()
        units = models.mappings_of({str(folder / fmt.UNITS_DIR)!r})
        print("SHARED_CLEAN", sum(models.kib(m["Shared_Clean"]) for m in units), flush=True)
        sys.stdin.readline()  # stay mapped until the other process has measured too
    """
    procs = [python.start(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(2)]
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "READY"
    for p in procs:  # both measure while both are alive
        assert p.stdin is not None
        p.stdin.write("\n")
        p.stdin.flush()
    shared = [int(p.stdout.readline().split("SHARED_CLEAN")[1]) for p in procs if p.stdout is not None]
    for p in procs:
        p.communicate("\n", timeout=120)
    # Both map the same unit-file pages: shared, not copied.
    assert min(shared) >= nbytes, (shared, nbytes)
