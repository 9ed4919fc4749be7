"""The operating-system calls pylomin makes, in one place: libc through ctypes, page hints, page rounding."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

# The C library, loaded once for the whole package. ctypes releases the GIL for the length of each
# call, so a madvise that blocks on the disk lets the other Python threads run.
libc = ctypes.CDLL(None, use_errno=True)
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

PAGE = mmap.PAGESIZE
MADV_RANDOM = mmap.MADV_RANDOM
MADV_DONTNEED = mmap.MADV_DONTNEED
MADV_POPULATE_READ = 22  # Linux >= 5.14: fault pages in and map them, without touching them from Python


def page_range(offset: int, length: int, limit: int | None = None) -> tuple[int, int]:
    """The whole pages covering `[offset, offset + length)`: `(begin, end)`, end capped at `limit`."""
    begin = offset // PAGE * PAGE
    end = -(-(offset + length) // PAGE) * PAGE
    return begin, end if limit is None else min(end, limit)


def inner_page_range(offset: int, length: int, limit: int) -> tuple[int, int]:
    """The whole pages inside `[offset, offset + length)`: `(begin, end)`; a range ending at `limit` keeps its last page."""
    begin = -(-offset // PAGE) * PAGE
    end = limit if offset + length >= limit else (offset + length) // PAGE * PAGE
    return begin, max(begin, end)


def madvise(address: int, length: int, advice: int) -> int:
    """`madvise(2)` on `[address, address + length)`, widened to whole pages; returns 0 or the errno."""
    begin, end = page_range(address, length)
    if libc.madvise(begin, end - begin, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def drop_file_pages(address: int, length: int) -> None:
    """Unmap the pages of `[address, address + length)` from this process (MADV_DONTNEED).

    Only for a private file mapping this process never wrote to: a later access reads the file
    again. On any other memory (the heap, a copy) this would zero live bytes, so callers pass
    addresses inside such a mapping only.
    """
    if length > 0:
        madvise(address, length, MADV_DONTNEED)


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two directories atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return bool(fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0)


def trim_freed_memory() -> bool:
    """Return the free pages of the C heap to the kernel now (glibc `malloc_trim(0)`).

    Freed blocks below the mmap threshold stay in malloc's heaps and keep counting as resident;
    after dropping a model's parameters this gives back whole free pages among them (a default
    glibc process: 11.8 -> 6.4 MiB above baseline after `lazy_loading` on the 1.6 GiB BERT).
    Returns False where glibc is not the C library.
    """
    try:
        libc.malloc_trim(0)
        return True
    except AttributeError:
        return False


def set_mmap_threshold(threshold: int) -> bool:
    """glibc `mallopt(M_MMAP_THRESHOLD)`: allocations of `threshold` bytes or more get their own mapping."""
    try:
        return bool(libc.mallopt(-3, threshold))
    except AttributeError:
        return False
