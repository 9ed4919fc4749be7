"""A finished conversion moved into place over nothing it may not replace, and the temporary folders it is built in."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import secrets
import shutil
import stat
from pathlib import Path

from pylomin import _os
from pylomin.format import manifest as fmt

logger = logging.getLogger(__name__)

_TMP_MARK = ".pylomin-tmp-"


def fsync_dir(path: Path) -> None:
    """Make the entries of folder `path` (files created, renamed or removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- Moving the finished folder into place: never over anything this conversion may not replace ---------


def move_into_place(tmp: Path, out: Path, *, empty_at_start: tuple[int, int] | None, overwrite: bool) -> None:
    """Rename the finished `tmp` to `out`, deciding at the rename what may be replaced there.

    `check_out` ran before the conversion, minutes or hours ago: a folder made at `out` since (by
    hand, or by a second conversion) must not be swapped out and deleted.
    """
    for _ in range(3):  # `out` may come and go between our calls; each round re-reads it
        if _rename_noreplace(tmp, out):
            break
        try:
            st = os.lstat(out)
        except FileNotFoundError:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        if is_dir:  # a folder that is replaced keeps its mode, as `cp` into an existing folder keeps it
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
        if is_dir and _is_empty(out) and (overwrite or (st.st_dev, st.st_ino) == empty_at_start):
            try:  # rename(2) replaces an empty folder only: one that fills meanwhile is refused by the kernel
                os.rename(tmp, out)
                break
            except OSError as e:
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                continue
        if overwrite and is_dir and (out / fmt.MANIFEST_NAME).is_file():
            _replace_output(tmp, out)
            break
        why = _NOT_AN_OUTPUT if overwrite else "was created while converting"
        raise _refusal(out, why)
    else:
        raise _refusal(out, "kept changing while converting")
    fsync_dir(out.parent)


def _replace_output(tmp: Path, out: Path) -> None:
    """Swap the finished `tmp` with the earlier output at `out`, and delete that one if it still is one after the swap."""
    if _os.exchange(tmp, out):
        # What came out is checked again: a folder put at `out` between the check and the swap goes back.
        if _replaceable(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if not _os.exchange(tmp, out):
            raise FileExistsError(
                f"`{out}` was replaced while converting by a folder that is not a pylomin output; it is now at "
                f"`{tmp}`, untouched, and the converted model at `{out}`: move them as you need"
            )
        raise _refusal(out, _NOT_AN_OUTPUT)
    # No atomic exchange here: the earlier output is moved aside, checked there, and deleted once ours is
    # in place. A crash between the two renames leaves no OUT_DIR (never a partial one) and a hidden
    # folder that the next conversion removes.
    aside = tmp.with_name(f"{tmp.name}-old")
    os.rename(out, aside)
    if not _replaceable(aside):
        if not _rename_noreplace(aside, out):
            raise FileExistsError(f"`{out}` changed while converting; what was there is now at `{aside}`, untouched")
        raise _refusal(out, _NOT_AN_OUTPUT)
    if not _rename_noreplace(tmp, out):
        shutil.rmtree(aside, ignore_errors=True)  # an earlier output, as --overwrite asked
        raise _refusal(out, "was created while converting")
    shutil.rmtree(aside, ignore_errors=True)


_NOT_AN_OUTPUT = f"changed while converting and is not a pylomin output (it has no {fmt.MANIFEST_NAME})"


def _refusal(out: Path, why: str) -> FileExistsError:
    return FileExistsError(
        f"`{out}` {why}; it was left as it is and this conversion was removed: remove `{out}` or choose another "
        "OUT_DIR, then convert again"
    )


def _replaceable(path: Path) -> bool:
    # A real folder (not a link to one) that is empty or holds a manifest: an earlier pylomin output.
    return path.is_dir() and not path.is_symlink() and (_is_empty(path) or (path / fmt.MANIFEST_NAME).is_file())


def _is_empty(path: Path) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


_RENAME_NOREPLACE = 1  # linux/fs.h
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename `src` to `dst` unless something exists at `dst`: True if renamed, False if `dst` exists.

    Linux `renameat2(RENAME_NOREPLACE)` checks and renames in one step. Where the C library or the
    file system lacks it (ENOSYS, EINVAL: glibc < 2.28, NFS, some FUSE file systems), `mkdir(dst)`
    claims the name first, failing if anything is there, and rename(2) then replaces that folder of
    ours, which it does only while the folder is still empty: nothing another process made at `dst`
    is ever replaced. What the fallback shows that renameat2 does not: an empty `dst`, for the
    instant between the two calls (or after a crash there, which a later conversion accepts).
    """
    fn = getattr(_os.libc, "renameat2", None)
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    return _rename_claimed(src, dst)


def _rename_claimed(src: Path, dst: Path) -> bool:
    """`_rename_noreplace` without renameat2: claim `dst` with mkdir, then replace that empty folder."""
    try:
        os.mkdir(dst)
    except FileExistsError:
        return False
    try:
        os.rename(src, dst)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST):  # someone wrote into the folder we claimed: it is theirs now
            return False
        os.rmdir(dst)  # still our empty folder
        raise
    return True


# --- Temporary folders: ours are locked while we live, a dead converter's are removed -------------------


def make_temp(out: Path) -> tuple[Path, int]:
    """A new hidden folder beside `out`, and a descriptor of it that holds an exclusive flock while we live.

    Its mode is 0777 less the umask, as `mkdir` and `cp` make folders (tempfile.mkdtemp's 0700 made every
    output private to its user). Its name carries this process's id and start time, read by
    `remove_stale_temps`.
    """
    prefix = f".{out.name[:100]}{_TMP_MARK}{os.getpid()}-{_start_time(os.getpid()) or 0}-"
    while True:
        tmp = out.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(tmp)
            break
        except FileExistsError:
            continue
    fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:  # a file system without locks: the process id alone tells others we live
        logger.debug("cannot lock `%s` (%s)", tmp, e.strerror)
    return tmp, fd


def dir_id(fd: int) -> tuple[int, int]:
    """The (device, inode) of the open folder `fd`: how `remove_own` recognizes the folder it made."""
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def empty_dir_id(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of `path` when it is a real, empty folder: the only such folder ours may replace."""
    try:
        st = os.lstat(path)
        return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) and _is_empty(path) else None
    except OSError:
        return None


def remove_own(tmp: Path, ident: tuple[int, int]) -> None:
    """Remove `tmp` only if it is the folder we made, recognized by its inode: after a refused swap it could hold another."""
    try:
        st = os.lstat(tmp)
    except OSError:
        return
    if (st.st_dev, st.st_ino) == ident:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(parent: Path) -> None:
    """Remove the temporary folders in `parent` whose converter is gone (killed: SIGKILL, a crash, a power cut).

    A folder is removed when its converter's process is gone (or its id now names a process started at
    another time: ids are reused) and no one holds its flock. The kernel drops a flock when its holder
    dies, whatever killed it, so the lock decides across pid namespaces (containers sharing a folder) and
    on network file systems that lock; the process check covers the instant between a folder's mkdir and
    its lock, and file systems without locks.
    """
    for p in parent.glob(f".*{_TMP_MARK}*"):
        fields = p.name.rpartition(_TMP_MARK)[2].split("-")
        if not fields[0].isdigit():
            continue
        started = int(fields[1]) if len(fields) >= 3 and fields[1].isdigit() else None  # older names: no start time
        if _alive(int(fields[0]), started):
            continue
        try:
            fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its converter lives, in another pid namespace or on another machine
            except OSError:
                pass  # no locks on this file system: the process check decided
            logger.info("removing `%s`, left by an interrupted conversion", p)
            shutil.rmtree(p, ignore_errors=True)
        finally:
            os.close(fd)


def _alive(pid: int, started: int | None) -> bool:
    """Whether process `pid` exists and, when `started` is known, is the one that started then."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # gone, or a number no process id can be
        return False
    except PermissionError:  # another user's process
        pass
    now = _start_time(pid)
    return not started or now is None or now == started  # no start time recorded or readable: the id decides


def _start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (`/proc/<pid>/stat` field 22); None without /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses: split after the last.
    return int(stat_line.rpartition(b")")[2].split()[19])
