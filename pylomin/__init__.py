"""pylomin: run PyTorch models whose weights do not fit in memory, streaming them from disk."""

from pylomin.converter.convert import convert
from pylomin.embedding import ChunkedEmbedding, chunked_embedding
from pylomin.errors import PylominError
from pylomin.lazy import lazy_loading
from pylomin.quant import quantize_
from pylomin.runtime.store import verify
from pylomin.runtime.streaming import load_streaming, unload_
from pylomin.tools.profile import Profile, profile

__version__ = "0.1.0"
__all__ = [
    "ChunkedEmbedding",
    "Profile",
    "PylominError",
    "__version__",
    "chunked_embedding",
    "convert",
    "lazy_loading",
    "load_streaming",
    "profile",
    "quantize_",
    "unload_",
    "verify",
]
