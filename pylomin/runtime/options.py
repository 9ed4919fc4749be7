"""The runtime options of a streamed model, checked once: what `load_streaming` and `lazy_loading` share."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from pylomin.format.header import parse_dtype


@dataclass(frozen=True)
class Options:
    """The options of a streamed model, checked; a bad one is a `ValueError` that says what is allowed."""

    device: torch.device
    dtype: torch.dtype | None
    drop_page_cache: bool | None  # None: chosen with the budget ("auto")
    prefetch: int
    prefetch_bytes: int
    memory_budget: int | None  # None: "auto", from the memory this process may use
    # Fused experts paged per expert (the router's choice); False reads them with their layer, like
    # any other tensor: only for benchmarks that compare the two.
    expert_paging: bool = True
    # The next layer's experts guessed from this layer's router input and read ahead (per-expert
    # paging only); False waits for each router: only for benchmarks that compare the two.
    expert_guessing: bool = True

    @classmethod
    def check(
        cls,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        drop_page_cache: bool | None = None,
        prefetch: int = 2,
        prefetch_bytes: int | str = "256MiB",
        memory_budget: int | str | None = "auto",
    ) -> Options:
        """Options from the user's arguments; a `ValueError` that says what is allowed for a bad one."""
        auto = memory_budget is None or isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
        return cls(
            device=_check_device(device),
            dtype=_check_dtype(dtype),
            drop_page_cache=None if drop_page_cache is None else _check_bool("drop_page_cache", drop_page_cache),
            prefetch=_check_count("prefetch", prefetch),
            prefetch_bytes=_check_size("prefetch_bytes", prefetch_bytes),
            memory_budget=None if auto else _check_size("memory_budget", memory_budget),  # type: ignore[arg-type]
        )


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(size: int | str) -> int:
    """`"2GiB"`, `"512MB"`, `"1.5 GiB"` or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. '512MiB', '2GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: pylomin streams to 'cpu' or a CUDA device ('cuda', 'cuda:N')")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r}, but this torch sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device={device!r}, but this machine has {count} CUDA device(s): use 'cuda:0'..'cuda:{count - 1}'"
        )
    return torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    cast = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if cast is not None and (not isinstance(cast, torch.dtype) or not cast.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: give a floating-point dtype (float32, float16, bfloat16) or None")
    return cast


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: give True or False")
    return value


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: give a whole number of units, 0 or more (0 turns it off)")
    return value


def _check_size(name: str, value: int | str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r}: give a number of bytes or a size such as '512MiB'")
    nbytes = parse_bytes(value)
    if nbytes < 0:
        raise ValueError(f"{name}={value!r}: a size cannot be negative")
    return nbytes
