"""scripts/gpu_check.sh --dry-run: every phase of the GPU check that needs no GPU runs, so the script does not rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["bench.json", "bench.log", "bench.txt", "gpu_check.log", "pytest.log", "pytest.xml", "summary.txt"]


def test_gpu_check_dry_run_passes_every_phase_and_writes_its_files(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
        cwd=tmp_path,  # the script finds the repository itself
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    # Flat, at most 8 files, each well under 16 MiB: what the GPU machine sends back.
    assert sorted(p.name for p in out.iterdir()) == FILES
    assert all(p.is_file() and p.stat().st_size < 2**20 for p in out.iterdir())
    summary = dict(line.split(maxsplit=1) for line in (out / "summary.txt").read_text().splitlines())
    assert {k: summary[k] for k in ("versions", "wheels", "pytest", "bench", "dry_run")} == {
        "versions": "0",
        "wheels": "0",
        "pytest": "0",
        "bench": "0",
        "dry_run": "1",
    }
    log = (out / "gpu_check.log").read_text()
    assert "torch " in log and "pylomin 0.1.0" in log and f"{ROOT}/pylomin/__init__.py" in log
    # The CUDA tests are collected (imports, fixtures, marker), not run.
    collected = (out / "pytest.log").read_text()
    assert "tests/test_cuda.py::test_cuda_forward_and_generate_equal_in_memory[0]" in collected
    bench = json.loads((out / "bench.json").read_text())
    rows = {r["tier"]: r for r in bench["model"]["rows"]}
    assert list(rows) == [
        "in memory",
        "pylomin host",
        "pylomin auto",
        "pylomin disk",
        "accelerate cpu_offload",
        "in memory, again",
    ]
    assert not [r for r in rows.values() if "error" in r or "skipped" in r]
    for tier in ("pylomin host", "pylomin auto", "pylomin disk"):
        assert rows[tier]["logits_equal"] and rows[tier]["tokens_equal"], rows[tier]
    assert rows["pylomin host"]["bytes_per_forward"] == bench["model"]["model"]["bytes"]
    assert rows["pylomin auto"]["bytes_per_forward"] == 0  # the tiny model is kept whole
    assert rows["pylomin disk"]["cache_drop"] == ["posix_fadvise"]  # the dry run drops only its own files
    assert [r["method"] for r in bench["h2d"]["rows"]] == ["Stager from mapped unit files, warm (CPU stand-in)"]
    assert "pylomin host" in (out / "bench.txt").read_text()
