"""The profiler: Chrome trace format, spans per unit, the verdict, and nothing recorded outside the block."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin.runtime.model import stream_of
from tests import models


@pytest.mark.parametrize("prefetch", [0, 2])
def test_trace_and_verdict(converted, tmp_path: Path, prefetch: int) -> None:
    model = pylomin.load_streaming(converted("bert"), transformers.BertModel, prefetch=prefetch, memory_budget=0)
    with torch.no_grad():
        model(models.ids())  # records the order: the reader runs ahead on the next forward
        with pylomin.profile(model, trace=tmp_path / "t.json", png=tmp_path / "t.png") as prof:
            model(models.ids())
        model(models.ids())
    doc = json.loads((tmp_path / "t.json").read_text())
    spans = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert spans and all(e["dur"] >= 0 and e["ts"] >= 0 and {"name", "pid", "tid", "cat"} <= e.keys() for e in spans)
    kinds = {e["cat"] for e in spans}
    assert {"wait", "load", "compute", "release"} <= kinds
    assert ("read" in kinds) == (prefetch > 0)
    computed = {e["name"] for e in spans if e["cat"] == "compute"}
    assert {f"encoder.layer.{i}" for i in range(3)} <= computed
    names = [e for e in doc["traceEvents"] if e["ph"] == "M"]
    assert any(e["args"]["name"] == "reader" for e in names) == (prefetch > 0)
    assert re.fullmatch(r"(disk|compute)-bound: .+, compute idle \d+% of [\d.]+ s \(\d+ MiB read\)", prof.verdict())
    assert doc["otherData"]["verdict"] == prof.verdict()
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert len(prof.spans) == len(spans)  # the forward after the block added nothing
    assert stream_of(model).lifecycle.recorder is None


def test_profile_refuses_a_plain_model() -> None:
    with pytest.raises(ValueError, match="not a pylomin model"), pylomin.profile(models.bert()):
        pass


def test_cli_run_with_trace(converted, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pylomin.tools.cli import main

    trace = tmp_path / "run.json"
    args = ["run", str(converted("bert")), "--model-cls", "transformers.BertModel", "--seq", "8", "--trace", str(trace)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "forward 2/2" in out and "-bound: " in out
    assert out.startswith("memory: ") and "available of" in out  # the memory policy's choice, with its figures
    assert json.loads(trace.read_text())["traceEvents"]
    assert main([*args[:4], "--seq", "8", "--runs", "1", "--memory-budget", "0"]) == 0
    assert "memory: " not in capsys.readouterr().out  # a fixed budget: nothing chosen
    assert main(["run", str(converted("bert")), "--model-cls", "transformers.NoSuchModel"]) == 2
    assert "cannot import `transformers.NoSuchModel`" in capsys.readouterr().err
