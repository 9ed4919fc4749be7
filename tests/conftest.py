"""Fixtures: tiny models saved in Hugging Face format and converted once per test session."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

import pylomin
from pylomin.memory import release_freed_memory_eagerly
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
    return pylomin.convert(folder / "src", folder / "out", progress=False)


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
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    pytest.skip(f"`{tmp_path}` and /var/tmp are memory file systems: no page cache or disk reads to measure")
