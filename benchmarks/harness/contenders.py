"""The contenders by name: how each loads a model (in memory, accelerate's disk offload, pylomin and its options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import pylomin
from benchmarks.harness import internals, models


@dataclass(frozen=True)
class Contender:
    """How one contender loads a model, from the folders of a child's spec."""

    how: str  # "memory", "accelerate" or "pylomin"
    folder: str = "block"  # pylomin: which converted folder of the spec it loads
    options: dict[str, Any] = field(default_factory=dict)  # pylomin: load_streaming's keyword options
    share: float | None = None  # pylomin: memory_budget = this share of the folder's bytes
    phase_drop: bool = False  # pylomin: drop_page_cache set by the phase (False warm, True cold)
    quantize: str | None = None  # in memory: pylomin.quantize_ after loading
    per_expert: bool = True  # pylomin: False reads a layer's fused experts whole with it (an internal option)
    guessing: bool = True  # pylomin: False reads each layer's experts only once its router chose (internal too)


_STREAM = dict(memory_budget=0, prefetch=2)
CONTENDERS = {
    "memory": Contender("memory"),  # transformers from_pretrained(dtype=torch.float32)
    "memory-int8": Contender("memory", quantize="int8"),
    "memory-int4": Contender("memory", quantize="int4"),
    "accelerate": Contender("accelerate"),
    "default": Contender("pylomin"),  # load_streaming(folder, cls), no options: memory_budget="auto"
    "int8": Contender("pylomin", "int8"),
    "int4": Contender("pylomin", "int4"),
    "stream": Contender("pylomin", options=_STREAM, phase_drop=True),
    "prefetch0": Contender("pylomin", options=dict(memory_budget=0, prefetch=0), phase_drop=True),
    "leaf": Contender("pylomin", "leaf", _STREAM, phase_drop=True),
    "budget50": Contender("pylomin", options=dict(prefetch=2), share=0.5, phase_drop=True),
    "least": Contender("pylomin", "leaf", dict(memory_budget=0, prefetch=0)),
    "budget0": Contender("pylomin", options=dict(memory_budget=0)),
    "budget0-dense": Contender("pylomin", options=dict(memory_budget=0), per_expert=False),
    "budget0-unguessed": Contender("pylomin", options=dict(memory_budget=0), guessing=False),
    "budget0-int4": Contender("pylomin", "int4", dict(memory_budget=0)),
    "budget0-int8": Contender("pylomin", "int8", dict(memory_budget=0)),
    "budget0-int4-head": Contender("pylomin", "int4+head", dict(memory_budget=0)),
    "share25": Contender("pylomin", share=0.25),
    "share50": Contender("pylomin", share=0.5),
    **{f"kept{p}": Contender("pylomin", options=dict(drop_page_cache=False), share=p / 100) for p in (0, 25, 50, 100)},
}


def load(name: str, spec: dict[str, Any], offload: Path, *, drop: bool = False) -> tuple[Any, str]:
    """Contender `name`'s model of the spec's class, and a note on how it loaded ("" if there is nothing to say).

    The spec's `folder` overrides the converted folder a pylomin contender reads; `drop` is
    drop_page_cache for the contenders that take it from the phase.
    """
    import transformers

    c = CONTENDERS[name]
    cls = getattr(transformers, spec["cls"])
    src = Path(spec["src"])
    if c.how == "memory":
        model = cls.from_pretrained(src, dtype=torch.float32).eval()
        if c.quantize:
            pylomin.quantize_(model, c.quantize)
        return model, ""
    if c.how == "accelerate":
        return load_accelerate(cls, src, offload, spec.get("accelerate_api", "auto"))
    path = spec["folders"][spec.get("folder") or c.folder]
    options = dict(c.options)
    if c.share is not None:
        options["memory_budget"] = int(models.nbytes(path) * c.share)
    if c.phase_drop:
        options["drop_page_cache"] = drop
    if not c.per_expert:
        return internals.load_experts_whole(path, cls, **options), ""
    if not c.guessing:
        return internals.load_experts_unguessed(path, cls, **options), ""
    return pylomin.load_streaming(path, cls, **options), ""


def files(name: str, spec: dict[str, Any], offload: Path) -> list[Path]:
    """The files contender `name` reads its weights from: what a cold run evicts first."""
    c = CONTENDERS[name]
    if c.how == "pylomin":
        return models.unit_files(spec["folders"][spec.get("folder") or c.folder])
    offloaded = sorted(p for p in offload.rglob("*") if p.is_file())
    return sorted(Path(spec["src"]).glob("*.safetensors")) + offloaded


def load_accelerate(cls: Any, src: Path, offload: Path, api: str) -> tuple[Any, str]:
    """The checkpoint with every weight offloaded to disk by accelerate; returns (model, how it was loaded).

    api "auto": transformers' `from_pretrained(device_map={"": "disk"})`, and where transformers
    refuses, `accelerate.disk_offload` on an empty model; "disk_offload": the latter only.
    """
    refused = ""
    if api == "auto":
        try:
            model = cls.from_pretrained(src, dtype=torch.float32, device_map={"": "disk"}, offload_folder=offload)
            return model.eval(), 'transformers from_pretrained(device_map={"": "disk"}, offload_folder=...)'
        except (ValueError, NotImplementedError, RuntimeError, KeyError) as e:
            refused = f" (from_pretrained refused: {type(e).__name__}: {str(e)[:120]})"
    import accelerate
    import transformers
    from accelerate.utils import offload_weight, save_offload_index
    from safetensors import safe_open

    with accelerate.init_empty_weights():
        model = cls(transformers.AutoConfig.from_pretrained(src))
    model.tie_weights()
    stored = {}
    for path in sorted(src.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            stored.update(dict.fromkeys(f.keys(), path))
    params = dict(model.named_parameters(remove_duplicate=False))
    index: dict[str, Any] = {}
    for name, param in params.items():  # one tensor in memory at a time; tied names read their stored twin
        key = name if name in stored else next(k for k in stored if params.get(k) is param)
        with safe_open(stored[key], framework="pt") as f:
            index = offload_weight(f.get_tensor(key).to(torch.float32), name, offload, index)
    save_offload_index(index, offload)
    model = accelerate.disk_offload(model, offload, execution_device=torch.device("cpu"))
    return model.eval(), f"accelerate.disk_offload(init_empty_weights() model, execution_device='cpu'){refused}"
