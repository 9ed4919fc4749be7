"""pylomin.ray on a local Ray cluster: results equal the in-process model's, a corrupt unit file fails clearly.

The Ray driver runs in a child process (`_driver`), once for the module: Ray leaves threads, sockets
and log files open in its driver after `ray.shutdown()`, and other tests count this process's.
"""

from __future__ import annotations

import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers

import pylomin
from tests import models, python

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pylomin_ray = pytest.importorskip("pylomin.ray")


def _rows(batch: int = 10, seq: int = 12) -> list[dict[str, np.ndarray]]:
    ids = models.ids(batch, seq).numpy()
    mask = np.ones_like(ids)
    mask[::3, seq // 2 :] = 0  # some padded rows
    return [{"row": np.int64(i), "input_ids": ids[i], "attention_mask": mask[i]} for i in range(batch)]


def _by_row(rows: list[dict[str, Any]], column: str) -> np.ndarray:
    return np.stack([np.asarray(r[column]) for r in sorted(rows, key=lambda r: int(r["row"]))])


def _pooled(model: torch.nn.Module, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # A user step: masked mean of the hidden states, one embedding per row.
    out = pylomin_ray.forward_batch(model, batch)
    mask = torch.tensor(batch["attention_mask"], dtype=torch.float32)[..., None]
    hidden = torch.from_numpy(out["last_hidden_state"])
    return {"row": batch["row"], "embedding": ((hidden * mask).sum(1) / mask.sum(1)).numpy()}


def _embed(folder: str, rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The rows through 2 actors, with the default step and with `_pooled`, ordered by row."""
    ds = ray.data.from_items(rows, override_num_blocks=4)
    out = ds.map_batches(
        pylomin_ray.StreamedPredictor,
        batch_size=3,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=2),
        num_cpus=1,
        fn_constructor_kwargs=dict(path=folder, model_cls=transformers.BertModel, load_kwargs={"prefetch": 0}),
    ).take_all()
    pooled = pylomin_ray.map_batches(ds, folder, "transformers.BertModel", concurrency=2, batch_size=4, fn=_pooled)
    return {
        "rows": np.array([len(out)]),
        "last_hidden_state": _by_row(out, "last_hidden_state"),
        "input_ids": _by_row(out, "input_ids"),
        "embedding": _by_row(pooled.take_all(), "embedding"),
    }


def _embed_error(folder: str, rows: list[dict[str, np.ndarray]]) -> tuple[str, str]:
    """The exception a run raises, as (type name, message); empty strings if it succeeds."""
    try:
        pylomin_ray.map_batches(ray.data.from_items(rows), folder, "transformers.BertModel", batch_size=2).take_all()
    except Exception as e:  # Ray's exceptions do not all pickle: keep their text
        return type(e).__name__, str(e)
    return "", ""


def _driver(job: str) -> None:
    """The child: a local cluster (2 CPUs), both runs, the results pickled to `job`.out."""
    with open(job, "rb") as f:
        good, corrupt, rows = pickle.load(f)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        results = {"embed": _embed(good, rows), "error": _embed_error(corrupt, rows[:4])}
    finally:
        ray.shutdown()
    with open(job + ".out", "wb") as f:
        pickle.dump(results, f)


@pytest.fixture(scope="module")
def through_ray(converted: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Runs the driver on the tiny BERT and on a copy with its last unit file truncated."""
    tmp = tmp_path_factory.mktemp("ray")
    corrupt = shutil.copytree(converted("bert"), tmp / "bert-pylomin")
    unit = sorted((corrupt / "units").iterdir())[-1]
    with open(unit, "r+b") as f:
        f.truncate(unit.stat().st_size - 100)
    job = tmp / "job.pkl"
    with open(job, "wb") as f:
        pickle.dump((str(converted("bert")), str(corrupt), _rows()), f)
    code = f"from tests.test_ray import _driver; _driver({str(job)!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=python.ROOT, capture_output=True, text=True, timeout=200)
    assert res.returncode == 0, res.stderr[-5000:]
    with open(str(job) + ".out", "rb") as f:
        return {**pickle.load(f), "unit": unit.name}


@pytest.mark.timeout(240)
def test_results_equal_in_process(through_ray: dict[str, Any], converted: Callable[..., Path]) -> None:
    got, rows = through_ray["embed"], _rows()
    model = pylomin.load_streaming(converted("bert"), transformers.BertModel)
    ids = np.stack([r["input_ids"] for r in rows])
    mask = np.stack([r["attention_mask"] for r in rows])
    hidden = pylomin_ray.forward_batch(model, {"input_ids": ids, "attention_mask": mask})["last_hidden_state"]
    pylomin.unload_(model)
    assert got["rows"][0] == len(rows)
    assert got["last_hidden_state"].dtype == np.float32 and got["last_hidden_state"].shape == hidden.shape
    assert np.array_equal(got["last_hidden_state"], hidden)  # bit for bit, padded rows included
    assert np.array_equal(got["input_ids"], ids)
    m = mask[..., None].astype(np.float32)
    assert np.array_equal(got["embedding"], (hidden * m).sum(1) / m.sum(1))


@pytest.mark.timeout(240)
def test_corrupt_unit_file_fails_the_actor_clearly(through_ray: dict[str, Any]) -> None:
    kind, text = through_ray["error"]
    assert kind == "ActorDiedError", (kind, text)  # with the actor's traceback in its message
    assert "PylominError" in text and through_ray["unit"] in text and "truncated or was replaced" in text, text


def test_forward_batch_plain_module_and_errors() -> None:
    torch.manual_seed(0)
    model = models.Custom().eval()
    batch = {"input_ids": models.ids().numpy()}
    out = pylomin_ray.forward_batch(model, batch)
    with torch.no_grad():
        assert np.array_equal(out["output"], model(models.ids()).numpy())
    assert np.array_equal(out["input_ids"], batch["input_ids"])
    with pytest.raises(KeyError, match="input_ids"):
        pylomin_ray.forward_batch(model, {"ids": batch["input_ids"]})
    with pytest.raises(TypeError, match="pass `fn`"):
        pylomin_ray.forward_batch(lambda ids: {"n": 1}, batch)  # type: ignore[arg-type]
    assert pylomin_ray.resolve("transformers.BertModel") is transformers.BertModel
    assert pylomin_ray.resolve("tests.models:bert") is models.bert
    assert pylomin_ray.resolve(models.bert) is models.bert
    with pytest.raises(ValueError, match="cannot import"):
        pylomin_ray.resolve("BertModel")
