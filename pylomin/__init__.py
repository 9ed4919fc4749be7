"""pylomin: run PyTorch models whose weights do not fit in memory, streaming them from disk."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from pylomin.errors import PylominError

# The public names resolve on first use (PEP 562), so that `import pylomin` imports no torch, and the
# CLI, which runs this file first, answers `--help` in a thirtieth of the time torch takes to import.
# An exported name must differ from every submodule's name: importing `pylomin.<name>` sets the package
# attribute `<name>` to the module, hiding the export (tests/test_layers.py checks it).
if TYPE_CHECKING:
    from pylomin.converter.convert import convert
    from pylomin.embedding import ChunkedEmbedding, chunked_embedding
    from pylomin.format.quant import Int4WeightOnly, Int8WeightOnly
    from pylomin.lazy import lazy_loading
    from pylomin.quantize import quantize_
    from pylomin.runtime.store import verify
    from pylomin.runtime.streaming import load_streaming, self_draft, unload_
    from pylomin.tools.plan import Estimate, estimate
    from pylomin.tools.profile import Profile, profile

_LAZY = {
    "convert": "pylomin.converter.convert",
    "ChunkedEmbedding": "pylomin.embedding",
    "chunked_embedding": "pylomin.embedding",
    "Int4WeightOnly": "pylomin.format.quant",
    "Int8WeightOnly": "pylomin.format.quant",
    "lazy_loading": "pylomin.lazy",
    "quantize_": "pylomin.quantize",
    "verify": "pylomin.runtime.store",
    "load_streaming": "pylomin.runtime.streaming",
    "unload_": "pylomin.runtime.streaming",
    "self_draft": "pylomin.runtime.streaming",
    "Estimate": "pylomin.tools.plan",
    "estimate": "pylomin.tools.plan",
    "Profile": "pylomin.tools.profile",
    "profile": "pylomin.tools.profile",
}

__version__ = "0.1.0"
__all__ = [
    "ChunkedEmbedding",
    "Estimate",
    "Int4WeightOnly",
    "Int8WeightOnly",
    "Profile",
    "PylominError",
    "__version__",
    "chunked_embedding",
    "convert",
    "estimate",
    "lazy_loading",
    "load_streaming",
    "profile",
    "quantize_",
    "self_draft",
    "unload_",
    "verify",
]


def __getattr__(name: str) -> object:
    if name not in _LAZY:
        raise AttributeError(f"module `pylomin` has no attribute `{name}`")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # resolved once; later lookups do not reach __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
