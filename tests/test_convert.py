"""The converter: every input format, bit-identical unit files, aliases, dtype casts, atomic output."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import pylomin
from pylomin.converter.convert import plan_units
from pylomin.format import manifest as fmt
from pylomin.format.header import DATA_ALIGN, PADDING_PREFIX, is_padding
from pylomin.runtime.store import Store
from pylomin.tools.memory import PeakRss
from tests import models, python
from tests.conftest import misaligned_tensors


def read_back(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every unit file, read with plain safetensors, plus the manifest's aliases."""
    m = fmt.read(folder)
    out: dict[str, torch.Tensor] = {}
    for unit in m.units:
        with safe_open(folder / unit.file, framework="pt") as f:
            names = [n for n in f.keys() if not is_padding(n)]  # noqa: SIM118 (safe_open is not iterable)
            assert set(names) == set(unit.tensors), unit.file
            for name in names:
                out[name] = f.get_tensor(name)
    for alias, target in m.aliases.items():
        out[alias] = out[target]
    return out


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


def save_sharded_bin(state: dict[str, torch.Tensor], folder: Path) -> None:
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    for file, keys in shards.items():
        torch.save({k: state[k] for k in keys}, folder / file)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("layout", ["safetensors", "sharded-safetensors", "bin", "sharded-bin", "file-st", "file-bin"])
def test_roundtrip_every_format(name: str, layout: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = models.HF_MODELS[name]()
    state = model.state_dict()
    src = tmp_path / "src"
    if layout == "safetensors":
        model.save_pretrained(src)
    elif layout == "sharded-safetensors":
        model.save_pretrained(src, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").is_file()
    elif layout in ("bin", "sharded-bin"):
        src.mkdir()
        model.config.save_pretrained(src)
        if layout == "bin":
            torch.save(state, src / "pytorch_model.bin")
        else:
            save_sharded_bin(state, src)
    elif layout == "file-st":
        src = tmp_path / "model.safetensors"
        seen: set[int] = set()  # safetensors refuses shared tensors: keep the first name of each
        save_file({k: v for k, v in state.items() if not (v.data_ptr() in seen or seen.add(v.data_ptr()))}, src)
    else:
        src = tmp_path / "model.pt"
        torch.save(state, src)

    out = pylomin.convert(src, tmp_path / "out", progress=False)
    got = read_back(out)
    if layout in ("safetensors", "sharded-safetensors", "file-st") and name == "gpt2":
        # safetensors checkpoints drop the tied head; the runtime ties it back.
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if layout in ("bin", "file-bin") and name == "gpt2":
        assert fmt.read(out).aliases == {"lm_head.weight": "transformer.wte.weight"}
    assert_same(got, dict(state) if "safetensors" not in layout else {k: state[k] for k in got})
    if src.is_dir():
        assert "config.json" in fmt.read(out).extra_files and (out / "config.json").is_file()


def test_tensors_are_aligned_and_files_are_plain_safetensors(hf_dir, converted) -> None:
    folder = converted("llama")
    m = fmt.read(folder)
    for unit in m.units:
        assert all(info.offset % DATA_ALIGN == 0 for info in unit.tensors.values()), unit.name
    # Plain safetensors reads each unit file, finds every tensor at the manifest's offset, and gets the
    # source checkpoint's values: the offsets checked above are where the data really is.
    source = load_file(hf_dir("llama") / "model.safetensors")
    got: dict[str, torch.Tensor] = {}
    for unit in m.units:
        data = (folder / unit.file).read_bytes()
        (header,) = struct.unpack("<Q", data[:8])
        assert (8 + header) % DATA_ALIGN == 0, f"`{unit.file}`: data starts at byte {8 + header}"
        tensors = {k: v for k, v in load_file(folder / unit.file).items() if not is_padding(k)}
        assert set(tensors) == set(unit.tensors), unit.file
        for name, info in unit.tensors.items():
            raw = tensors[name].reshape(-1).view(torch.uint8).numpy().tobytes()
            assert data[info.offset : info.offset + info.length] == raw, f"`{name}` is not at offset {info.offset}"
        got.update(tensors)
    assert_same(got, {k: source[k] for k in got})
    assert set(source) <= set(got) | set(m.aliases)


def odd_bert() -> torch.nn.Module:
    """A BERT whose sizes are no multiples of 64 bytes: hidden 72 (a 288-byte norm), intermediate 100 (400 bytes)."""
    import transformers

    cfg = transformers.BertConfig(
        vocab_size=models.VOCAB,
        hidden_size=72,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=100,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("dtype", [None, "float16"])
@pytest.mark.parametrize("unit", ["block", "leaf"])
def test_every_tensor_is_64_byte_aligned_whatever_its_size(unit: str, dtype: str | None, tmp_path: Path) -> None:
    import transformers

    torch.manual_seed(0)
    model = odd_bert()
    model.save_pretrained(tmp_path / "src")
    out = pylomin.convert(tmp_path / "src", tmp_path / "out", unit=unit, dtype=dtype, progress=False)
    m = fmt.read(out)
    assert any(info.length % 64 for u in m.units for info in u.tensors.values())  # the case in question
    assert misaligned_tensors(out) == []
    want = {
        k: v.to(torch.float16) if dtype else v for k, v in load_file(tmp_path / "src" / "model.safetensors").items()
    }
    assert_same(read_back(out), want)  # plain safetensors reads every file, padding entries and all
    with Store(out, m) as store:  # zero-copy views of the mapped files: at 64-byte aligned addresses
        for name in m.tensor_index():
            view = store.view(name)
            assert view.data_ptr() % 64 == 0 and torch.equal(view, want[name]), name
    streamed = pylomin.load_streaming(out, transformers.BertModel, dtype=dtype)
    model = model.to(torch.float16) if dtype else model
    with torch.no_grad():
        x = models.ids(3, 17)
        assert torch.equal(streamed(x).last_hidden_state, model(x).last_hidden_state)


@pytest.mark.parametrize("dtype", [None, "float16"])
def test_odd_sizes_and_every_dtype_are_aligned(dtype: str | None, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state = {
        "m.bool": torch.tensor([True, False, True]),
        "m.i8": torch.arange(5, dtype=torch.int8),
        "m.u8": torch.arange(7, dtype=torch.uint8),
        "m.f16": torch.randn(3, generator=g).half(),
        "m.bf16": torch.randn(5, generator=g).bfloat16(),
        "m.f32": torch.randn(7, generator=g),
        "m.f64": torch.randn(3, generator=g, dtype=torch.float64),
        "m.i64": torch.tensor([-3]),
        "m.empty": torch.empty(0, 4),
        "m.scalar": torch.tensor(2.5),
        "m.whole": torch.randn(4, 4, generator=g),  # 64 bytes
    }
    save_file(state, tmp_path / "m.safetensors")
    out = pylomin.convert(tmp_path / "m.safetensors", tmp_path / "out", dtype=dtype, progress=False)
    (unit,) = fmt.read(out).units
    assert misaligned_tensors(out) == [] and all(i.offset % 64 == 0 for i in unit.tensors.values())
    cast = {k: v.half() if dtype and v.is_floating_point() else v for k, v in state.items()}
    assert_same(read_back(out), cast)
    padding = [n for n in safe_open(out / unit.file, "pt").keys() if is_padding(n)]  # noqa: SIM118
    assert 0 < len(padding) < len(state)  # only after sizes that are not 64-byte multiples, never after the last


def test_a_source_tensor_with_a_padding_name_is_refused(tmp_path: Path) -> None:
    save_file({"a.weight": torch.ones(3), f"{PADDING_PREFIX}0": torch.ones(2)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=f"`{tmp_path / 'm.safetensors'}` holds tensor `__pylomin_padding_0`"):
        pylomin.convert(tmp_path / "m.safetensors", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unit_plan() -> None:
    names = [
        "embeddings.word.weight",
        "embeddings.LayerNorm.weight",
        "encoder.layer.0.attn.q.weight",
        "encoder.layer.0.attn.q.bias",
        "encoder.layer.1.attn.q.weight",
        "encoder.layer.2.attn.q.weight",
        "encoder.layer.10.attn.q.weight",
        "scale",
    ]
    assert plan_units(names) == {
        "": [""],
        "embeddings.LayerNorm": ["embeddings.LayerNorm"],
        "embeddings.word": ["embeddings.word"],
        "encoder.layer.0": ["encoder.layer.0"],
        "encoder.layer.1": ["encoder.layer.1"],
        "encoder.layer.2": ["encoder.layer.2"],
        "encoder.layer.10": ["encoder.layer.10"],
    }
    assert list(plan_units(names, blocks_per_unit=2))[3:] == [
        "encoder.layer.0-1",
        "encoder.layer.2",
        "encoder.layer.10",
    ]
    assert plan_units(names, blocks_per_unit=2)["encoder.layer.0-1"] == ["encoder.layer.0", "encoder.layer.1"]
    assert "encoder.layer.0.attn.q" in plan_units(names, unit="leaf")
    assert plan_units(["0.weight", "1.weight", "1.bias"]) == {"0": ["0"], "1": ["1"]}


@pytest.mark.parametrize(("unit", "bpu", "count"), [("block", 1, 3 + 3), ("leaf", 1, 3 * 6 + 3), ("block", 2, 2 + 3)])
def test_granularity(converted, unit: str, bpu: int, count: int, hf_dir) -> None:
    m = fmt.read(converted("gpt2", unit=unit, blocks_per_unit=bpu))
    # gpt2: 3 blocks of 6 leaves (ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj) + wte, wpe, ln_f
    names = [u.name for u in m.units]
    assert len(set(names)) == len(names) == count
    stored = {n for u in m.units for n in u.tensors}
    from safetensors.torch import load_file

    assert stored == set(load_file(hf_dir("gpt2") / "model.safetensors"))
    if unit == "block":
        assert ("transformer.h.0-1" in names) == (bpu == 2)
    else:
        assert "transformer.h.0.attn.c_attn" in names


def test_dtype_cast_keeps_integers(tmp_path: Path) -> None:
    state = {
        "a.weight": torch.randn(5, 7),
        "a.steps": torch.arange(10, dtype=torch.int64),
        "a.mask": torch.tensor([True, False]),
        "b.weight": torch.randn(3).to(torch.bfloat16),
    }
    save_file(state, tmp_path / "m.safetensors")
    out = pylomin.convert(tmp_path / "m.safetensors", tmp_path / "out", dtype="float16", progress=False)
    got = read_back(out)
    assert got["a.weight"].dtype == torch.float16 and torch.equal(got["a.weight"], state["a.weight"].half())
    assert torch.equal(got["b.weight"], state["b.weight"].half())
    assert torch.equal(got["a.steps"], state["a.steps"]) and torch.equal(got["a.mask"], state["a.mask"])
    assert fmt.read(out).dtype == "float16"


def test_large_tensor_is_copied_in_bounded_memory(tmp_path: Path) -> None:
    big = torch.randn(48 * 2**20 // 4)  # 48 MiB, three chunks
    save_file({"emb.weight": big, "x.bias": torch.ones(3)}, tmp_path / "m.safetensors")
    torch.save({"emb.weight": big}, tmp_path / "m.bin")
    for src in ("m.safetensors", "m.bin"):
        with PeakRss() as peak:
            out = pylomin.convert(tmp_path / src, tmp_path / f"out-{src}", progress=False)
        assert peak.total < 40 * 2**20, (src, peak)
        assert torch.equal(read_back(out)["emb.weight"], big)


def test_shared_storage_in_bin_is_stored_once(tmp_path: Path) -> None:
    w = torch.randn(4, 4)
    torch.save({"enc.weight": w, "dec.weight": w, "part.weight": w[1:]}, tmp_path / "m.bin")
    out = pylomin.convert(tmp_path / "m.bin", tmp_path / "out", progress=False)
    m = fmt.read(out)
    assert m.aliases == {"dec.weight": "enc.weight"}
    got = read_back(out)
    assert torch.equal(got["dec.weight"], w) and torch.equal(got["part.weight"], w[1:])


def test_refuses_non_empty_out_dir_unless_overwrite(hf_dir, tmp_path: Path) -> None:
    out = tmp_path / "out"
    pylomin.convert(hf_dir("bert"), out, progress=False)
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        pylomin.convert(hf_dir("bert"), out, progress=False)
    assert (out / "keep.txt").is_file()
    pylomin.convert(hf_dir("bert"), out, overwrite=True, progress=False)  # an earlier output: replaced
    assert not (out / "keep.txt").exists() and (out / fmt.MANIFEST_NAME).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_leaves_nothing_behind(tmp_path: Path) -> None:
    save_file({"a.weight": torch.randn(64, 64), "b.weight": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    with open(tmp_path / "m.safetensors", "r+b") as f:  # truncate the data of the second tensor
        f.truncate(os.path.getsize(tmp_path / "m.safetensors") - 100)
    with pytest.raises(pylomin.PylominError, match="m.safetensors"):
        pylomin.convert(tmp_path / "m.safetensors", tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_stale_temp_folder_of_a_dead_converter_is_removed(hf_dir, tmp_path: Path) -> None:
    stale = tmp_path / ".out.pylomin-tmp-999999999-abc"
    stale.mkdir()
    (stale / "units").mkdir()
    pylomin.convert(hf_dir("bert"), tmp_path / "out", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class Evil:
    def __reduce__(self):  # noqa: D105
        return (os.getcwd, ())


@pytest.mark.parametrize(
    ("setup", "error", "match"),
    [
        ("missing", FileNotFoundError, "does not exist"),
        ("empty-folder", pylomin.PylominError, "no weights found in"),
        ("corrupt-header", pylomin.PylominError, "corrupt safetensors header"),
        ("not-json-header", pylomin.PylominError, "corrupt safetensors header"),
        ("unsafe-bin", pylomin.PylominError, "needs unsafe unpickling"),
        ("not-a-state-dict", pylomin.PylominError, "does not hold a state dict"),
        ("garbage-bin", pylomin.PylominError, "cannot be read as a torch checkpoint"),
    ],
)
def test_bad_input_names_the_file(setup: str, error: type[Exception], match: str, tmp_path: Path) -> None:
    src = tmp_path / "bad"
    if setup == "empty-folder":
        src.mkdir()
    elif setup == "corrupt-header":
        src = tmp_path / "bad.safetensors"
        src.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    elif setup == "not-json-header":
        src = tmp_path / "bad.safetensors"
        src.write_bytes((8).to_bytes(8, "little") + b"{not js}")
    elif setup == "unsafe-bin":
        src = tmp_path / "bad.bin"
        torch.save({"w": torch.ones(2), "evil": Evil()}, src)
    elif setup == "not-a-state-dict":
        src = tmp_path / "bad.pt"
        torch.save([torch.ones(2)], src)
    elif setup == "garbage-bin":
        src = tmp_path / "bad.bin"
        src.write_bytes(b"PK\x03\x04 definitely not a zip")
    with pytest.raises(error, match=match) as e:
        pylomin.convert(src, tmp_path / "out", progress=False)
    assert str(src) in str(e.value)
    assert not (tmp_path / "out").exists()


def test_cli_convert_info_verify(hf_dir, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pylomin.tools.cli import convert_main, main

    out = tmp_path / "out"
    assert convert_main([str(hf_dir("gpt2")), str(out), "--quiet", "--unit", "leaf"]) == 0
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "transformer.h.0.attn.c_attn" in text and "MiB" in text
    assert main(["verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out
    assert main(["convert", str(hf_dir("gpt2")), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pylomin: error: ") and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert convert_main([str(tmp_path / "nope"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pylomin-convert: error: ") and "nope" in err and "Traceback" not in err


def test_verify_finds_a_unit_deleted_by_hand(converted, tmp_path: Path) -> None:
    folder = tmp_path / "gpt2"
    shutil.copytree(converted("gpt2"), folder)
    assert python.cli("verify", str(folder)).returncode == 0
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    gone = doc["units"].pop(2)  # from the list and from the disk: every file still listed checks out
    (folder / gone["file"]).unlink()
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc, indent=1))
    r = python.cli("verify", str(folder))
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith(f"pylomin: error: `{folder / fmt.MANIFEST_NAME}` does not match its digest"), r.stderr
    assert "convert the model again" in r.stderr
    import transformers

    # Loading it says the same, not that the class is wrong.
    with pytest.raises(pylomin.PylominError, match="does not match its digest: it was edited after conversion"):
        pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)


def test_a_version_1_folder_still_loads_and_verifies(converted, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "gpt2"
    shutil.copytree(converted("gpt2"), folder)
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    del doc["digest"]
    doc["format_version"] = 1  # as the previous pylomin wrote it (its unit files had no padding entries)
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc, indent=1))
    assert pylomin.verify(folder).format_version == 1
    assert "carries no digest" in caplog.text and "convert the model again" in caplog.text
    import transformers

    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)
    with torch.no_grad():
        model(models.ids(1, 4))


def test_cli_entry_points_installed(tmp_path: Path) -> None:
    import subprocess
    import sys

    exe = Path(sys.executable).parent / "pylomin-convert"
    res = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "example:" in res.stdout
    res = subprocess.run([str(exe), str(tmp_path / "missing"), str(tmp_path / "o")], capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr and "missing" in res.stderr
    shutil.rmtree(tmp_path / "o", ignore_errors=True)
