"""A safetensors file's header: dtype codes, one entry per tensor, and the padding entries that align tensor data."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

import torch

from pylomin.errors import PylominError

# Every tensor's data starts at a multiple of this in its unit file, so a mapped tensor is 64-byte
# aligned like torch's own allocations (and SIMD kernels take the same path as for in-memory weights).
DATA_ALIGN = 64
# safetensors readers refuse gaps between tensors (data_offsets must be contiguous, and cover the whole
# file), so the bytes that align the next tensor are an entry of their own: `U8 [n]` zeros under a
# reserved name. Readers here skip these entries; the manifest never lists them.
PADDING_PREFIX = "__pylomin_padding_"
# A safetensors header larger than this is refused (the reference implementation uses 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (`torch.float32` -> `F32`)."""
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype `{dtype}` cannot be stored in safetensors") from None


def parse_dtype(name: str) -> torch.dtype:
    """`float16`, `torch.float16` or `F16` -> `torch.float16`."""
    if name in SAFETENSORS_DTYPES:
        return SAFETENSORS_DTYPES[name]
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype `{name}`; use e.g. float32, float16 or bfloat16")
    return dtype


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a unit file; `offset` is absolute in the file."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]


def encode_header(entries: list[tuple[str, torch.dtype, tuple[int, ...], int]]) -> tuple[bytes, dict[str, int]]:
    """Build a safetensors header for `(name, dtype, shape, nbytes)` entries stored in this order.

    The header is padded with spaces so data starts at a multiple of DATA_ALIGN, and a padding entry
    follows every tensor but the last whose size is not a multiple of it, so each tensor starts at
    one. Returns the header bytes (length prefix included) and each tensor's absolute byte offset in
    the file; the writer fills the bytes between one tensor's end and the next one's offset with zeros.

    >>> _, offsets = encode_header([("a", torch.float32, (3,), 12), ("b", torch.float32, (2,), 8)])
    >>> offsets
    {'a': 192, 'b': 256}
    """
    meta: dict[str, Any] = {}
    rel = 0
    starts: dict[str, int] = {}
    for i, (name, dtype, shape, nbytes) in enumerate(entries):
        if is_padding(name):
            raise ValueError(f"tensor `{name}` has a name pylomin reserves for alignment padding; rename it")
        starts[name] = rel
        meta[name] = {"dtype": dtype_code(dtype), "shape": list(shape), "data_offsets": [rel, rel + nbytes]}
        rel += nbytes
        gap = -rel % DATA_ALIGN
        if gap and i < len(entries) - 1:
            meta[f"{PADDING_PREFIX}{i}"] = {"dtype": "U8", "shape": [gap], "data_offsets": [rel, rel + gap]}
            rel += gap
    body = json.dumps(meta, separators=(",", ":")).encode()
    padded = -(-(8 + len(body)) // DATA_ALIGN) * DATA_ALIGN - 8
    body += b" " * (padded - len(body))
    data_start = 8 + len(body)
    return struct.pack("<Q", len(body)) + body, {name: data_start + start for name, start in starts.items()}


def is_padding(name: str) -> bool:
    """Whether `name` is an alignment padding entry of a unit file (never a tensor of the model)."""
    return name.startswith(PADDING_PREFIX)


def decode_header(path: str | os.PathLike[str], f: Any, file_size: int) -> dict[str, TensorInfo]:
    """Read and validate the header of the safetensors file open as `f`.

    Returns tensor name -> TensorInfo with absolute offsets, alignment padding entries left out;
    raises PylominError naming `path` when the header is corrupt or its offsets run past the end of
    the file.
    """
    f.seek(0)
    prefix = f.read(8)
    if len(prefix) < 8:
        raise PylominError(f"`{path}` is not a safetensors file (only {len(prefix)} bytes); it is truncated or corrupt")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES or 8 + n > file_size:
        raise PylominError(
            f"`{path}` has a corrupt safetensors header (declares {n} header bytes, file has {file_size}); "
            "the file is truncated or not safetensors"
        )
    raw = f.read(n)
    try:
        meta = json.loads(raw)
        if not isinstance(meta, dict):
            raise ValueError("header is not a JSON object")
        data_start = 8 + n
        out: dict[str, TensorInfo] = {}
        for name, t in meta.items():
            if name == "__metadata__":
                continue
            dtype = str(t["dtype"])
            if dtype not in SAFETENSORS_DTYPES:
                raise ValueError(f"tensor `{name}` has unsupported dtype {dtype!r}")
            shape = tuple(int(d) for d in t["shape"])
            begin, end = (int(x) for x in t["data_offsets"])
            numel = 1
            for d in shape:
                if d < 0:
                    raise ValueError(f"tensor `{name}` has negative shape {shape}")
                numel *= d
            itemsize = SAFETENSORS_DTYPES[dtype].itemsize
            if not 0 <= begin <= end or end - begin != numel * itemsize:
                raise ValueError(f"tensor `{name}`: offsets {begin}..{end} do not match shape {shape} {dtype}")
            out[name] = TensorInfo(dtype, shape, data_start + begin, end - begin)
    except (ValueError, KeyError, TypeError) as e:
        raise PylominError(f"`{path}` has a corrupt safetensors header ({e}); re-download or re-save it") from None
    data_end = max((t.offset + t.length for t in out.values()), default=8 + n)
    # Padding as encode_header writes it; any other entry under such a name is left for the caller to refuse.
    out = {k: t for k, t in out.items() if not (is_padding(k) and t.dtype == "U8" and 0 < t.length < DATA_ALIGN)}
    if data_end > file_size:
        raise PylominError(
            f"`{path}` is truncated: its header needs {data_end} bytes, the file has {file_size}; "
            "re-download or convert it again"
        )
    return out
