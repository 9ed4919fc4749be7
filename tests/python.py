"""Python code run in a fresh interpreter that imports this checkout (`pylomin`, `tests`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def _argv_env(code: str, env: dict[str, str] | None) -> tuple[list[str], dict[str, str]]:
    return [sys.executable, "-c", textwrap.dedent(code)], {**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)}


def run(code: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run `code` to the end; stdout and stderr captured as text. `env` adds to this process's."""
    argv, full = _argv_env(code, env)
    return subprocess.run(argv, capture_output=True, text=True, env=full, **kwargs)


def start(code: str, env: dict[str, str] | None = None, **kwargs: Any) -> subprocess.Popen[str]:
    """Start `code` (text pipes as given in `kwargs`, e.g. `stdout=subprocess.PIPE`) and return at once."""
    argv, full = _argv_env(code, env)
    return subprocess.Popen(argv, text=True, env=full, **kwargs)


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `pylomin ARGS...` (the package's CLI module) in a fresh interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "pylomin.tools.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
    )
