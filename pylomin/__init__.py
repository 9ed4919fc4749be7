"""pylomin: run PyTorch models whose weights do not fit in memory, streaming them from disk."""

from pylomin.convert import convert
from pylomin.errors import PylominError
from pylomin.store import verify
from pylomin.streaming import load_streaming, unload_

__version__ = "0.1.0"
__all__ = ["PylominError", "__version__", "convert", "load_streaming", "unload_", "verify"]
