"""Reading source checkpoints lazily, tensor by tensor: safetensors (single or sharded) and torch `.bin`/`.pt`."""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.header import SAFETENSORS_DTYPES, decode_header

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
# Files next to the weights that a converted folder carries along, so it loads like the original.
EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


@dataclass
class SourceTensor:
    """One tensor of the source: raw bytes at `offset` in a safetensors `file`, a mmap-backed `tensor`, or `produce()`."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: Path
    offset: int = -1
    tensor: torch.Tensor | None = None
    mapped: bool = False  # `tensor` lives in a private file mapping (safe to drop pages from)
    produce: Callable[[], torch.Tensor] | None = None  # made on demand instead (a converted layout's tensor)
    pieces: list[tuple[SourceTensor, int, int]] | None = (
        None  # or the bytes of these (source, offset, length), in order
    )
    keep_dtype: bool = False  # never cast (a quantized payload's scales are stored as its kernel reads them)

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


def byte_range(t: SourceTensor, offset: int, length: int) -> SourceTensor:
    """Bytes `[offset, offset + length)` of `t` (whole elements) as a flat tensor of its own."""
    first, count = offset // t.dtype.itemsize, length // t.dtype.itemsize
    if t.tensor is None:
        return replace(t, shape=(count,), offset=t.offset + offset)
    return replace(t, shape=(count,), tensor=t.tensor.reshape(-1)[first : first + count])


@dataclass
class Checkpoint:
    """A source checkpoint: its tensors in file order, tied aliases, and the files to carry along."""

    tensors: list[SourceTensor]
    aliases: dict[str, str] = field(default_factory=dict)
    weight_files: list[Path] = field(default_factory=list)
    extra_files: list[Path] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def open_checkpoint(src: str | os.PathLike[str]) -> Checkpoint:
    """Index the tensors of a Hugging Face model folder or a single `.safetensors`/`.bin`/`.pt` file.

    Nothing is read but headers: tensor data stays on disk until it is copied.
    """
    src = Path(src)
    if not src.exists():
        raise FileNotFoundError(f"`{src}` does not exist; give a model folder, a weights file or a Hub repo id")
    if src.is_dir() and (src / fmt.MANIFEST_NAME).is_file():
        return _converted(src)
    if src.is_dir():
        weight_files = _weight_files_in(src)
        extra = [src / n for n in EXTRA_FILES if (src / n).is_file()]
    else:
        weight_files, extra = [src], []
    ckpt = Checkpoint(tensors=[], weight_files=weight_files, extra_files=extra)
    seen: dict[str, Path] = {}
    for path in weight_files:
        if path.suffix == ".safetensors":
            tensors, aliases = _index_safetensors(path), dict[str, str]()
        else:
            tensors, aliases = _index_torch(path)
        for t in tensors:
            if t.name in seen:
                raise PylominError(f"tensor `{t.name}` appears in both `{seen[t.name]}` and `{path}`")
            seen[t.name] = path
        ckpt.tensors.extend(tensors)
        ckpt.aliases.update(aliases)
    return ckpt


def _converted(folder: Path) -> Checkpoint:
    """A folder pylomin converted already, as a source (to quantize it, or to convert it with other units)."""
    manifest = fmt.read(folder)
    if manifest.quantization is not None:
        raise PylominError(
            f"`{folder}` holds {manifest.quantization.scheme} weights already; convert the original checkpoint "
            "(the folder's `source` in pylomin.json says where it came from)"
        )
    extra = [folder / n for n in EXTRA_FILES if (folder / n).is_file()]
    files = [folder / u.file for u in manifest.units]
    ckpt = Checkpoint(tensors=[], aliases=dict(manifest.aliases), weight_files=files, extra_files=extra)
    for unit, path in zip(manifest.units, files, strict=True):
        # A unit file may hold padding entries between tensors: only the manifest's tensors are the model's.
        ckpt.tensors.extend(t for t in _index_safetensors(path) if t.name in unit.tensors)
    return ckpt


def _weight_files_in(folder: Path) -> list[Path]:
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                names = list(dict.fromkeys(weight_map.values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise PylominError(f"`{index}` is not a valid index ({e}); re-download it") from None
            files = [folder / n for n in names]
            for f in files:
                if not f.is_file():
                    raise FileNotFoundError(f"`{f}` is listed in `{index}` but missing; re-download the checkpoint")
            return files
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single]
    for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise PylominError(
        f"no weights found in `{folder}` (looked for model.safetensors, sharded safetensors with "
        f"{SAFETENSORS_INDEX}, pytorch_model.bin, *.safetensors, *.bin, *.pt)"
    )


def _index_safetensors(path: Path) -> list[SourceTensor]:
    with open(path, "rb") as f:
        infos = decode_header(path, f, os.fstat(f.fileno()).st_size)
    # File order, not name order: the converter then reads each file front to back.
    return [
        SourceTensor(name, SAFETENSORS_DTYPES[i.dtype], i.shape, path, offset=i.offset)
        for name, i in sorted(infos.items(), key=lambda kv: kv[1].offset)
    ]


def _index_torch(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    mapped = True
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _unsafe_pickle_error(path, e) from None
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise PylominError(f"`{path}` cannot be read as a torch checkpoint ({e})") from None
        # Legacy (non-zip) torch.save format: cannot be mapped, so it is read whole.
        logger.warning("`%s` uses the legacy torch.save format: it is read whole into memory", path)
        mapped = False
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e2:
            raise _unsafe_pickle_error(path, e2) from None
        except Exception as e2:
            raise PylominError(f"`{path}` cannot be read as a torch checkpoint ({type(e2).__name__}: {e2})") from None
    except Exception as e:  # zip errors, EOF: the file is corrupt
        raise PylominError(f"`{path}` cannot be read as a torch checkpoint ({type(e).__name__}: {e})") from None
    ckpt = from_tensors(_as_state_dict(obj, path), path, mapped=mapped)
    return ckpt.tensors, ckpt.aliases


_STORABLE = frozenset(SAFETENSORS_DTYPES.values())


def from_tensors(state: dict[str, torch.Tensor], origin: Path, *, mapped: bool = False) -> Checkpoint:
    """A checkpoint over tensors already in memory (or mapped by torch.load); shared views become aliases."""
    ckpt = Checkpoint(tensors=[])
    first_view: dict[tuple[object, ...], str] = {}
    for name, t in state.items():
        if t.layout != torch.strided or t.is_quantized:
            raise PylominError(
                f"tensor `{name}` in `{origin}` is a {t.layout} tensor{' (quantized)' if t.is_quantized else ''}; "
                "pylomin stores dense tensors only: re-save it with `.to_dense()` (or `.dequantize()`)"
            )
        if t.dtype not in _STORABLE:
            raise PylominError(
                f"tensor `{name}` in `{origin}` has dtype `{t.dtype}`, which safetensors cannot store; "
                f"re-save it in one of: {', '.join(sorted(str(d).removeprefix('torch.') for d in _STORABLE))}"
            )
        # Two names for the same view of the same storage are one tensor (tied weights).
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        if t.numel() and key in first_view:
            ckpt.aliases[name] = first_view[key]
            continue
        first_view[key] = name
        ckpt.tensors.append(SourceTensor(name, t.dtype, tuple(t.shape), origin, tensor=t, mapped=mapped))
    return ckpt


def _unsafe_pickle_error(path: Path, e: Exception) -> PylominError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return PylominError(
        f"`{path}` needs unsafe unpickling to load ({first}); pylomin only reads plain tensors. "
        "Re-save it with safetensors, or load it yourself with torch.load(weights_only=False) if you trust it"
    )


def _as_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise PylominError(f"`{path}` does not hold a state dict (a dict of tensor names to tensors)")
    return {str(k): v for k, v in obj.items()}
