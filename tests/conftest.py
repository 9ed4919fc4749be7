"""Fixtures: tiny models saved in Hugging Face format and converted once per test session."""

from __future__ import annotations

import gc
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import pylomin
from pylomin.format import manifest as fmt
from pylomin.format.header import is_padding
from pylomin.tools.memory import release_freed_memory_eagerly
from tests import models

# The memory bounds are measured as `make test` runs them: glibc serves allocations of 1 MiB or more
# with mmap, so freed activation buffers leave the process (see the Makefile). A bare `pytest` gets
# the same: the variable for the fresh interpreters the tests start, mallopt for this one, unless the
# variable was already set and this process started with it.
if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "1048576"
    release_freed_memory_eagerly(1048576)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


def misaligned_tensors(root: Path) -> list[str]:
    """Tensors of the unit files of every converted folder under `root` whose data is not 64-byte aligned in its file.

    Reads each header as any safetensors reader does (8-byte little-endian length, JSON, data after
    it), not through pylomin; a header a test damaged on purpose is skipped.
    """
    bad = []
    for manifest in root.rglob(fmt.MANIFEST_NAME):
        for path in sorted((manifest.parent / fmt.UNITS_DIR).glob("*.safetensors")):
            with open(path, "rb") as f:
                prefix = f.read(8)
                (n,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (-1,)
                try:
                    header = json.loads(f.read(n)) if 0 <= n < 2**24 else None
                except (ValueError, UnicodeDecodeError):
                    header = None
            for name, t in header.items() if isinstance(header, dict) else ():
                offsets = t.get("data_offsets") if isinstance(t, dict) else None
                begin = offsets[0] if isinstance(offsets, list) and offsets else None
                if name != "__metadata__" and not is_padding(name) and type(begin) is int and (8 + n + begin) % 64:
                    bad.append(f"`{path}`: `{name}` at byte {8 + n + begin}")
    return bad


@pytest.fixture(scope="session", autouse=True)
def _session_unit_files_are_aligned(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end, the same for every folder the session wrote (fixtures' and hypothesis' folders included)."""
    yield
    bad = misaligned_tensors(tmp_path_factory.getbasetemp())
    assert not bad, "tensors not 64-byte aligned in their unit files:\n" + "\n".join(bad[:20])


@pytest.fixture(autouse=True)
def _unit_files_are_aligned(request: pytest.FixtureRequest) -> Iterator[None]:
    """After each test, every tensor of every folder it converted into its `tmp_path` starts 64-byte aligned."""
    root = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if root is not None and root.is_dir():
        bad = misaligned_tensors(root)
        assert not bad, "tensors not 64-byte aligned in their unit files:\n" + "\n".join(bad[:20])


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> a Hugging Face folder (model.safetensors + config) of that tiny model, saved once."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(f"hf-{name}")
            models.HF_MODELS[name]().save_pretrained(folder)
            cache[name] = folder
        return cache[name]

    return make


@pytest.fixture(scope="session")
def converted(hf_dir: Callable[[str], Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """(name, **convert options) -> the converted folder, converted once per set of options."""
    cache: dict[tuple[str, tuple[tuple[str, object], ...]], Path] = {}

    def make(name: str, **options: object) -> Path:
        key = (name, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp(f"pl-{name}") / "out"
            cache[key] = pylomin.convert(hf_dir(name), out, progress=False, **options)  # type: ignore[arg-type]
            assert not misaligned_tensors(out), misaligned_tensors(out)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def medium_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 16-layer BERT of ~130 MiB (12 MiB per block), converted with block units: for memory bounds."""
    import transformers

    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=1000, hidden_size=512, num_hidden_layers=16, num_attention_heads=8, intermediate_size=2048
    )
    folder = tmp_path_factory.mktemp("medium-bert")
    transformers.BertModel(cfg).save_pretrained(folder / "src")
    out = pylomin.convert(folder / "src", folder / "out", progress=False)
    assert not misaligned_tensors(out), misaligned_tensors(out)
    return out


@pytest.fixture
def open_fds() -> Callable[[], int]:
    def count() -> int:
        gc.collect()  # files that garbage of earlier tests still holds close now, not between two counts
        return len(os.listdir("/proc/self/fd"))

    return count


def _on_memory_fs(path: Path) -> bool:
    """Whether `path` lies on tmpfs or ramfs: its pages are never read from a disk and cannot be dropped."""
    best, kind = "", ""
    with open("/proc/self/mounts") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, kind = mount, fstype
    return kind in ("tmpfs", "ramfs")


@pytest.fixture
def disk_dir(tmp_path: Path) -> Iterator[Path]:
    """A temporary folder on a disk file system, for checks of the page cache and of bytes read from disk.

    `tmp_path` where it is on one; else a folder in /var/tmp (on the root file system of a usual
    machine even where /tmp is tmpfs); else the test is skipped, with the reason in the summary.
    """
    if not _on_memory_fs(tmp_path.resolve()):
        yield tmp_path
        return
    if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) and not _on_memory_fs(Path("/var/tmp").resolve()):
        folder = Path(tempfile.mkdtemp(prefix="pylomin-test-", dir="/var/tmp"))
        try:
            yield folder
            bad = misaligned_tensors(folder)
            assert not bad, "tensors not 64-byte aligned in their unit files:\n" + "\n".join(bad[:20])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    pytest.skip(f"`{tmp_path}` and /var/tmp are memory file systems: no page cache or disk reads to measure")
