"""The converter never destroys what it reads or a folder it did not write, even one made while it runs."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import pylomin
from pylomin.converter.publish import _rename_claimed, _rename_noreplace
from pylomin.format import manifest as fmt
from pylomin.tools.cli import convert_main
from tests import python


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["itself", "inside", "parent"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_converting_a_folder_into_itself_is_refused(where: str, overwrite: bool, hf_dir, tmp_path: Path) -> None:
    src = tmp_path / "parent" / "gpt2"
    shutil.copytree(hf_dir("gpt2"), src)
    before = snapshot(tmp_path)
    out = {"itself": src, "inside": src / "converted", "parent": src.parent}[where]
    expected = {"itself": "is the source", "inside": "is inside the source", "parent": "holds the source"}[where]
    with pytest.raises(ValueError, match=f"OUT_DIR `.*` {expected} `.*`.*beside it"):
        pylomin.convert(src, out, overwrite=overwrite, progress=False)
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_a_weights_file_inside_out_dir_is_refused(tmp_path: Path) -> None:
    import torch

    torch.save({"a.weight": torch.ones(2)}, tmp_path / "m.pt")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="holds the source"):
        pylomin.convert(tmp_path / "m.pt", tmp_path, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before


def test_a_symlinked_out_dir_to_the_source_is_refused(hf_dir, tmp_path: Path) -> None:
    (tmp_path / "link").symlink_to(hf_dir("gpt2"))
    before = snapshot(hf_dir("gpt2"))
    with pytest.raises(ValueError, match="is the source"):
        pylomin.convert(hf_dir("gpt2"), tmp_path / "link", overwrite=True, progress=False)
    assert snapshot(hf_dir("gpt2")) == before


def test_overwrite_never_replaces_a_folder_pylomin_did_not_write(hf_dir, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=f"not a pylomin output.*no {fmt.MANIFEST_NAME}"):
        pylomin.convert(hf_dir("gpt2"), project, overwrite=True, progress=False)
    assert (project / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["project"]


def test_cli_convert_into_itself_is_a_one_line_error(hf_dir, tmp_path: Path) -> None:
    src = tmp_path / "gpt2"
    shutil.copytree(hf_dir("gpt2"), src)
    before = snapshot(src)
    r = python.cli("convert", str(src), str(src), "--overwrite", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("pylomin: error: OUT_DIR") and r.stderr.count("\n") == 1, r.stderr
    assert snapshot(src) == before


# --- OUT_DIR changing while the converter runs ---------------------------------------------------------


class AtTheSwap(logging.Handler):
    """Runs `action` once, in the converting thread, when the converter logs that it moves its folder into place.

    The converter's own log record is the hook: what `action` does happens between the conversion's
    start (and its check of OUT_DIR) and the rename, every time.
    """

    def __init__(self, action: Callable[[], None]) -> None:
        super().__init__(logging.DEBUG)
        self.action, self.ran = action, False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.ran and record.getMessage().startswith("moving "):
            self.ran = True
            self.action()


@contextlib.contextmanager
def at_the_swap(action: Callable[[], None]) -> Iterator[AtTheSwap]:
    log = logging.getLogger("pylomin.converter.convert")
    handler, level = AtTheSwap(action), log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert handler.ran, "the converter never reached the swap"


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".pylomin-tmp-" in p.name)


def user_folder(out: Path) -> None:
    out.mkdir()
    (out / "notes.txt").write_text("precious")


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_made_while_converting_is_left_alone(overwrite: bool, hf_dir, tmp_path: Path, capsys) -> None:
    out = tmp_path / "race"
    args = [str(hf_dir("gpt2")), str(out), "--quiet"] + ["--overwrite"] * overwrite
    with at_the_swap(lambda: user_folder(out)):
        assert convert_main(args) == 2
    err = capsys.readouterr().err
    why = "changed while converting and is not a pylomin output" if overwrite else "was created while converting"
    assert err.startswith(f"pylomin-convert: error: `{out}` {why}") and err.count("\n") == 1, err
    assert "it was left as it is and this conversion was removed" in err
    assert (out / "notes.txt").read_text() == "precious" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    assert temps(tmp_path) == []  # the conversion's own folder went, nothing else


def test_overwrite_checks_again_at_the_swap(hf_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pylomin.convert(hf_dir("gpt2"), out, progress=False)  # an earlier output: --overwrite may replace it...

    def swap_in_a_project() -> None:  # ...but by the end a project of the user's is there
        shutil.rmtree(out)
        user_folder(out)

    with at_the_swap(swap_in_a_project), pytest.raises(FileExistsError, match="changed while converting and is not"):
        pylomin.convert(hf_dir("gpt2"), out, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "precious" and temps(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_conversions_into_one_out_dir(overwrite: bool, hf_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    second: list[fmt.Manifest] = []
    with at_the_swap(lambda: second.append(pylomin.verify(pylomin.convert(hf_dir("bert"), out, progress=False)))):
        if overwrite:  # the second one's folder is an earlier pylomin output: replaced, as asked
            pylomin.convert(hf_dir("gpt2"), out, overwrite=True, progress=False)
        else:
            with pytest.raises(FileExistsError, match="was created while converting"):
                pylomin.convert(hf_dir("gpt2"), out, progress=False)
    winner = "gpt2" if overwrite else "bert"
    assert pylomin.verify(out).source["path"] == str(hf_dir(winner).resolve())
    assert temps(tmp_path) == [] and second


def test_an_empty_out_dir_is_replaced_but_not_one_that_fills(hf_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # allowed: an empty OUT_DIR
    pylomin.convert(hf_dir("gpt2"), out, progress=False)
    assert (out / fmt.MANIFEST_NAME).is_file()
    shutil.rmtree(out)
    out.mkdir()
    with at_the_swap(lambda: (out / "notes.txt").write_text("precious")), pytest.raises(FileExistsError):
        pylomin.convert(hf_dir("gpt2"), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"] and temps(tmp_path) == []


def test_rename_without_renameat2_never_replaces_what_is_there(tmp_path: Path) -> None:
    # The fallback for C libraries and file systems without RENAME_NOREPLACE: mkdir claims the name.
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("ours")
    for there in ("folder", "empty-folder", "file"):
        dst = tmp_path / there
        dst.mkdir() if there != "file" else dst.write_text("theirs")
        if there == "folder":
            (dst / "b").write_text("theirs")
        assert _rename_claimed(src, dst) is False
        assert (src / "a").read_text() == "ours"
    assert (tmp_path / "folder" / "b").read_text() == "theirs" and (tmp_path / "file").read_text() == "theirs"
    assert not any((tmp_path / "empty-folder").iterdir())
    assert _rename_claimed(src, tmp_path / "new") is True and (tmp_path / "new" / "a").read_text() == "ours"
    assert _rename_noreplace(tmp_path / "new", tmp_path / "folder") is False
    assert _rename_noreplace(tmp_path / "new", tmp_path / "newer") is True


# --- Killed converters --------------------------------------------------------------------------------


def paused_converter(src: Path, out: Path) -> subprocess.Popen[str]:
    """`pylomin-convert SRC OUT` in a fresh interpreter, stopped at the swap (its folder complete) until stdin closes."""
    code = f"""
        import logging, sys
        from pylomin.tools.cli import convert_main

        class Pause(logging.Handler):
            def emit(self, record):
                if record.getMessage().startswith("moving "):
                    print("READY", flush=True)
                    sys.stdin.read()

        log = logging.getLogger("pylomin.converter.convert")
        log.addHandler(Pause())
        log.setLevel(logging.DEBUG)
        sys.exit(convert_main([{str(src)!r}, {str(out)!r}, "--quiet"]))
    """
    proc = python.start(code, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "READY", proc.communicate()
    return proc


def checkpoint(folder: Path) -> Path:
    save_file({f"layers.{i}.weight": torch.randn(256, 256) for i in range(4)}, folder / "m.safetensors")
    return folder / "m.safetensors"  # 1 MiB


def test_sigterm_removes_the_temporary_folder(tmp_path: Path) -> None:
    src = checkpoint(tmp_path)
    proc = paused_converter(src, tmp_path / "out")
    (tmp,) = temps(tmp_path)
    assert sum(f.stat().st_size for f in (tmp_path / tmp).rglob("*")) > 2**20  # the whole model, in the temp
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err == "pylomin-convert: terminated (SIGTERM); nothing was left behind\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_killed_converters_folder_goes_with_the_next_conversion_beside_it(tmp_path: Path) -> None:
    src = checkpoint(tmp_path)
    proc = paused_converter(src, tmp_path / "out")
    (tmp,) = temps(tmp_path)
    pylomin.convert(src, tmp_path / "sibling", progress=False)  # a live converter's folder is kept
    assert temps(tmp_path) == [tmp]
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and temps(tmp_path) == [tmp]  # SIGKILL cannot be handled
    pylomin.convert(src, tmp_path / "another", progress=False)  # into any folder beside it
    assert temps(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["another", "m.safetensors", "sibling"]


def test_stale_folders_are_told_by_process_start_time_and_lock(tmp_path: Path) -> None:
    src = checkpoint(tmp_path)
    me = os.getpid()
    started = int(Path("/proc/self/stat").read_bytes().rpartition(b")")[2].split()[19])  # field 22: clock ticks
    reused = tmp_path / f".a.pylomin-tmp-{me}-{started + 1}-0bad"  # our pid, another start: a dead process
    live = tmp_path / f".b.pylomin-tmp-{me}-{started}-0a0a"  # this process, converting in another thread
    locked = tmp_path / ".c.pylomin-tmp-999999999-1-0c0c"  # no such pid here: another pid namespace...
    for folder in (reused, live, locked):
        folder.mkdir()
    fd = os.open(locked, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # ...whose converter holds the lock: it lives
        pylomin.convert(src, tmp_path / "out", progress=False)
        assert temps(tmp_path) == sorted([live.name, locked.name])
    finally:
        os.close(fd)
    pylomin.convert(src, tmp_path / "out2", progress=False)
    assert temps(tmp_path) == [live.name]


# --- Permissions --------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_output_honours_the_umask(umask: int, hf_dir, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir(mode=0o755)
    previous = os.umask(umask)
    try:
        new = pylomin.convert(hf_dir("gpt2"), tmp_path / "new", progress=False)
        empty = pylomin.convert(hf_dir("gpt2"), tmp_path / "empty", progress=False)
    finally:
        os.umask(previous)
    for out in (new, empty):
        for p in out.rglob("*"):
            want = (0o777 if p.is_dir() else 0o666) & ~umask
            assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    assert stat.S_IMODE(new.stat().st_mode) == 0o777 & ~umask
    assert stat.S_IMODE(empty.stat().st_mode) == 0o755  # a folder that was there keeps its mode, as with `cp`


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_replaced_folder_keeps_its_mode(overwrite: bool, hf_dir, tmp_path: Path) -> None:
    out = tmp_path / "private"
    out.mkdir(mode=0o700)
    if overwrite:
        pylomin.convert(hf_dir("gpt2"), out, progress=False)
        out.chmod(0o750)
    pylomin.convert(hf_dir("gpt2"), out, progress=False, overwrite=overwrite)
    assert stat.S_IMODE(out.stat().st_mode) == (0o750 if overwrite else 0o700)
