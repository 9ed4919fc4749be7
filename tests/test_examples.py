"""The examples run as users run them, and report identical outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script", ["stream_transformers_generate.py", "stream_custom_module.py"])
def test_example_runs(script: str) -> None:
    res = subprocess.run([sys.executable, str(EXAMPLES / script)], capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "identical: True" in res.stdout, res.stdout


def test_original_api_example_runs_small() -> None:
    cmd = [sys.executable, str(EXAMPLES / "original_api_bert.py"), "--small"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr
    assert "| NO |" not in res.stdout and res.stdout.count("| yes |") == 3, res.stdout
