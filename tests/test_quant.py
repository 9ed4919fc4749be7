"""Compressed units: int8 / int4 Linear layers converted, recorded, streamed, and refused when they cannot run."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import pylomin
from pylomin import Int4WeightOnly, Int8WeightOnly
from pylomin.converter import cache
from pylomin.converter.compress import skip_reason
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.quant import Quantization, Scheme, pack_digest, parse_scheme
from pylomin.runtime import kernels, quant
from pylomin.runtime.model import stream_of
from pylomin.tools import cli
from tests import models

VOCAB = 512


def llama(*, tied: bool = False, intermediate: int = 256) -> transformers.LlamaForCausalLM:
    """Linear layers large enough to be quantized (128 x 256), an untied head unless `tied`."""
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def gpt2() -> transformers.GPT2LMHeadModel:
    """transformers' Conv1D layers (weight [in, out]) and a head tied to the embeddings."""
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).eval()


def bert() -> transformers.BertModel:
    """Linear layers with biases."""
    cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256
    )
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def ids(seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, seq), generator=torch.Generator().manual_seed(seed))


def output(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """name -> a saved Hugging Face folder of that model (saved once)."""
    made: dict[str, Path] = {}
    builders: dict[str, Callable[[], torch.nn.Module]] = {
        "llama": llama,
        "bert": bert,
        "gpt2": gpt2,
        "tied": lambda: llama(tied=True),
        "odd": lambda: llama(intermediate=200),
    }

    def make(name: str) -> Path:
        if name not in made:
            made[name] = tmp_path_factory.mktemp(f"src-{name}")
            builders[name]().save_pretrained(made[name])  # type: ignore[operator]
        return made[name]

    return make


MODELS = [
    ("llama", transformers.LlamaForCausalLM, "model.layers.0.mlp.up_proj"),
    ("bert", transformers.BertModel, "encoder.layer.0.intermediate.dense"),  # biases
    ("gpt2", transformers.GPT2LMHeadModel, "transformer.h.0.mlp.c_fc"),  # Conv1D, weight [in, out]
]
# Run again under other CPU capabilities by `make test`: each scheme, each kind of layer, once.
BITEXACT = {("llama", "int8"), ("llama", "int4"), ("bert", "int8"), ("gpt2", "int4-g32")}


# Prompt lengths on both sides of PROMPT_ROWS: the kernel path (decode) and the dequantized one.
@pytest.mark.parametrize(
    ("spec", "name", "cls", "layer"),
    [
        pytest.param(spec, *m, id=f"{m[0]}-{spec}", marks=[pytest.mark.bitexact] if (m[0], spec) in BITEXACT else [])
        for m in MODELS
        for spec in ("int8", "int4", "int4-g32", "int4-g128")
    ],
)
def test_a_streamed_quantized_folder_equals_the_quantized_model_in_memory(
    saved: Callable[[str], Path], tmp_path: Path, spec: str, name: str, cls: type, layer: str
) -> None:
    folder = pylomin.convert(saved(name), tmp_path / "out", quantize=spec, progress=False)
    ref = models.pretrained(cls, saved(name))
    full = output(ref, ids(20))
    skipped = pylomin.quantize_(ref, spec)
    assert set(skipped) == set(fmt.read(folder).quantization.skipped)  # type: ignore[union-attr]
    for budget in ("auto", 0):
        model = pylomin.load_streaming(folder, cls, memory_budget=budget)
        assert isinstance(model.get_submodule(layer), quant.QuantLinear)
        for seq in (1, 5, kernels.PROMPT_ROWS - 1, kernels.PROMPT_ROWS, 40):
            assert torch.equal(output(model, ids(seq)), output(ref, ids(seq))), (budget, seq)
        pylomin.unload_(model)
    # Not bit-identity against the unquantized model: close, as the scheme allows.
    error = ((output(ref, ids(20)) - full).norm() / full.norm()).item()
    assert error < (0.05 if spec == "int8" else 0.4), error


def test_the_manifest_records_each_layer_and_the_files_hold_payload_and_scales(
    saved: Callable[[str], Path], tmp_path: Path
) -> None:
    plain = pylomin.convert(saved("llama"), tmp_path / "plain", progress=False)
    folder = pylomin.convert(saved("llama"), tmp_path / "int4", quantize=Int4WeightOnly(group_size=32), progress=False)
    m, p = fmt.read(folder), fmt.read(plain)
    q = m.quantization
    assert q is not None and q.scheme == Int4WeightOnly(32) and q.pack == pack_digest()
    assert q.skipped == {"lm_head": "the LM head (quantize it with --quantize-head / head=True)"}
    assert len(q.modules) == 2 * 7  # q, k, v, o, gate, up, down per layer
    assert q.modules["model.layers.1.mlp.down_proj"] == {"in_features": 256, "out_features": 128, "dtype": "float32"}
    index = m.tensor_index()
    _, payload = index["model.layers.1.mlp.down_proj.weight"]
    _, scales = index["model.layers.1.mlp.down_proj.scales"]
    assert (payload.dtype, payload.shape) == ("U8", (128, 128))
    assert (scales.dtype, scales.shape) == ("BF16", (256 // 32, 128, 2))
    # Embeddings, norms and the head are as stored.
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert index[name][1].dtype == "F32" and index[name][1].shape == p.tensor_index()[name][1].shape
    # Unit files stay plain safetensors: any reader opens them.
    unit, _ = index["model.layers.1.mlp.down_proj.weight"]
    with safe_open(folder / unit.file, "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").dtype == torch.uint8
    linear = sum(i.length for n, (_, i) in p.tensor_index().items() if n.rsplit(".", 1)[0] in q.modules)
    packed = sum(i.length for n, (_, i) in index.items() if n.rsplit(".", 1)[0] in q.modules)
    assert packed / linear < 0.17  # 4 bits of 32, and the scales


@pytest.mark.bitexact
def test_the_lm_head_is_quantized_when_asked_and_a_tied_one_never(saved: Callable[[str], Path], tmp_path: Path) -> None:
    scheme = Int8WeightOnly(head=True)
    folder = pylomin.convert(saved("llama"), tmp_path / "head", quantize=scheme, progress=False)
    q = fmt.read(folder).quantization
    assert q is not None and "lm_head" in q.modules and "lm_head" not in q.skipped and q.scheme == scheme
    assert json.loads((folder / fmt.MANIFEST_NAME).read_text())["quantization"]["head"] is True
    ref = models.pretrained(transformers.LlamaForCausalLM, saved("llama"))
    assert "lm_head" not in pylomin.quantize_(ref, scheme)
    assert isinstance(ref.lm_head, quant.Int8Linear)
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM, quantize=scheme)
    assert isinstance(model.lm_head, quant.Int8Linear)
    assert torch.equal(output(model, ids(3)), output(ref, ids(3)))
    # The string form quantizes no head: the folder says it holds one.
    with pytest.raises(ValueError, match=r"holds int8 weights \(the LM head quantized too\); a converted folder"):
        pylomin.load_streaming(folder, transformers.LlamaForCausalLM, quantize="int8")

    tied = pylomin.convert(saved("tied"), tmp_path / "tied", quantize=scheme, progress=False)
    q = fmt.read(tied).quantization
    assert q is not None and q.skipped["lm_head"] == "tied to another parameter"
    model = pylomin.load_streaming(tied, transformers.LlamaForCausalLM)
    assert type(model.lm_head) is torch.nn.Linear
    ref = models.pretrained(transformers.LlamaForCausalLM, saved("tied"))
    assert pylomin.quantize_(ref, scheme)["lm_head"] == "tied to another parameter"
    assert torch.equal(output(model, ids(3)), output(ref, ids(3)))


def test_layers_the_kernels_cannot_run_are_skipped_and_named(
    saved: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # intermediate 200: down_proj reads 200 inputs (not a multiple of 32), gate/up write 200 outputs.
    with caplog.at_level(logging.WARNING, logger="pylomin.converter.compress"):
        folder = pylomin.convert(saved("odd"), tmp_path / "int4", quantize="int4-g32", progress=False)
    q = fmt.read(folder).quantization
    assert q is not None
    assert q.skipped["model.layers.0.mlp.down_proj"] == "in_features 200 is not a multiple of the group size 32"
    assert q.skipped["model.layers.0.mlp.up_proj"] == "out_features 200 is not a multiple of 16"
    assert "model.layers.0.self_attn.q_proj" in q.modules
    assert "model.layers.0.mlp.down_proj (in_features 200 is not a multiple of the group size 32)" in caplog.text
    ref = models.pretrained(transformers.LlamaForCausalLM, saved("odd"))
    pylomin.quantize_(ref, "int4-g32")
    model = pylomin.load_streaming(folder, transformers.LlamaForCausalLM)
    assert isinstance(model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    assert torch.equal(output(model, ids(4)), output(ref, ids(4)))


@pytest.mark.parametrize(
    ("shape", "scheme", "reason"),
    [
        ((64, 256), Int8WeightOnly(), None),
        ((64, 100), Int8WeightOnly(), "in_features 100 is not a multiple of 32"),
        ((8, 64), Int8WeightOnly(), "small (8x64 < 4096 weights)"),
        ((256,), Int8WeightOnly(), "1-D weight"),
        ((72, 256), Int4WeightOnly(64), "out_features 72 is not a multiple of 16"),
        ((64, 96), Int4WeightOnly(64), "in_features 96 is not a multiple of the group size 64"),
        ((64, 192), Int4WeightOnly(64), None),
    ],
)
def test_skip_reason(shape: tuple[int, ...], scheme: Scheme, reason: str | None) -> None:
    assert skip_reason(shape, scheme) == reason


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("int8", Int8WeightOnly()),
        ("INT4", Int4WeightOnly(64)),
        (" int4-g32", Int4WeightOnly(32)),
        ("int4-g128", Int4WeightOnly(group_size=128)),
        (Int4WeightOnly(128, head=True), Int4WeightOnly(128, head=True)),
    ],
)
def test_a_scheme_string_parses_to_its_config(spec: str | Scheme, want: Scheme) -> None:
    assert parse_scheme(spec) == want
    # str() is the shorthand that parses back; a string never quantizes the head.
    assert parse_scheme(str(want)) == dataclasses.replace(want, head=False)


def test_a_config_equals_its_string_form() -> None:
    assert str(Int8WeightOnly()) == "int8" and str(Int4WeightOnly()) == "int4-g64"
    assert str(Int4WeightOnly(group_size=128, head=True)) == "int4-g128"
    assert parse_scheme("int4") == Int4WeightOnly() != Int4WeightOnly(head=True)
    assert Int8WeightOnly() != Int4WeightOnly() and len({Int8WeightOnly(), parse_scheme("int8")}) == 1
    assert repr(Int4WeightOnly(32)) == "Int4WeightOnly(group_size=32, head=False)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        Int8WeightOnly().head = True  # type: ignore[misc]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: parse_scheme("int2"), "quantize='int2': pylomin quantizes to 'int8' or 'int4' (groups: 'int4-g128')"),
        (lambda: parse_scheme("int4-g48"), "quantize='int4-g48': int4 groups are 32, 64, 128 inputs wide"),
        (lambda: parse_scheme("int4-gx"), "quantize='int4-gx': int4 groups are 32, 64, 128 inputs wide"),
        (
            lambda: parse_scheme("int8-g64"),
            "quantize='int8-g64': int8 has one scale per output channel, no group size",
        ),
        (
            lambda: parse_scheme(8),  # type: ignore[arg-type]
            "quantize=8: give 'int8' or 'int4' (or 'int4-g32', 'int4-g64', 'int4-g128'), "
            "or pylomin.Int8WeightOnly() / pylomin.Int4WeightOnly()",
        ),
        (lambda: Int4WeightOnly(group_size=48), "group_size=48: int4 groups are 32, 64, 128 inputs wide"),
        (lambda: Int4WeightOnly(group_size=64.0), "group_size=64.0: int4 groups are 32, 64, 128 inputs wide"),  # type: ignore[arg-type]
        (lambda: Int8WeightOnly(head="yes"), "head='yes': give True (quantize the LM head too) or False"),  # type: ignore[arg-type]
        (lambda: Int4WeightOnly(head=1), "head=1: give True (quantize the LM head too) or False"),  # type: ignore[arg-type]
    ],
)
def test_a_bad_scheme_is_refused_with_what_is_allowed(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value) == message


def test_every_entry_point_takes_a_config_or_its_string(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"^quantize='int3': pylomin quantizes to"):
        pylomin.convert(tmp_path / "nowhere", tmp_path / "out", quantize="int3", progress=False)
    with pytest.raises(ValueError, match=r"^quantize='int3': pylomin quantizes to"):
        pylomin.load_streaming(tmp_path, transformers.LlamaForCausalLM, quantize="int3")
    with pytest.raises(ValueError, match=r"^quantize='int3': pylomin quantizes to"):
        pylomin.quantize_(llama(), "int3")
    with pytest.raises(ValueError, match=r"^quantize='int3': pylomin quantizes to"):
        pylomin.lazy_loading(llama(), quantize="int3")
    # The head option is the config's field now.
    with pytest.raises(TypeError, match="head"):
        pylomin.quantize_(llama(), "int8", head=True)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="quantize_head"):
        pylomin.convert(tmp_path / "nowhere", tmp_path / "out", quantize="int8", quantize_head=True)  # type: ignore[call-arg]


def test_the_record_reads_what_earlier_folders_wrote() -> None:
    # format_version 2 as written before the schemes were config objects: the same keys, the same values.
    doc = {
        "scheme": "int4",
        "group_size": 128,
        "head": True,
        "pack": "crc32:0badf00d",
        "torch": "2.13.0",
        "modules": {"lm_head": {"in_features": 128, "out_features": 512, "dtype": "float32"}},
        "skipped": {},
    }
    q = Quantization.from_json(doc)
    assert q is not None and q.scheme == Int4WeightOnly(128, head=True) and q.pack == "crc32:0badf00d"
    assert q.to_json() == {**doc, "experts": {}}  # written back with the (empty) record of quantized experts
    int8 = Quantization.from_json({**doc, "scheme": "int8", "group_size": 0, "head": False, "pack": None})
    assert int8 is not None and int8.scheme == Int8WeightOnly()
    assert int8.to_json()["group_size"] == 0


def test_the_cache_key_of_a_scheme_is_its_string_and_the_converters_revision() -> None:
    # The scheme's string as before the configs; the revision: a conversion an older converter made
    # (experts left unquantized, plain rounding) is not reused after an upgrade.
    commit = "0" * 40
    assert cache._folder_name(commit, None, Int4WeightOnly()) == f"{commit}.int4-g64.r2"
    assert cache._folder_name(commit, None, parse_scheme("int8")) == f"{commit}.int8.r2"
    assert cache._folder_name(commit, None, Int8WeightOnly(head=True)) == f"{commit}.int8+head.r2"
    assert cache._folder_name(commit, None, None) == commit


def test_a_conversion_by_an_earlier_revision_is_named_not_reused_nor_deleted(
    saved: Callable[[str], Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = cache.converted_folder(saved("llama"), cache_dir=tmp_path, progress=False, quantize=parse_scheme("int8"))
    older = first.with_name(first.name.removesuffix(".r2"))  # as pylomin 0.1 before the revision named it
    first.rename(older)
    with caplog.at_level(logging.WARNING, logger="pylomin"):
        again = cache.converted_folder(
            saved("llama"), cache_dir=tmp_path, progress=False, quantize=parse_scheme("int8")
        )
    assert again == first and (again / fmt.MANIFEST_NAME).is_file()
    assert (older / fmt.MANIFEST_NAME).is_file()  # the user decides what to delete
    assert any(str(older) in r.getMessage() and "no longer used" in r.getMessage() for r in caplog.records)


@pytest.mark.bitexact
def test_a_scale_dtype_survives_a_dtype_cast_at_load(saved: Callable[[str], Path], tmp_path: Path) -> None:
    folder = pylomin.convert(saved("bert"), tmp_path / "out", quantize="int8", progress=False)
    model = pylomin.load_streaming(folder, transformers.BertModel, dtype="float16", memory_budget=0)
    ref = models.pretrained(transformers.BertModel, saved("bert"))
    pylomin.quantize_(ref, "int8")
    ref = ref.to(torch.float16)
    layer = model.encoder.layer[0].intermediate.dense
    assert isinstance(layer, quant.Int8Linear)
    out = output(model, ids(3))
    assert out.dtype == torch.float16 and torch.equal(out, output(ref, ids(3)))
    assert layer.bias is not None and layer.bias.dtype == torch.float16


def test_int4_packed_by_another_machine_is_refused(saved: Callable[[str], Path], tmp_path: Path) -> None:
    folder = pylomin.convert(saved("llama"), tmp_path / "out", quantize="int4", progress=False)
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    doc["quantization"]["pack"] = "crc32:00000000"
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(PylominError, match=r"packed for another CPU or torch .* Convert the model again"):
        pylomin.load_streaming(folder, transformers.LlamaForCausalLM)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda q: q.update(scheme="int3"), "unknown quantization scheme 'int3'"),
        (lambda q: q.update(group_size=48), "unknown quantization scheme 'int4' .group size 48"),
        (lambda q: q["modules"].update({"model.layers.0.mlp.up_proj": {}}), "needs integer `in_features`"),
        (lambda q: q["modules"].update({"model.nowhere": {"in_features": 1, "out_features": 1}}), "has no stored"),
    ],
)
def test_a_malformed_quantization_record_is_refused(
    saved: Callable[[str], Path], tmp_path: Path, edit: Callable[[dict], None], message: str
) -> None:
    folder = pylomin.convert(saved("llama"), tmp_path / "out", quantize="int4", progress=False)
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    edit(doc["quantization"])
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(PylominError, match=message):
        pylomin.load_streaming(folder, transformers.LlamaForCausalLM)


def test_a_quantized_layer_the_model_lacks_is_refused(saved: Callable[[str], Path], tmp_path: Path) -> None:
    folder = pylomin.convert(saved("llama"), tmp_path / "out", quantize="int8", progress=False)
    # The same tensors, but a model whose MLPs are 200 wide: the record no longer matches.
    doc = json.loads((folder / fmt.MANIFEST_NAME).read_text())
    doc["quantization"]["modules"]["model.layers.0.mlp.up_proj"]["out_features"] = 200
    (folder / fmt.MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(PylominError, match=r"holds `model.layers.0.mlp.up_proj` quantized as a 200x128 Linear"):
        pylomin.load_streaming(folder, transformers.LlamaForCausalLM)


def test_quantize_at_load_must_match_the_folder(saved: Callable[[str], Path], tmp_path: Path) -> None:
    int8 = pylomin.convert(saved("llama"), tmp_path / "int8", quantize="int8", progress=False)
    plain = pylomin.convert(saved("llama"), tmp_path / "plain", progress=False)
    assert isinstance(pylomin.load_streaming(int8, transformers.LlamaForCausalLM, quantize="int8"), torch.nn.Module)
    assert isinstance(
        pylomin.load_streaming(int8, transformers.LlamaForCausalLM, quantize=Int8WeightOnly()), torch.nn.Module
    )
    with pytest.raises(ValueError, match=r"holds int8 weights; a converted folder is loaded as it is"):
        pylomin.load_streaming(int8, transformers.LlamaForCausalLM, quantize="int4")
    # A folder holding the weights as stored is quantized into the cache, once, and equals the
    # conversion of the original checkpoint; the folder itself is left as it was.
    before = sorted((p.relative_to(plain), p.stat().st_mtime_ns) for p in plain.rglob("*"))
    model = pylomin.load_streaming(plain, transformers.LlamaForCausalLM, quantize="int8", cache_dir=tmp_path / "c")
    folder = stream_of(model).store.folder
    assert folder.is_relative_to(tmp_path / "c") and fmt.read(folder).quantization.scheme == Int8WeightOnly()  # type: ignore[union-attr]
    assert sorted((p.relative_to(plain), p.stat().st_mtime_ns) for p in plain.rglob("*")) == before
    ref = pylomin.load_streaming(int8, transformers.LlamaForCausalLM)
    for seq in (1, 20):
        assert torch.equal(output(model, ids(seq)), output(ref, ids(seq)))
    again = pylomin.load_streaming(plain, transformers.LlamaForCausalLM, quantize="int8", cache_dir=tmp_path / "c")
    assert stream_of(again).store.folder == folder
    with pytest.raises(PylominError, match=r"holds int8 weights already; convert the original checkpoint"):
        pylomin.convert(int8, tmp_path / "twice", quantize="int4", progress=False)


def test_quantizing_a_bare_state_dict_says_what_it_needs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"fc.weight": torch.randn(64, 64)}, tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"quantizing needs the model's Linear layers: .* no config.json"):
        pylomin.convert(tmp_path / "m.safetensors", tmp_path / "out", quantize="int8", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.bitexact
def test_lazy_loading_spills_quantized_units(tmp_path: Path) -> None:
    model = llama()
    ref = copy.deepcopy(model)
    pylomin.quantize_(ref, "int8")
    units = tmp_path / "units"
    lazy = pylomin.lazy_loading(model, target_classes=[torch.nn.Linear], quantize="int8", offload_dir=units)
    assert isinstance(lazy.model.layers[0].mlp.up_proj, quant.Int8Linear)
    for seq in (1, 20):
        assert torch.equal(output(lazy, ids(seq)), output(ref, ids(seq)))
    stored = {i.dtype for u in fmt.read(units).units for i in u.tensors.values()}
    assert stored == {"I8", "BF16", "F32"}  # payloads, scales, the head
    pylomin.unload_(lazy)
    assert torch.equal(output(lazy, ids(3)), output(ref, ids(3)))


def test_cli_convert_quantized(saved: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    assert (
        cli.convert_main([str(saved("llama")), str(out), "--quantize", "int4", "--group-size", "128", "--quiet"]) == 0
    )
    assert fmt.read(out).quantization.scheme == Int4WeightOnly(128)  # type: ignore[union-attr]
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "quantized int4-g128: 14 Linear layers; 1 kept as stored" in info
    assert "  kept lm_head: the LM head" in info
    head = tmp_path / "head"
    assert cli.convert_main([str(saved("llama")), str(head), "--quantize", "int8", "--quantize-head", "--quiet"]) == 0
    assert fmt.read(head).quantization.scheme == Int8WeightOnly(head=True)  # type: ignore[union-attr]
    for args, message in [
        (["--group-size", "128"], "--group-size and --quantize-head go with --quantize int8 or int4"),
        (["--quantize-head"], "--group-size and --quantize-head go with --quantize int8 or int4"),
        (
            ["--quantize", "int8", "--group-size", "64"],
            "--group-size goes with --quantize int4: int8 has one scale per output channel, no group size",
        ),
    ]:
        assert cli.convert_main([str(saved("llama")), str(tmp_path / "x"), *args]) == 2
        assert capsys.readouterr().err.strip() == f"pylomin-convert: error: {message}"
    assert not (tmp_path / "x").exists()


@pytest.fixture
def refused(monkeypatch: pytest.MonkeyPatch) -> str:
    """This machine's int8 kernel, as if its probe had failed (the probe's result is kept per process)."""
    monkeypatch.setitem(quant._CHECKED, "int8", "the probe's reason")
    return "weights quantized as int8 cannot run with torch"


def test_a_scheme_the_kernels_cannot_run_is_refused_before_any_work(
    refused: str, saved: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    assert cli.convert_main([str(saved("llama")), str(out), "--quantize", "int8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pylomin-convert: error: {refused} ") and "(the probe's reason)" in err, err
    assert not out.exists()
    model = llama()
    with pytest.raises(PylominError, match=refused):
        pylomin.quantize_(model, Int8WeightOnly(head=True))  # the head changes nothing in the kernel
    with pytest.raises(PylominError, match=refused):
        pylomin.lazy_loading(model, quantize="int8")
    assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear and model.lm_head.weight.device.type == "cpu"
    # The converter runs no kernel: the folder is written, and refused where it is loaded.
    folder = pylomin.convert(saved("llama"), out, quantize="int8", progress=False)
    with pytest.raises(PylominError, match=refused):
        pylomin.load_streaming(folder, transformers.LlamaForCausalLM)


@pytest.mark.parametrize("scheme", [Int8WeightOnly(), Int4WeightOnly(32), Int4WeightOnly(64), Int4WeightOnly(128)])
def test_the_kernel_probe_passes_here_and_fails_a_kernel_that_is_off(
    scheme: Scheme, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert quant._try_kernel(scheme) is None
    cls = quant.Int8Linear if isinstance(scheme, Int8WeightOnly) else quant.Int4Linear
    real = cls._matmul
    # A kernel that is off: its outputs in another order, as a layout read wrong gives.
    monkeypatch.setattr(cls, "_matmul", lambda self, x: real(self, x).flip(-1))
    assert quant._try_kernel(scheme).startswith("its kernel is off by ")  # type: ignore[union-attr]

    def fails(self: object, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("could not create a primitive\nthe rest of torch's message")

    monkeypatch.setattr(cls, "_matmul", fails)
    assert quant._try_kernel(scheme) == "could not create a primitive"  # the error's first line


@pytest.mark.bitexact
def test_checkpoints_converted_to_their_run_time_layout_quantize_by_their_run_time_names(tmp_path: Path) -> None:
    from tests.test_layout import mixtral

    # Mixtral: experts fused into 3-D tensors (paged per expert, not quantized), attention quantized;
    # ViT: keys renamed at conversion (`attention.attention.query` -> `attention.q_proj`).
    vit_cfg = transformers.ViTConfig(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    cases = [
        (mixtral(experts=4, hidden=128, intermediate=128), transformers.MixtralForCausalLM, ids(6) % 100),
        (transformers.ViTModel(vit_cfg).eval(), transformers.ViTModel, torch.randn(1, 3, 32, 32)),
    ]
    for i, (model, cls, x) in enumerate(cases):
        model.save_pretrained(tmp_path / f"src{i}")
        folder = pylomin.convert(tmp_path / f"src{i}", tmp_path / f"out{i}", quantize="int8", progress=False)
        q = fmt.read(folder).quantization
        assert q is not None and q.modules, cls
        ref = models.pretrained(cls, tmp_path / f"src{i}")
        assert set(pylomin.quantize_(ref, "int8")) == set(q.skipped)
        assert set(q.modules) == {n for n, m in ref.named_modules() if isinstance(m, quant.QuantLinear)}
        streamed = pylomin.load_streaming(folder, cls, memory_budget=0)
        with torch.no_grad():
            a, b = streamed(x), ref(x)
        key = "logits" if "logits" in a else "last_hidden_state"
        assert torch.equal(a[key], b[key]), cls
