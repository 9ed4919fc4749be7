"""`pylomin.json`, a converted folder's manifest: its units, their files and tensors, the aliases and the layout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Set
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pylomin.errors import PylominError
from pylomin.format.header import SAFETENSORS_DTYPES, TensorInfo
from pylomin.format.quant import Quantization, scales_name

logger = logging.getLogger(__name__)

FORMAT_NAME = "pylomin"
# 2: unit files may hold padding entries between tensors, and the manifest carries a digest of itself.
# Version 1 folders still read: they have neither (their tensors are only as aligned as their sizes).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MANIFEST_NAME = "pylomin.json"
UNITS_DIR = "units"


class Range(NamedTuple):
    """Bytes `[offset, offset + length)` of one unit file (its path)."""

    file: str
    offset: int
    length: int


@dataclass
class Unit:
    """A group of tensors paged in and out together, stored in one safetensors file."""

    name: str
    file: str
    size: int
    checksum: str
    modules: list[str]
    tensors: dict[str, TensorInfo]

    @property
    def nbytes(self) -> int:
        return sum(t.length for t in self.tensors.values())


@dataclass
class Manifest:
    """The contents of `pylomin.json`: every unit, its tensors, and the tied-weight aliases."""

    units: list[Unit]
    aliases: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None
    extra_files: list[str] = field(default_factory=list)
    # The run-time layout the tensors are in, when transformers' conversion mapping changed them:
    # {"transformers": version, "model_cls": class name, "mapping": fingerprint}; None: as in the source.
    layout: dict[str, str] | None = None
    # The Linear layers stored quantized (payload + scales), the scheme and the int4 packing; None: none.
    quantization: Quantization | None = None
    format_version: int = FORMAT_VERSION

    def tensor_index(self) -> dict[str, tuple[Unit, TensorInfo]]:
        """Every stored tensor name -> (unit, info); aliases not included."""
        return {name: (unit, info) for unit in self.units for name, info in unit.tensors.items()}

    @property
    def nbytes(self) -> int:
        return sum(u.nbytes for u in self.units)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "source": self.source,
            "dtype": self.dtype,
            "aliases": self.aliases,
            "extra_files": self.extra_files,
            "layout": self.layout,
            "quantization": self.quantization.to_json() if self.quantization else None,
            "units": [
                {**asdict(u), "tensors": {n: {**asdict(t), "shape": list(t.shape)} for n, t in u.tensors.items()}}
                for u in self.units
            ],
        }
        doc = json.loads(json.dumps(doc))  # as a reader will see it: tuples as lists, every key a string
        doc["digest"] = digest(doc)
        return json.dumps(doc, indent=1)


def digest(doc: Mapping[str, Any]) -> str:
    """`sha256:` of a manifest's fields other than `digest`, as canonical JSON (sorted keys, no spaces).

    Each unit's checksum covers its file and this covers the list of units: a unit removed from the
    list along with its file, or any other edit of the manifest, no longer matches.
    """
    body = {k: v for k, v in doc.items() if k != "digest"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def write(manifest: Manifest, folder: str | os.PathLike[str]) -> None:
    """Write `pylomin.json` into `folder` and fsync it."""
    path = Path(folder) / MANIFEST_NAME
    with open(path, "w", encoding="utf-8") as f:
        f.write(manifest.to_json())
        f.flush()
        os.fsync(f.fileno())


def read(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate `folder/pylomin.json`.

    Raises:
        FileNotFoundError: `folder` is not a converted pylomin folder.
        PylominError: the manifest is corrupt, from another format version, or points outside `folder`.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"`{path}` not found: `{folder}` is not a converted pylomin folder; "
            "create one with `pylomin-convert MODEL OUT_DIR`"
        )
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PylominError(f"`{path}` is not valid JSON ({e}); convert the model again") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise PylominError(f"`{path}` is not a pylomin manifest; convert the model again")
    version = doc.get("format_version")
    if type(version) is not int or version not in READ_VERSIONS:
        raise PylominError(
            f"`{path}` has format_version {version!r}, this pylomin reads versions "
            f"{', '.join(map(str, READ_VERSIONS))}; convert the model again with this version (or upgrade pylomin)"
        )
    try:
        units = [_unit_from_json(u, folder) for u in doc["units"]]
        manifest = Manifest(
            units=units,
            aliases={str(k): str(v) for k, v in doc.get("aliases", {}).items()},
            source=dict(doc.get("source", {})),
            dtype=doc.get("dtype"),
            extra_files=[str(x) for x in doc.get("extra_files", [])],
            layout=_layout_from_json(doc.get("layout")),
            quantization=Quantization.from_json(doc.get("quantization")),
            format_version=version,
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise PylominError(f"`{path}` is malformed ({type(e).__name__}: {e}); convert the model again") from None
    stored = manifest.tensor_index()
    for module in manifest.quantization.modules if manifest.quantization else []:
        for attr in ("weight", "scales"):
            if f"{module}.{attr}" not in stored:
                raise PylominError(
                    f"`{path}`: quantized module `{module}` has no stored `{attr}`; convert the model again"
                )
    for module, tensors in manifest.quantization.experts.items() if manifest.quantization else []:
        for name in (f"{module}.{attr}" for attr in tensors):
            for stored_name in (name, scales_name(name)):
                if stored_name not in stored:
                    raise PylominError(
                        f"`{path}`: quantized experts tensor `{stored_name}` is not stored; convert the model again"
                    )
    for alias, target in manifest.aliases.items():
        if target not in stored:
            raise PylominError(f"`{path}`: alias `{alias}` points to `{target}`, which no unit stores")
    return manifest


def check_digest(folder: str | os.PathLike[str]) -> bool:
    """Check `folder/pylomin.json` against the digest it carries; False when it carries none (version 1).

    `read` does not check it: loading needs only what the folder holds to agree with itself, which
    the unit files' sizes and headers show. This finds what those cannot, a unit deleted by hand.

    Raises:
        PylominError: the manifest was edited after it was written.
    """
    path = Path(folder) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PylominError(f"`{path}` is not valid JSON ({e}); convert the model again") from None
    if not isinstance(doc, dict):
        raise PylominError(f"`{path}` is not a pylomin manifest; convert the model again")
    if "digest" not in doc and doc.get("format_version") == 1:
        logger.warning(
            "`%s` was written by an earlier pylomin and carries no digest: a unit removed from it by hand "
            "cannot be found; convert the model again to add one",
            path,
        )
        return False
    if doc.get("digest") != digest(doc):
        raise PylominError(
            f"`{path}` does not match its digest: it was edited after conversion (a unit or tensor removed or "
            "changed by hand?), so its unit files may not be the whole model; convert the model again"
        )
    return True


def _unit_from_json(u: dict[str, Any], folder: Path) -> Unit:
    # Types are checked, not coerced: `str()` of a dict is a valid-looking file name.
    file, name, modules, tensors = u["file"], u["name"], u["modules"], u["tensors"]
    if not isinstance(file, str) or not isinstance(name, str) or not isinstance(tensors, dict):
        raise TypeError(f"unit {name!r}: `file`, `name` must be strings and `tensors` an object")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise TypeError(f"unit {name!r}: `modules` must be a list of strings")
    resolve_inside(folder, file)
    infos = {}
    for tname, t in tensors.items():
        shape, dtype = t["shape"], t["dtype"]
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise TypeError(f"tensor `{tname}` has a malformed shape {shape!r}")
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(f"tensor `{tname}` has unknown dtype {dtype!r}")
        infos[tname] = TensorInfo(dtype, tuple(shape), _int(t["offset"]), _int(t["length"]))
    return Unit(name, file, _int(u["size"]), str(u["checksum"]), list(modules), infos)


def _layout_from_json(layout: object) -> dict[str, str] | None:
    if layout is None:
        return None
    keys = {"transformers", "model_cls", "mapping"}
    if not isinstance(layout, dict) or set(layout) != keys or not all(isinstance(v, str) for v in layout.values()):
        raise TypeError(f"`layout` must be null or an object with string fields {sorted(keys)}, got {layout!r}")
    return dict(layout)


def _int(x: object) -> int:
    if type(x) is not int or x < 0:
        raise TypeError(f"expected a non-negative integer, got {x!r}")
    return x


def enclosing_module(module: str, modules: Set[str] | Mapping[str, object]) -> str | None:
    """The deepest of `modules` that is `module` or encloses it (`""` is the root); None if none does."""
    while module not in modules:
        if not module:
            return None
        module = module.rpartition(".")[0]
    return module


def resolve_inside(folder: Path, relative: str) -> Path:
    """`folder/relative`, refusing absolute paths, `..` and symlinks that leave `folder`."""
    if os.path.isabs(relative) or ".." in Path(relative).parts:
        raise PylominError(f"unit path `{relative}` escapes the folder `{folder}`; the manifest is not trustworthy")
    path = folder / relative
    try:
        outside = path.exists() and not path.resolve().is_relative_to(folder.resolve())
    except OSError as e:  # a name too long, a symlink loop
        raise PylominError(f"unit path `{relative[:200]}` cannot be used ({e.strerror})") from None
    if outside:
        raise PylominError(f"unit path `{relative}` resolves outside `{folder}` (symlink); refusing to read it")
    return path
