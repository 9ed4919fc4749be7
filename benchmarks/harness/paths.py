"""Where the benchmarks keep their models and output, and the environment of every child they start."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
OUT = ROOT / "bench-out"
MIB = 2**20

# glibc would otherwise keep freed activation buffers in per-thread arenas and blur every memory
# figure; PYTHONPATH lets a child run `python -m benchmarks.harness` from any directory.
ENV = {
    **os.environ,
    "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576"),
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def harness_cmd(*args: str) -> list[str]:
    """The command line of a harness child: `python -m benchmarks.harness ARGS`."""
    return [sys.executable, "-m", "benchmarks.harness", *args]
