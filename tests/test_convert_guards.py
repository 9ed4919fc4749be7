"""The converter never destroys what it reads or a folder it did not write: refused before anything is written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pylomin
from pylomin import manifest as fmt
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
