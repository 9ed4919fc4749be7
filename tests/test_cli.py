"""The `pylomin` command line as a Unix tool: run in a fresh interpreter, its output piped."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pylomin
from tests import python


def test_info_into_a_reader_that_closes_early_ends_quietly(tmp_path: Path) -> None:
    # `pylomin info OUT | head -1`: 600 units of long names print ~140 KiB, more than the pipe and
    # stdout's buffer hold, so the CLI is still writing when the reader closes and must meet the closed pipe.
    names = [f"{'block' * 40}{i}" for i in range(600)]
    save_file({f"{n}.weight": torch.zeros(1) for n in names}, tmp_path / "many.safetensors")
    out = pylomin.convert(tmp_path / "many.safetensors", tmp_path / "out", unit="leaf", progress=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pylomin.tools.cli", "info", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(python.ROOT)},
    )
    assert proc.stdout is not None and proc.stderr is not None
    pipe_size = fcntl.fcntl(proc.stdout.fileno(), fcntl.F_GETPIPE_SZ)
    assert proc.stdout.readline().startswith(b"unit ")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 141, err  # what a shell reports for git or seq killed by SIGPIPE
    assert err == ""
    full = len(python.cli("info", str(out)).stdout)
    assert full > pipe_size + 8192, f"{full} bytes of output fit in the pipe ({pipe_size}) and stdout's buffer"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["info", "{tmp}/nope"], "`{tmp}/nope` is not a converted pylomin folder"),
        (["verify", "{tmp}/nope"], "`{tmp}/nope` is not a converted pylomin folder"),
        (["run", "{tmp}/nope"], "`{tmp}/nope` does not exist"),
        (["convert", "{tmp}/nope", "{tmp}/out"], "`{tmp}/nope` does not exist"),
        (["cache", "rm", "org/none", "--cache-dir", "{tmp}"], "`org/none` is not in the pylomin cache"),
    ],
    ids=["info", "verify", "run", "convert", "cache rm"],
)
def test_each_command_reports_a_user_error_in_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    # Each command imports the converter or the runtime when it runs (see tests/test_layers.py): still
    # inside the CLI's error handling, so a missing path is one line and exit status 2, not a traceback.
    r = python.cli(*[a.format(tmp=tmp_path) for a in args])
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pylomin: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert says.format(tmp=tmp_path) in r.stderr
