"""The streaming runtime: bit-identical outputs, meta parameters, strict keys, threads, errors, unload."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file

import pylomin
from pylomin.format import manifest as fmt
from pylomin.tools.memory import PeakRss
from tests import models

HF_CLASSES = {
    "bert": transformers.BertModel,
    "gpt2": transformers.GPT2LMHeadModel,
    "llama": transformers.LlamaForCausalLM,
}
GRANULARITIES = [{}, {"unit": "leaf"}, {"blocks_per_unit": 2}]


def reference(hf_dir, name: str) -> torch.nn.Module:
    return models.pretrained(HF_CLASSES[name], hf_dir(name), dtype=torch.float32)


def main_output(out: object) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state  # type: ignore[attr-defined]


def assert_all_on_meta(model: torch.nn.Module) -> None:
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("options", GRANULARITIES, ids=["block", "leaf", "2-blocks"])
@pytest.mark.parametrize("name", [pytest.param("bert", marks=pytest.mark.bitexact), "gpt2", "llama"])
def test_forward_is_bit_identical(hf_dir, converted, name: str, options: dict) -> None:
    ref = reference(hf_dir, name)
    model = pylomin.load_streaming(converted(name, **options), HF_CLASSES[name], memory_budget=0)
    assert_all_on_meta(model)
    with torch.no_grad():
        for batch, seq in [(1, 5), (3, 17)]:
            x = models.ids(batch, seq)
            assert torch.equal(main_output(model(x)), main_output(ref(x)))
    assert_all_on_meta(model)
    for (n, b), (n2, b2) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        assert n == n2 and torch.equal(b, b2), n


@pytest.mark.parametrize("name", [pytest.param("gpt2", marks=pytest.mark.bitexact), "llama"])
def test_generate_with_kv_cache_is_bit_identical(hf_dir, converted, name: str) -> None:
    ref = reference(hf_dir, name)
    model = pylomin.load_streaming(converted(name), transformers.AutoModelForCausalLM)
    assert model.device == torch.device("cpu") and isinstance(model, HF_CLASSES[name])
    x = models.ids(2, 6)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(x))
    want = ref.generate(x, **kwargs, output_scores=True, return_dict_in_generate=True)
    got = model.generate(x, **kwargs, output_scores=True, return_dict_in_generate=True)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.scores, want.scores, strict=True))


def test_gpt2_tied_head_is_one_parameter(converted) -> None:
    model = pylomin.load_streaming(converted("gpt2"), transformers.GPT2LMHeadModel)
    assert model.lm_head.weight is model.transformer.wte.weight
    seen = []
    model.lm_head.register_forward_pre_hook(lambda m, a: seen.append(m.weight is model.transformer.wte.weight))
    with torch.no_grad():
        model(models.ids(1, 4))
    assert seen == [True]
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.parametrize("options", GRANULARITIES, ids=["block", "leaf", "2-blocks"])
def test_custom_module_with_factory(tmp_path: Path, options: dict) -> None:
    torch.manual_seed(0)
    ref = models.Custom().eval()
    torch.save(ref.state_dict(), tmp_path / "custom.pt")
    out = pylomin.convert(tmp_path / "custom.pt", tmp_path / "out", progress=False, **options)
    assert fmt.read(out).aliases == {"head.weight": "embed.weight"}
    model = pylomin.load_streaming(out, models.Custom, memory_budget=0)
    assert_all_on_meta(model)
    assert torch.equal(model.offset, ref.offset)  # non-persistent buffer computed in __init__
    with torch.no_grad():
        assert torch.equal(model(models.ids()), ref(models.ids()))
    assert_all_on_meta(model)


def test_dtype_casts_on_load(hf_dir, converted) -> None:
    ref = models.pretrained(transformers.LlamaForCausalLM, hf_dir("llama"), dtype=torch.bfloat16)
    model = pylomin.load_streaming(converted("llama"), transformers.LlamaForCausalLM, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(model(models.ids()).logits, ref(models.ids()).logits)


@pytest.mark.parametrize("drop_page_cache", [False, True], ids=["keep", "drop"])
def test_keep_page_cache_option(hf_dir, disk_dir: Path, drop_page_cache: bool) -> None:
    folder = pylomin.convert(hf_dir("bert"), disk_dir / "out", progress=False)
    files = [folder / u.file for u in fmt.read(folder).units]
    for f in files:  # written back, then out of the page cache: what is cached later, the forward read
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    assert not any(any(models.cached_pages(f)) for f in files)
    ref = reference(hf_dir, "bert")
    # prefetch=0: a reader thread reads the next forward's first units ahead, and those stay cached until it runs.
    model = pylomin.load_streaming(folder, transformers.BertModel, drop_page_cache=drop_page_cache, prefetch=0)
    with torch.no_grad():
        assert torch.equal(model(models.ids()).last_hidden_state, ref(models.ids()).last_hidden_state)
    pylomin.unload_(model)
    # Lookup tables are read by the rows a batch touches (random access): count the other units' pages.
    read_whole = [folder / u.file for u in fmt.read(folder).units if not u.name.endswith("_embeddings")]
    cached = [p for f in read_whole for p in models.cached_pages(f)]
    if drop_page_cache:
        # All of them: the kernel caches files in multi-page folios and drops a folio only when one
        # call covers it whole, so a released unit is dropped as one range (per tensor, 12 of these 38
        # pages stayed cached on Linux 6.18 ext4).
        assert not any(cached), f"{sum(cached)} of {len(cached)} pages still cached"
    else:
        assert all(cached), f"only {sum(cached)} of {len(cached)} pages cached"


def test_two_threads_share_one_model(hf_dir, converted) -> None:
    ref = reference(hf_dir, "llama")
    model = pylomin.load_streaming(converted("llama", unit="leaf"), transformers.LlamaForCausalLM, memory_budget=0)
    inputs = [models.ids(2, 9, seed=s) for s in range(4)]
    with torch.no_grad():
        want = [ref(x).logits for x in inputs]
    failures: list[str] = []

    def work(k: int) -> None:
        with torch.no_grad():
            for i in range(12):
                j = (i + k) % len(inputs)
                if not torch.equal(model(inputs[j]).logits, want[j]):
                    failures.append(f"thread {k} forward {i}")

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert_all_on_meta(model)


def test_exception_inside_forward_leaves_model_usable(hf_dir, converted) -> None:
    ref = reference(hf_dir, "bert")
    model = pylomin.load_streaming(converted("bert"), transformers.BertModel, memory_budget=0)
    with pytest.raises(IndexError), torch.no_grad():
        model(torch.full((1, 4), models.VOCAB + 5))  # token id past the vocabulary
    assert_all_on_meta(model)
    with torch.no_grad():
        assert torch.equal(model(models.ids()).last_hidden_state, ref(models.ids()).last_hidden_state)


def test_unload_removes_hooks_and_closes_files(converted, open_fds) -> None:
    folder = converted("gpt2")
    before = open_fds()
    model = pylomin.load_streaming(folder, transformers.GPT2LMHeadModel)
    # Per unit file: the mapping's own descriptor and the one page hints use (never re-opened by path).
    assert open_fds() == before + 2 * len(fmt.read(folder).units)
    assert pylomin.unload_(model) is model
    assert open_fds() == before
    assert type(model) is transformers.GPT2LMHeadModel
    # What is left: one pre-hook on the root that says the model was unloaded (its parameters are meta).
    assert not any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules() if m is not model)
    assert len(model._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="not a pylomin model"):
        pylomin.unload_(model)


def test_memory_stays_bounded(medium_bert: Path) -> None:
    """A 16-layer model of ~130 MiB: one forward peaks far below the model size."""
    out = medium_bert
    m = fmt.read(out)
    model = pylomin.load_streaming(out, transformers.BertModel, prefetch=0)
    x = torch.randint(0, 1000, (1, 32))
    with torch.no_grad():
        model(x)  # warm up allocator and kernels
        with PeakRss() as peak:
            model(x)
    largest = max(u.nbytes for u in m.units)
    assert m.nbytes > 120 * 2**20
    # Two units plus activations and allocator slack; loading it all would be > 120 MiB.
    assert peak.total < 2 * largest + 24 * 2**20, peak
    assert peak.file < 2 * largest + 4 * 2**20, peak


def test_mismatched_model_class(converted) -> None:
    with pytest.raises(pylomin.PylominError, match="describes a `gpt2` model, but `BertModel` is a `bert` class"):
        pylomin.load_streaming(converted("gpt2"), transformers.BertModel)
    with pytest.raises(pylomin.PylominError) as e:
        pylomin.load_streaming(converted("gpt2"), models.Custom)
    text = str(e.value)
    assert text.startswith("Error(s) in loading state_dict for Custom")
    assert '"embed.weight"' in text and '"transformer.wte.weight"' in text
    assert "Missing key(s)" in text and "Unexpected key(s)" in text


def test_shape_mismatch(tmp_path: Path) -> None:
    torch.save(models.Custom(dim=16).state_dict(), tmp_path / "c.pt")
    out = pylomin.convert(tmp_path / "c.pt", tmp_path / "out", progress=False)
    with pytest.raises(pylomin.PylominError, match=r"size mismatch for embed.weight: copying a param with shape"):
        pylomin.load_streaming(out, lambda: models.Custom(dim=8))


def test_old_checkpoint_with_position_ids_loads(hf_dir, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(hf_dir("bert") / "model.safetensors")
    state["embeddings.position_ids"] = torch.arange(64)[None]  # what older transformers saved
    src = tmp_path / "src"
    src.mkdir()
    save_file(state, src / "model.safetensors")
    (src / "config.json").write_text((hf_dir("bert") / "config.json").read_text())
    model = pylomin.load_streaming(pylomin.convert(src, tmp_path / "out", progress=False), transformers.BertModel)
    ref = reference(hf_dir, "bert")
    with torch.no_grad():
        assert torch.equal(model(models.ids()).last_hidden_state, ref(models.ids()).last_hidden_state)


def copy_folder(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate", "truncated or was replaced"),
        ("swap", "does not hold the tensors the manifest lists"),
        ("delete", "is missing"),
        ("newer-version", "format_version 99"),
        ("not-json", "is not valid JSON"),
        ("escape", "escapes the folder"),
        ("absolute", "escapes the folder"),
        ("symlink", "resolves outside"),
    ],
)
def test_damaged_folder_is_refused(converted, tmp_path: Path, damage: str, match: str) -> None:
    folder = copy_folder(converted("bert"), tmp_path / "c")
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    units = [folder / u["file"] for u in doc["units"]]
    if damage == "truncate":
        units[3].write_bytes(units[3].read_bytes()[:-10])
    elif damage == "swap":  # two encoder layers' files, of one size: only their headers tell them apart
        i, j = [k for k, u in enumerate(doc["units"]) if u["name"].startswith("encoder.layer.")][:2]
        a, b = units[i].read_bytes(), units[j].read_bytes()
        assert len(a) == len(b)
        units[i].write_bytes(b)
        units[j].write_bytes(a)
    elif damage == "delete":
        units[0].unlink()
    elif damage == "newer-version":
        doc["format_version"] = 99
    elif damage == "escape":
        doc["units"][0]["file"] = "../elsewhere.safetensors"
    elif damage == "absolute":
        doc["units"][0]["file"] = "/etc/passwd"
    elif damage == "symlink":
        outside = tmp_path / "outside.safetensors"
        outside.write_bytes(units[0].read_bytes())
        units[0].unlink()
        units[0].symlink_to(outside)
    if damage == "not-json":
        (folder / fmt.MANIFEST_NAME).write_text("{ oops")
    elif damage in ("swap", "newer-version", "escape", "absolute"):
        (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(pylomin.PylominError, match=match):
        pylomin.load_streaming(folder, transformers.BertModel)


def test_verify_finds_a_flipped_byte(converted, tmp_path: Path) -> None:
    folder = copy_folder(converted("bert"), tmp_path / "c")
    pylomin.verify(folder)
    unit = fmt.read(folder).units[-1]
    data = bytearray((folder / unit.file).read_bytes())
    data[-3] ^= 0x10
    (folder / unit.file).write_bytes(bytes(data))
    with pytest.raises(pylomin.PylominError, match=f"{unit.file}.*fails its checksum"):
        pylomin.verify(folder)


def test_missing_folder_and_config(converted, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="pylomin-convert"):
        pylomin.load_streaming(tmp_path / "nope", transformers.BertModel)
    folder = copy_folder(converted("bert"), tmp_path / "c")
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        pylomin.load_streaming(folder, transformers.BertModel)
