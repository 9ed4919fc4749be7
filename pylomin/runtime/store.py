"""Unit files mapped once each: zero-copy tensor views, and telling the kernel which pages are done."""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import threading
import zlib
from pathlib import Path

import torch

from pylomin import _os
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.header import decode_header

logger = logging.getLogger(__name__)

_WILLNEED_CHUNK = 128 * 2**10  # the kernel's smallest read-ahead window: never above the cap


class Store:
    """Maps every unit file of a converted folder and hands out zero-copy views of its tensors.

    Sizes and headers are checked against the manifest before anything is mapped, so a truncated
    or swapped file is an error here, never a SIGBUS later.
    """

    def __init__(self, folder: str | os.PathLike[str], manifest: fmt.Manifest, *, drop_page_cache: bool = True):
        self.folder = Path(folder)
        self.manifest = manifest
        self.drop_page_cache = drop_page_cache
        self._index = manifest.tensor_index()
        self._paths: dict[str, Path] = {}
        # One descriptor per unit file, kept: page hints and reads act on the file that is mapped,
        # even after the folder is replaced or removed (re-convert, `pylomin cache rm`), and never
        # need a descriptor when the process has none left.
        self._fds: dict[str, int] = {}
        self._data: dict[str, tuple[int, int]] = {}  # per file: where its tensors' data begins and ends
        self._random: dict[str, list[tuple[int, int]]] = {}  # per file: page spans mapped random-access
        self._maps: dict[str, mmap.mmap] = {}
        self._addrs: dict[str, int] = {}
        self._populate_ok = True
        self._lock = threading.Lock()
        try:
            for unit in manifest.units:
                self._open(unit)
        except BaseException:
            self.close()
            raise

    def _open(self, unit: fmt.Unit) -> None:
        path = fmt.resolve_inside(self.folder, unit.file)
        if not path.is_file():
            raise PylominError(f"unit file `{path}` of unit `{unit.name}` is missing; convert the model again")
        self._paths[unit.file] = path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            hint = " (out of file descriptors: raise `ulimit -n`)" if e.errno == errno.EMFILE else ""
            raise PylominError(f"cannot open unit file `{path}`: {e.strerror}{hint}") from e
        self._fds[unit.file] = fd
        size = os.fstat(fd).st_size
        if size != unit.size:
            raise PylominError(
                f"unit file `{path}` has {size} bytes, the manifest says {unit.size}: it is truncated or was "
                "replaced; convert the model again"
            )
        # Only the header is wanted here: without the hint, the kernel's read-ahead of a file read
        # from its start pulls in the first tensors too (experts nobody chose, say).
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        with open(fd, "rb", closefd=False) as f:
            header = decode_header(path, f, size)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_NORMAL)
        if header != unit.tensors:
            raise PylominError(
                f"unit file `{path}` does not hold the tensors the manifest lists for unit `{unit.name}` "
                "(it was replaced or edited); convert the model again"
            )
        spans = [(t.offset, t.offset + t.length) for t in unit.tensors.values() if t.length]
        self._data[unit.file] = (min((b for b, _ in spans), default=size), max((e for _, e in spans), default=size))
        if size:
            # Private (copy-on-write) mapping: an in-place op on a parameter never reaches the file.
            m = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
            self._maps[unit.file] = m
            anchor = ctypes.c_char.from_buffer(m)
            self._addrs[unit.file] = ctypes.addressof(anchor)
            del anchor  # release the buffer export: the mapping stays closable

    def view(self, name: str) -> torch.Tensor:
        """A zero-copy CPU tensor over the mapped bytes of the stored tensor `name`."""
        unit, info = self._index[name]
        dtype = info.torch_dtype
        if info.length == 0:
            return torch.empty(info.shape, dtype=dtype)
        flat = torch.frombuffer(
            self._maps[unit.file], dtype=dtype, count=info.length // dtype.itemsize, offset=info.offset
        )
        return flat.view(info.shape)

    def location(self, name: str) -> fmt.Range:
        """Where the stored tensor `name` lies: its unit file, byte offset and length."""
        unit, info = self._index[name]
        return fmt.Range(unit.file, info.offset, info.length)

    def random_access(self, where: fmt.Range) -> None:
        """Tell the kernel a range is read a few rows at a time: no read-around on its page faults.

        Without this, each page fault in an embedding table reads and maps up to `read_ahead_kb`
        around it (8 MiB here), so a 128-token lookup can pull in most of the table.
        """
        file, offset, length = where
        m = self._maps.get(file)
        if m is None or length <= 0:
            return
        begin, end = _os.page_range(offset, length, len(m))
        m.madvise(_os.MADV_RANDOM, begin, end - begin)
        self._random.setdefault(file, []).append((begin, end))

    def prefetch(self, where: fmt.Range) -> None:
        """Make a range of a unit file resident before it is used (called from the reader thread).

        MADV_POPULATE_READ faults the pages in and maps them, so the compute thread takes no page
        faults (measured faster than MADV_WILLNEED or pread, see docs/design.md); kernels older than 5.14
        get a pread of the range into a scratch buffer, which fills the page cache.
        """
        file, offset, length = where
        m = self._maps.get(file)
        if m is None or length <= 0:
            return
        begin, end = _os.page_range(offset, length, len(m))
        if any(b < end and begin < e for b, e in self._random.get(file, ())):
            self._will_need(file, begin, end)  # no read-around there: faulting would read 4 KiB at a time
        self._populate(file, begin, end)

    def _populate(self, file: str, begin: int, end: int) -> None:
        if self._populate_ok:
            err = _os.madvise(self._addrs[file] + begin, end - begin, _os.MADV_POPULATE_READ)
            if err == 0:
                return
            if err != errno.EINVAL:  # EINVAL: kernel without MADV_POPULATE_READ; read instead
                raise OSError(err, f"{os.strerror(err)} while reading `{self._paths[file]}`")
            self._populate_ok = False
        fd = self._fds[file]
        buf = bytearray(min(end - begin, 8 * 2**20))
        pos = begin
        while pos < end:
            n = os.preadv(fd, [memoryview(buf)[: min(len(buf), end - pos)]], pos)
            if n <= 0:
                raise OSError(errno.EIO, f"`{self._paths[file]}` ends at byte {pos}, before {end}")
            pos += n

    def read_exactly(self, ranges: list[fmt.Range]) -> None:
        """Make exactly these ranges resident, all of their reads in flight at once.

        For ranges mapped random-access (fused experts): the kernel reads no pages around a fault
        there, so faulting them in would read 4 KiB at a time. `POSIX_FADV_WILLNEED` first queues
        each whole range as large reads (the disk's queue depth, not one range after another), then
        the pages are mapped from the page cache.
        """
        spans = self._spans(ranges)
        for span in spans:
            self._will_need(*span)
        for span in spans:
            self._populate(*span)

    def uncached(self, ranges: list[fmt.Range]) -> list[fmt.Range]:
        """The ranges with pages the kernel no longer caches (reclaimed, or never read): what resident
        tensors need read again at the disk's speed, not faulted in 4 KiB at a time."""
        return [
            r for r in ranges if r.file in self._addrs and not _os.all_cached(self._addrs[r.file] + r.offset, r.length)
        ]

    def will_need(self, ranges: list[fmt.Range]) -> None:
        """Queue reads of these ranges and return: `read_exactly` later finds them read or in flight."""
        for span in self._spans(ranges):
            self._will_need(*span)

    def _spans(self, ranges: list[fmt.Range]) -> list[tuple[str, int, int]]:
        # (file, begin, end) of each non-empty range of a mapped file, widened to whole pages.
        return [
            (file, *_os.page_range(offset, length, len(m)))
            for file, offset, length in ranges
            if (m := self._maps.get(file)) is not None and length > 0
        ]

    def _will_need(self, file: str, begin: int, end: int) -> None:
        """Queue reads of `[begin, end)` without waiting for them.

        The kernel reads at most the larger of the device's `read_ahead_kb` and `max_sectors_kb`
        (8 MiB here, 128 KiB by default) of one `POSIX_FADV_WILLNEED` and ignores the rest; the
        rest would then be faulted in a page at a time (measured: 0.07 GB/s instead of 1 GB/s for
        whole fused experts tensors). So a range is asked for in pieces of the smallest window.
        """
        fd = self._fds.get(file)
        if fd is None:
            return  # closed
        for pos in range(begin, end, _WILLNEED_CHUNK):
            os.posix_fadvise(fd, pos, min(_WILLNEED_CHUNK, end - pos), os.POSIX_FADV_WILLNEED)

    def release(self, where: fmt.Range) -> None:
        """Unmap the pages of a range from this process, and drop them from the page cache unless kept warm.

        Only whole pages inside the range go (rounded inward, as llama.cpp's `unmap_fragment` does):
        a page it shares with a neighbour, resident or a kept expert, stays. The file's header and
        the tail after its last tensor belong to no neighbour and go with the first and last tensor.
        The mapping is private and untouched, so a later access just reads the file again.
        """
        file, offset, length = where
        m = self._maps.get(file)
        fd = self._fds.get(file)
        if m is None or fd is None or length <= 0:
            return
        first, last = self._data[file]
        begin = 0 if offset <= first else offset
        end = len(m) if offset + length >= last else offset + length
        begin, end = _os.inner_page_range(begin, end - begin, len(m))
        if end <= begin:
            return
        m.madvise(_os.MADV_DONTNEED, begin, end - begin)
        if self.drop_page_cache:
            os.posix_fadvise(fd, begin, end - begin, os.POSIX_FADV_DONTNEED)

    def verify(self) -> None:
        """Check every unit file against the checksum in the manifest (reads all bytes)."""
        for unit in self.manifest.units:
            crc, pos, fd = 0, 0, self._fds[unit.file]  # the file that is mapped, as every read here
            while chunk := os.pread(fd, 16 * 2**20, pos):
                crc = zlib.crc32(chunk, crc)
                pos += len(chunk)
            if f"crc32:{crc:08x}" != unit.checksum:
                raise PylominError(
                    f"unit file `{self.folder / unit.file}` fails its checksum ({unit.checksum} expected, "
                    f"crc32:{crc:08x} found): it is corrupt; convert the model again"
                )

    def close(self) -> None:
        """Unmap and close every file; a mapping still viewed by a live tensor is left to the garbage collector.

        Unless kept warm, the files' pages also leave the page cache: what stayed resident (a memory
        budget's tensors, kept experts) leaves no copy behind.
        """
        with self._lock:
            for m in self._maps.values():
                try:
                    m.close()
                except BufferError:
                    logger.debug("a tensor still views a unit mapping; it closes when that tensor is freed")
            if self.drop_page_cache and self._maps:  # after unmapping: the kernel keeps mapped pages
                for fd in self._fds.values():
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self._maps.clear()
            self._addrs.clear()
            fds, self._fds = self._fds, {}
            for fd in fds.values():
                os.close(fd)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def verify(folder: str | os.PathLike[str]) -> fmt.Manifest:
    """Check a converted folder completely: manifest, sizes, headers, checksums and the manifest's digest.

    Raises:
        PylominError: naming the first file that does not match.
    """
    manifest = fmt.read(folder)
    fmt.check_digest(folder)  # is the list of units whole? (cheap: before reading every byte)
    with Store(folder, manifest) as store:
        store.verify()
    return manifest
