"""The run-time layout: transformers' own checkpoint conversion mapping, applied once at conversion.

transformers 5 changes the layout of many architectures at load (`from_pretrained` renames keys
and fuses lists of expert weights into 3-D tensors; `save_pretrained` writes the Hub layout back).
The converter applies the same mapping, with transformers' own code, so unit files hold the
tensors the model holds at run time and the runtime binds them strictly, key by key. A renamed
tensor is still streamed chunk by chunk; a converted group (one layer's experts at most) is built
in memory, one group at a time.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pylomin.converter.checkpoint import Checkpoint, SourceTensor
from pylomin.errors import PylominError
from pylomin.modeling import fingerprint

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)


@dataclass
class _Group:
    """The source tensors one converter turns into its targets (e.g. one layer's experts into two 3-D tensors)."""

    first_key: str
    template: Any  # a transformers WeightConverter without collected tensors
    model: nn.Module
    entries: list[tuple[str, SourceTensor, str]] = field(default_factory=list)  # (target key, source, pattern)
    _ready: dict[str, torch.Tensor] = field(default_factory=dict)

    def run(self, load: Callable[[SourceTensor], torch.Tensor]) -> dict[str, torch.Tensor]:
        converter = copy.deepcopy(self.template)
        for key, t, pattern in self.entries:
            converter.add_tensor(key, t.name, pattern, partial(load, t))
        out = converter.convert(self.first_key, model=self.model, config=self.model.config)
        return {name: (v[0] if isinstance(v, list) else v) for name, v in out.items()}

    def byte_layouts(self) -> dict[str, _Bytes] | None:
        """The targets as byte ranges of the sources, when every operation only stacks or concatenates; else None.

        Those targets stream chunk by chunk like any renamed tensor: nothing is built in memory.
        """
        from transformers.core_model_loading import Concatenate, MergeModulelist

        ops: list[Any] = []
        for op in self.template.operations:
            if type(op) is MergeModulelist and op.dim == 0:
                ops.append(_StackBytes(op))
            elif type(op) is Concatenate:
                ops.append(_CatBytes(op))
            else:
                return None
        if any(t.tensor is not None and not t.tensor.is_contiguous() for _, t, _ in self.entries):
            return None
        converter = copy.deepcopy(self.template)
        converter.operations = ops
        for key, t, pattern in self.entries:
            converter.add_tensor(key, t.name, pattern, partial(_as_bytes, t))
        return dict(converter.convert(self.first_key, model=self.model, config=self.model.config))

    def take(self, name: str) -> torch.Tensor:
        """The converted tensor `name`; the group is converted on first use and freed once all its targets are taken."""
        if not self._ready:
            self._ready = self.run(read_tensor)
        return self._ready.pop(name)


Piece = tuple[SourceTensor, int, int]  # (source, byte offset into it, byte length)


@dataclass
class _Bytes:
    """A tensor that is only a concatenation of whole-element byte ranges of source tensors, in row-major order."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece]

    def slab(self, start: int, length: int) -> list[Piece]:
        """The pieces covering bytes `[start, start + length)` of this tensor."""
        out: list[Piece] = []
        pos = 0
        for src, off, n in self.pieces:
            lo, hi = max(start, pos), min(start + length, pos + n)
            if lo < hi:
                out.append((src, off + lo - pos, hi - lo))
            pos += n
        return out


class _StackBytes:
    """`MergeModulelist(dim=0)` on byte layouts: stacking along a new first dim is concatenating the bytes."""

    def __init__(self, template: Any):
        self.template = template

    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kw: Any
    ) -> dict[str, Any]:
        merged = {}
        size = len(input_dict)
        for pattern in list(input_dict):
            parts: list[_Bytes] = input_dict.pop(pattern)
            target = self.template.get_target_pattern(size, pattern, target_patterns)
            merged[target] = _Bytes((len(parts), *parts[0].shape), parts[0].dtype, [p for b in parts for p in b.pieces])
        return merged


class _CatBytes:
    """`Concatenate(dim=d)` on byte layouts: for each index over the dims before `d`, each input's slab in turn."""

    def __init__(self, template: Any):
        self.template = template
        self.dim = template.dim

    def convert(
        self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kw: Any
    ) -> dict[str, Any]:
        parts: list[_Bytes] = []
        for pattern in source_patterns:  # the converter's order, as Concatenate does
            if pattern in input_dict:
                value = input_dict.pop(pattern)
                parts.extend(value if isinstance(value, list) else [value])
        d = self.dim % len(parts[0].shape)
        outer = math.prod(parts[0].shape[:d])
        slabs = [math.prod(b.shape[d:]) * b.dtype.itemsize for b in parts]
        pieces = [p for o in range(outer) for b, n in zip(parts, slabs, strict=True) for p in b.slab(o * n, n)]
        shape = list(parts[0].shape)
        shape[d] = sum(b.shape[d] for b in parts)
        return {self.template.get_target_pattern(target_patterns): _Bytes(tuple(shape), parts[0].dtype, pieces)}


def _as_bytes(t: SourceTensor) -> _Bytes:
    return _Bytes(t.shape, t.dtype, [(t, 0, t.nbytes)])


def read_tensor(t: SourceTensor) -> torch.Tensor:
    """The tensor `t` in memory (raw safetensors bytes are read; a mapped tensor is used as it is)."""
    if t.tensor is not None:
        return t.tensor
    out = torch.empty(t.shape, dtype=t.dtype)
    if t.nbytes:
        with open(t.file, "rb") as f:
            f.seek(t.offset)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]
            if f.readinto(view) != t.nbytes:
                raise PylominError(f"`{t.file}` is truncated: tensor `{t.name}` ends past the end of the file")
    return out


def _meta_tensor(t: SourceTensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def to_runtime_layout(ckpt: Checkpoint, model: PreTrainedModel) -> tuple[Checkpoint, dict[str, str] | None]:
    """`ckpt` renamed and converted into the layout `model` (built on meta) holds; and the layout's record.

    The record (None when nothing changed) goes into the manifest: the transformers version, the
    model class and a fingerprint of the mapping, which `check` compares at load.
    """
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    meta = model.state_dict()
    prefix: str = model.base_model_prefix

    def rename(name: str) -> tuple[str, str | None]:
        # As transformers' loader does (convert_and_load_state_dict_in_model).
        key, pattern = rename_source_key(name, renamings, converters, prefix, meta)
        if key not in meta and name in meta:
            key, pattern = rename_source_key(name, [], [], prefix, meta)
        return key, pattern

    groups: dict[str, _Group] = {}
    renamed: dict[str, str] = {}
    # Natural key order, as transformers collects them: experts 0, 1, ..., 10, in that order in a fused tensor.
    for t in sorted(ckpt.tensors, key=lambda t: dot_natural_key(t.name)):
        key, pattern = rename(t.name)
        if pattern is None or key not in meta:
            renamed[t.name] = key
            continue
        group = groups.get(key)
        if group is None:
            group = groups[key] = _Group(key, copy.deepcopy(by_pattern[pattern]), model)
        group.entries.append((key, t, pattern))
    if not groups and all(k == n for n, k in renamed.items()):
        return ckpt, None
    # As from_pretrained does, keys the class does not hold are left out (a base model from a
    # checkpoint with a head); said, not silent.
    unused = sorted(n for n, k in renamed.items() if k not in meta)
    if unused:
        logger.warning("not used by %s, left out: %s", type(model).__name__, ", ".join(unused))
    out = [replace(t, name=renamed[t.name]) for t in ckpt.tensors if t.name in renamed and t.name not in unused]
    streamed = 0
    for group in groups.values():
        file = group.entries[0][1].file
        layouts = group.byte_layouts()
        if layouts is not None:
            streamed += 1
            for name, b in layouts.items():
                out.append(SourceTensor(name, b.dtype, b.shape, file, pieces=b.pieces))
            continue
        # The targets' names, dtypes and shapes: the same conversion run on meta tensors, nothing read.
        for name, spec in group.run(_meta_tensor).items():
            out.append(SourceTensor(name, spec.dtype, tuple(spec.shape), file, produce=partial(group.take, name)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise PylominError(f"several source tensors become {twice} in the run-time layout; the checkpoint holds both")
    aliases = {renamed.get(a, rename(a)[0]): renamed.get(b, b) for a, b in ckpt.aliases.items()}
    record = {
        "transformers": transformers.__version__,
        "model_cls": type(model).__name__,
        "mapping": fingerprint(model),
    }
    logger.info(
        "run-time layout of %s (transformers %s): %d tensors renamed, %d groups converted (%d streamed as bytes)",
        record["model_cls"],
        record["transformers"],
        sum(k != n for n, k in renamed.items()),
        len(groups),
        streamed,
    )
    return Checkpoint(out, aliases, ckpt.weight_files, ckpt.extra_files), record


def runtime_layout(
    ckpt: Checkpoint, src: Path, model_cls: str | type | None
) -> tuple[Checkpoint, dict[str, str] | None, set[str], nn.Module | None]:
    """A transformers folder's tensors in the layout its model class holds at run time (see `pylomin.converter.layout`),
    the layout's record, the model's fused-experts modules, and the model on meta (None without a class)."""
    if not (src.is_dir() and (src / "config.json").is_file()):
        if model_cls is not None:
            raise ValueError(f"model_cls is for a model folder with a config.json; `{src}` is not one")
        return ckpt, None, set(), None
    try:
        import transformers
    except ImportError:
        logger.info("transformers is not installed: `%s` is converted with its tensor names as they are", src)
        return ckpt, None, set(), None
    from pylomin.modeling import build_on_meta, experts_count, resolve_model_cls

    if model_cls is None:
        # The class that saved the checkpoint. Without one, names stay as they are: guessing a class
        # (AutoModel) would strip a head's prefix the user's class may need.
        architectures = json.loads((src / "config.json").read_text(encoding="utf-8")).get("architectures") or []
        model_cls = getattr(transformers, architectures[0], None) if architectures else None
        if model_cls is None:
            logger.info("`%s` names no known architecture: tensor names are kept; pass model_cls to convert them", src)
            return ckpt, None, set(), None
    cls = resolve_model_cls(model_cls)
    model = build_on_meta(cls, src, None)
    if not isinstance(model, transformers.PreTrainedModel):
        raise ValueError(f"model_cls must be a transformers model class, got `{type(model).__name__}`")
    experts = {name for name, m in model.named_modules() if experts_count(m) is not None}
    return (*to_runtime_layout(ckpt, model), experts, model)
