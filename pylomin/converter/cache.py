"""The cache of converted models: Hub repo ids as `org--name/<commit>/` with `refs/` naming revisions, and
local Hugging Face folders as `local--<path digest>/<content digest>/`."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from pylomin.converter import hub
from pylomin.format import manifest as fmt
from pylomin.format.quant import REVISION, Scheme

logger = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted-model cache: `cache_dir`, else `$PYLOMIN_CACHE`, else `$XDG_CACHE_HOME/pylomin` (~/.cache)."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("PYLOMIN_CACHE"):
        return Path(os.environ["PYLOMIN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pylomin"


def converted(
    repo_id: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_cls: Any = None,
    quantize: Scheme | None = None,
) -> Path:
    """The converted folder of `repo_id` at `revision`: from pylomin's cache, else downloaded and converted once.

    With a transformers `model_cls`, the tensors are converted to the layout that class holds at
    run time, and the cache keys the folder by class and transformers version as well as commit;
    with `quantize`, by the scheme too (`int8`, `int4-g64`; `+head` when the LM head is quantized too) and
    by the converter's quantization revision (`.r2`: a conversion an older pylomin made is not reused).
    A revision seen before resolves through the cache's `refs/` without touching the Hub. Two
    processes converting the same model wait on a lock; the second finds the first one's folder.
    """
    hf_cls = _hf_cls(model_cls)
    base = _repo_dir(repo_id, cache_dir)
    ref = base / "refs" / (revision or "main")
    commit = revision if revision and _COMMIT.match(revision) else _read(ref)
    if commit and (base / _folder_name(commit, hf_cls, quantize) / fmt.MANIFEST_NAME).is_file():
        return base / _folder_name(commit, hf_cls, quantize)
    src = hub.snapshot(repo_id, revision)
    commit = src.name if _COMMIT.match(src.name) else (revision or "main")
    out = base / _folder_name(commit, hf_cls, quantize)
    source: dict[str, object] = {"repo_id": repo_id, "revision": revision or "main", "commit": commit}
    _convert_once(src, out, source, f"`{repo_id}` ({commit})", progress=progress, model_cls=hf_cls, quantize=quantize)
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text(commit)
    return out


def converted_folder(
    src: Path,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    model_cls: Any = None,
    quantize: Scheme | None = None,
) -> Path:
    """The conversion of a local folder: from pylomin's cache, else converted once.

    `src` is a Hugging Face folder, or a folder pylomin converted already (holding the weights as
    stored) that a `quantize` scheme converts again (a self-draft, `load_streaming(..., quantize=)`).

    Keyed by the folder's absolute path and by the names, sizes and modification times of its files:
    a checkpoint changed in place is converted again (the earlier conversion stays until
    `pylomin cache rm local/<digest>`).
    """
    path = src.resolve()
    files = sorted(p for p in path.iterdir() if p.is_file())
    content = json.dumps([[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files])
    hf_cls = _hf_cls(model_cls)
    base = cache_root(cache_dir) / f"local--{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
    out = base / _folder_name(hashlib.sha256(content.encode()).hexdigest()[:16], hf_cls, quantize)
    if not (out / fmt.MANIFEST_NAME).is_file():
        source: dict[str, object] = {"path": str(path)}
        _convert_once(path, out, source, f"`{path}`", progress=progress, model_cls=hf_cls, quantize=quantize)
    return out


def _convert_once(
    src: Path, out: Path, source: dict[str, object], what: str, *, progress: bool, model_cls: Any, quantize: Any
) -> None:
    # Two processes converting the same model wait on a lock; the second finds the first one's folder.
    from filelock import FileLock

    # The conversion (tqdm, the layout code) is imported only for a model not in the cache yet.
    from pylomin.converter.convert import convert_local

    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f"{out.name}.lock")):
        if not (out / fmt.MANIFEST_NAME).is_file():
            logger.info("converting %s into the cache at `%s` (once; later loads use it)", what, out)
            convert_local(src, out, source, progress=progress, model_cls=model_cls, quantize=quantize)
            for older in _older_revisions(out):
                logger.warning(
                    "`%s` (%.0f MiB), an earlier pylomin's quantized conversion of the same model, is no longer "
                    "used: delete that folder to free its space",
                    older,
                    _size(older) / 2**20,
                )


def _older_revisions(out: Path) -> list[Path]:
    """The folders beside `out` holding the same quantized conversion by an earlier `format.quant.REVISION`."""
    match = re.fullmatch(r"(.+)\.r(\d+)", out.name)
    if match is None:
        return []
    stem, revision = match[1], int(match[2])
    names = {stem, *(f"{stem}.r{r}" for r in range(2, revision))}
    return sorted(p for p in out.parent.iterdir() if p.name in names and (p / fmt.MANIFEST_NAME).is_file())


def resolve(
    src: str,
    revision: str | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    model_cls: Any = None,
    quantize: Any = None,
) -> Path:
    """The runtime's way in to the converter: `src`, a local Hugging Face folder or a repo id, converted in the cache."""
    if Path(src).is_dir():
        return converted_folder(Path(src), cache_dir=cache_dir, model_cls=model_cls, quantize=quantize)
    if not hub.is_repo_id(src):
        raise FileNotFoundError(f"`{src}` does not exist; convert a model first with `pylomin-convert MODEL {src}`")
    return converted(src, revision, cache_dir=cache_dir, model_cls=model_cls, quantize=quantize)


def _hf_cls(model_cls: Any) -> type | None:
    # A transformers class: the converted layout, and so the cache key, depend on it.
    return model_cls if isinstance(model_cls, type) and hasattr(model_cls, "config_class") else None


def _folder_name(commit: str, hf_cls: type | None, quantize: Scheme | None = None) -> str:
    # The layout depends on the class and on the transformers version's conversion mapping; a quantized
    # folder on what the converter quantizes and how (`format.quant.REVISION`: from 2 on, in the name).
    name = commit
    if hf_cls is not None:
        import transformers

        name = f"{commit}.{hf_cls.__name__}.transformers-{transformers.__version__}"
    if quantize is None:
        return name
    return f"{name}.{quantize}{'+head' if quantize.head else ''}" + (f".r{REVISION}" if REVISION > 1 else "")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def list_cache(cache_dir: str | os.PathLike[str] | None = None) -> list[tuple[str, str, int]]:
    """(repo id, folder: the commit, and the class and transformers version of its layout, bytes on disk) of every converted model."""
    root = cache_root(cache_dir)
    out = []
    for base in sorted(root.glob("*")) if root.is_dir() else []:
        for folder in sorted(base.iterdir()):
            if (folder / fmt.MANIFEST_NAME).is_file():
                out.append((base.name.replace("--", "/", 1), folder.name, _size(folder)))
    return out


def remove_from_cache(repo_id: str, cache_dir: str | os.PathLike[str] | None = None) -> int:
    """Delete every converted revision of `repo_id`; returns the bytes freed."""
    base = _repo_dir(repo_id, cache_dir)
    if not base.is_dir():
        raise FileNotFoundError(f"`{repo_id}` is not in the pylomin cache at `{base.parent}`")
    size = _size(base)
    shutil.rmtree(base)
    return size


def _repo_dir(repo_id: str, cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / repo_id.replace("/", "--")


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
