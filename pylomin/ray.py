"""Streamed models as Ray Data actors: each actor loads the model once and runs batches through it.

```python
import ray
from pylomin.ray import StreamedPredictor

ds = ray.data.from_items([{"input_ids": ids} for ids in token_ids])   # rows of equal length
out = ds.map_batches(
    StreamedPredictor,
    batch_size=32,
    batch_format="numpy",
    compute=ray.data.ActorPoolStrategy(size=2),                      # or concurrency=2 (older Ray)
    num_cpus=1,                                                      # num_gpus=1 with device="cuda"
    fn_constructor_kwargs=dict(
        path="bert-pylomin/",
        model_cls="transformers.BertModel",
        load_kwargs=dict(drop_page_cache=False),                     # device="cuda" on GPU actors
    ),
)
```

`pylomin.ray.map_batches(ds, path, model_cls, concurrency=2, ...)` writes the same call. Actors on one
node map the same unit files, so the weights' pages in the page cache are shared between them: pass
`drop_page_cache=False` so that one actor does not evict the pages another is about to use. With a
`memory_budget` that covers the model, every actor keeps it mapped and the node still holds one copy
(`examples/ray_batch_inference.py` measures it). GPU actors each copy the units they run to their GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

import pylomin
from pylomin.modeling import resolve_model_cls as resolve

try:
    import ray
    import ray.data
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("pylomin.ray needs Ray Data: pip install 'pylomin[ray]'") from e

Batch = Mapping[str, np.ndarray]
BatchFn = Callable[[nn.Module, Batch], Mapping[str, np.ndarray]]

__all__ = ["StreamedPredictor", "forward_batch", "map_batches", "resolve"]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy()


def _first_tensor(output: Any) -> tuple[str, torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return "output", output
    if isinstance(output, Mapping):  # transformers' ModelOutput: last_hidden_state, logits, ...
        for key, value in output.items():
            if isinstance(value, torch.Tensor):
                return str(key), value
    if isinstance(output, (tuple, list)):
        for value in output:
            if isinstance(value, torch.Tensor):
                return "output", value
    raise TypeError(f"the model returned {type(output).__name__} with no tensor in it; pass `fn` to pick the outputs")


def forward_batch(model: nn.Module, batch: Batch, device: str | torch.device = "cpu") -> dict[str, np.ndarray]:
    """The default step: `model(input_ids, attention_mask=...)` under `torch.no_grad()`.

    Returns the batch's columns plus the output's first tensor as a numpy column named after it
    (`last_hidden_state` for `BertModel`, `logits` for a `...ForCausalLM`, `output` for a plain tensor).
    """
    if "input_ids" not in batch:
        raise KeyError(f"the batch has no `input_ids` column (it has {sorted(batch)}); pass `fn` to feed the model")
    kwargs = {}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = torch.tensor(np.asarray(batch["attention_mask"]), device=device)
    ids = torch.tensor(np.asarray(batch["input_ids"]), device=device)  # a copy: Ray's arrays are read-only
    with torch.no_grad():
        name, tensor = _first_tensor(model(ids, **kwargs))
    return {**batch, name: _to_numpy(tensor)}


class StreamedPredictor:
    """A callable class for `Dataset.map_batches`: one streamed model per actor, loaded at start.

    Args:
        path: a folder written by `pylomin.convert` / `pylomin-convert`, readable from every node.
        model_cls: what `pylomin.load_streaming` takes (a transformers class, a zero-argument
            factory), or its import path as a string (`"transformers.BertModel"`), which pickles
            without importing anything on the driver.
        load_kwargs: options of `pylomin.load_streaming`: `device="cuda"` for GPU actors (with
            `num_gpus=1`), `drop_page_cache=False` to share warm pages between actors on a node,
            `memory_budget`, `prefetch`, `dtype`.
        fn: `fn(model, batch) -> dict of numpy arrays`, run on each batch (`batch_format="numpy"`);
            default: `forward_batch` on `input_ids` (and `attention_mask`) on the load device.
            Wrap it in `torch.no_grad()` yourself if you write your own.

    A unit file that is missing, truncated or replaced fails the actor's start with pylomin's
    `PylominError`, naming the file; the dataset's execution raises Ray's `ActorDiedError` with
    that error and its traceback in the message.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        model_cls: str | Callable[..., nn.Module] | type,
        load_kwargs: Mapping[str, Any] | None = None,
        fn: BatchFn | None = None,
    ) -> None:
        kwargs = dict(load_kwargs or {})
        self.device = torch.device(kwargs.get("device", "cpu"))
        self.model = pylomin.load_streaming(path, resolve(model_cls), **kwargs)
        self.fn = fn

    def __call__(self, batch: Batch) -> Mapping[str, np.ndarray]:
        if self.fn is not None:
            return self.fn(self.model, batch)
        return forward_batch(self.model, batch, self.device)


def map_batches(
    dataset: ray.data.Dataset,
    path: str | os.PathLike[str],
    model_cls: str | Callable[..., nn.Module] | type,
    *,
    concurrency: int = 1,
    batch_size: int = 32,
    num_cpus: float = 1,
    num_gpus: float = 0,
    load_kwargs: Mapping[str, Any] | None = None,
    fn: BatchFn | None = None,
    **map_kwargs: Any,
) -> ray.data.Dataset:
    """`dataset.map_batches(StreamedPredictor, ...)` on a pool of `concurrency` actors.

    With `num_gpus` > 0 and no `device` in `load_kwargs`, the model streams to `"cuda"`. Other
    keyword arguments go to `Dataset.map_batches` (`memory=`, `runtime_env=`, ...).
    """
    kwargs = dict(load_kwargs or {})
    if num_gpus > 0:
        kwargs.setdefault("device", "cuda")
    return dataset.map_batches(
        StreamedPredictor,
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=num_cpus,
        num_gpus=num_gpus or None,
        fn_constructor_kwargs=dict(path=path, model_cls=model_cls, load_kwargs=kwargs, fn=fn),
        **map_kwargs,
    )
