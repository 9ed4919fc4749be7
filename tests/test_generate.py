"""`pylomin generate` and `pylomin plan`: text as the model in memory makes it, drafts that change nothing, the figures after."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

import pylomin
from pylomin.format import manifest as fmt
from pylomin.tools import cli
from pylomin.tools.generate import generate
from tests import models, python

PROMPT = "w5 w6 w7 w8 w5 w6 w7 w8 w5 w6"  # repeats: prompt lookup finds candidates in it
TOKENS = 16


@dataclass(frozen=True)
class Folders:
    hf: Path  # a Hugging Face folder: weights, config, tokenizer
    converted: Path
    draft: Path  # another model (other weights), the same tokenizer, converted


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Folders:
    root = tmp_path_factory.mktemp("generate")
    tokenizer = models.tokenizer()
    for seed, name in ((0, "hf"), (1, "draft-hf")):
        torch.manual_seed(seed)
        models.llama().save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return Folders(
        root / "hf",
        pylomin.convert(root / "hf", root / "converted", progress=False),
        pylomin.convert(root / "draft-hf", root / "draft", progress=False),
    )


@pytest.fixture(scope="module")
def expected(folders: Folders) -> str:
    """What the model in memory writes for PROMPT, greedy: every run of the streamed model must write it."""
    return in_memory_greedy(folders.hf, prompt_ids(folders.hf))


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYLOMIN_CACHE", str(tmp_path / "cache"))


def in_memory_greedy(folder: Path, ids: torch.Tensor, tokens: int = TOKENS) -> str:
    """The new text of `generate()` by the model in memory, decoded as the streamer decodes it."""
    model = models.pretrained(transformers.LlamaForCausalLM, folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def prompt_ids(folder: Path, prompt: str = PROMPT) -> torch.Tensor:
    return transformers.AutoTokenizer.from_pretrained(folder)(prompt, return_tensors="pt").input_ids


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    status = cli.main(["generate", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("source", ["converted", "hf"])
def test_generate_writes_the_greedy_text_of_the_model_in_memory(
    folders: Folders, expected: str, source: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # A Hugging Face folder is converted into the cache first; its tokenizer comes along.
    src = getattr(folders, source)
    status, out, err = run(capsys, str(src), PROMPT, "--max-new-tokens", str(TOKENS), "--no-estimate")
    assert status == 0, err
    assert expected and out == expected + "\n"
    assert re.search(
        rf"^generated {TOKENS} tokens from a prompt of 10 in [0-9.]+ s; decode [0-9.]+ tok/s ", err, re.M
    ), err
    assert re.search(
        r"^read from disk: [0-9.]+ MiB per token \([0-9.]+ MiB in all: /proc/self/io read_bytes", err, re.M
    )
    assert re.search(r"^memory: .* available of .*; the model \(.*\) is kept resident$", err, re.M), err
    assert "draft" not in err


@pytest.mark.parametrize("draft", ["lookup", "PATH"])
def test_a_draft_leaves_the_greedy_text_as_it_was_and_its_acceptance_is_reported(
    folders: Folders, expected: str, draft: str, capsys: pytest.CaptureFixture[str]
) -> None:
    which = str(folders.draft) if draft == "PATH" else draft
    status, out, err = run(
        capsys, str(folders.converted), PROMPT, "--max-new-tokens", str(TOKENS), "--no-estimate", "--draft", which
    )
    assert status == 0, err
    assert out == expected + "\n"
    m = re.search(
        rf"^draft {re.escape(which)}: acceptance (\d+)% \((\d+) of (\d+) drafted tokens kept; (\d+) passes of the model, ",
        err,
        re.M,
    )
    assert m, err
    rate, accepted, drafted, passes = map(int, m.groups())
    assert accepted == TOKENS - passes and drafted > 0 and rate == round(100 * accepted / drafted)
    if draft == "lookup":  # the text repeats itself: candidates copied from it hold
        assert accepted > 0 and passes < TOKENS
    else:
        assert re.search(r"^draft memory: ", err, re.M), err


def test_the_int4_self_draft_leaves_the_greedy_text_as_it_was(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.manual_seed(2)  # seed 0 ends at once (its first token is `</s>`)
    models.llama_quantizable().save_pretrained(tmp_path / "hf")
    models.tokenizer().save_pretrained(tmp_path / "hf")
    folder = pylomin.convert(tmp_path / "hf", tmp_path / "converted", progress=False)
    args = [str(folder), PROMPT, "--max-new-tokens", str(TOKENS), "--no-estimate", "--draft", "int4"]
    status, out, err = run(capsys, *args)
    assert status == 0, err
    assert out == in_memory_greedy(tmp_path / "hf", prompt_ids(folder)) + "\n"
    assert re.search(r"^draft int4: acceptance \d+% ", err, re.M), err
    held = [fmt.read(m.parent).quantization for m in (tmp_path / "cache").rglob(fmt.MANIFEST_NAME)]
    assert [str(q.scheme) for q in held if q is not None] == ["int4-g64"], "no int4 copy in the cache"


def test_the_drafted_count_is_what_the_draft_model_proposed(folders: Folders, monkeypatch: pytest.MonkeyPatch) -> None:
    # drafted = sum(pass lengths) - prompt - (passes - 1), from the model's passes alone, against the draft's
    # own forwards: each proposes one token.
    proposals: list[int] = []
    load_streaming = pylomin.load_streaming

    def counted(path: Path, *args: object, **kwargs: object) -> torch.nn.Module:
        model = load_streaming(path, *args, **kwargs)  # type: ignore[arg-type]
        if Path(path) == folders.draft:
            model.register_forward_hook(lambda m, args, out: proposals.append(1))
        return model

    monkeypatch.setattr("pylomin.runtime.streaming.load_streaming", counted)
    out, err = io.StringIO(), io.StringIO()
    stats = generate(
        folders.converted, PROMPT, max_new_tokens=TOKENS, draft=str(folders.draft), estimate=False, out=out, err=err
    )
    assert stats.new_tokens == TOKENS and 0 < stats.passes <= TOKENS
    assert stats.drafted == len(proposals) > 0
    assert stats.accepted == TOKENS - stats.passes


def test_sampling_with_a_seed_repeats_itself(folders: Folders, capsys: pytest.CaptureFixture[str]) -> None:
    args = [str(folders.converted), PROMPT, "--max-new-tokens", "8", "--no-estimate", "--do-sample", "--top-k", "5"]
    first = run(capsys, *args, "--seed", "3")
    assert first[0] == 0, first[2]
    assert run(capsys, *args, "--seed", "3")[1] == first[1]


def test_chat_puts_the_prompt_in_the_tokenizers_template(
    folders: Folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, _, err = run(capsys, str(folders.converted), PROMPT, "--chat", "--no-estimate")
    assert status == 2
    assert err == (
        f"pylomin: error: --chat: the tokenizer of `{folders.converted}` has no chat template (chat_template in "
        "tokenizer_config.json or chat_template.jinja); drop --chat and write the prompt in the model's own format\n"
    )
    folder = shutil.copytree(folders.converted, tmp_path / "chat")
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = "{% for m in messages %}w1 {{ m['content'] }} {% endfor %}w9"
    tokenizer.save_pretrained(folder)
    status, out, err = run(capsys, str(folder), "w7 w8", "--chat", "--max-new-tokens", "8", "--no-estimate")
    assert status == 0, err
    # The template writes the whole prompt; the tokenizer adds no special tokens of its own around it.
    assert out == in_memory_greedy(folders.hf, prompt_ids(folders.hf, "w1 w7 w8 w9"), 8) + "\n"


def test_a_folder_without_a_tokenizer_is_refused_by_name(
    folders: Folders, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = shutil.copytree(folders.converted, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    status, out, err = run(capsys, str(folder), PROMPT, "--no-estimate")
    assert status == 2 and out == ""
    assert (
        err.startswith(f"pylomin: error: `{folder}` holds no tokenizer transformers can load") and err.count("\n") == 1
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--temperature", "0.7"], "temperature go with do_sample"),
        (["--max-new-tokens", "0"], "max_new_tokens=0: generate at least 1 token"),
    ],
)
def test_arguments_that_cannot_run_are_refused_in_one_line(
    folders: Folders, args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, str(folders.converted), PROMPT, "--no-estimate", *args)
    assert status == 2 and out == ""
    assert err.startswith("pylomin: error: ") and says in err and err.count("\n") == 1


def test_the_estimate_comes_first_and_the_measured_speed_beside_it(
    folders: Folders, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, str(folders.converted), PROMPT, "--max-new-tokens", "4")
    assert status == 0, err
    assert err.startswith("estimate: ")
    assert re.search(r"^generated 4 tokens .* tok/s .*; estimate [0-9.]+ tok/s\)$", err, re.M), err


def test_a_kv_cache_that_cannot_fit_is_refused_before_anything_loads(
    folders: Folders, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[dict[str, object]] = []
    load_streaming = pylomin.load_streaming

    def recorded(*args: object, **kwargs: object) -> torch.nn.Module:
        loads.append(kwargs)
        return load_streaming(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("pylomin.runtime.streaming.load_streaming", recorded)
    # 10^12 tokens of this Llama's KV cache: 384 bytes each (3 layers x keys and values x 2 heads x 8 x fp32).
    status, out, err = run(capsys, str(folders.converted), PROMPT, "--max-new-tokens", str(10**12))
    assert status == 2 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("estimate: memory ") and lines[-1].startswith("pylomin: error: not run: does not fit: ")
    assert lines[-1].endswith("(context: a prompt of 10 tokens + --max-new-tokens 1000000000000)"), err
    # Only the estimate's look at the model, which keeps nothing resident and reads nothing ahead.
    assert loads == [{"memory_budget": 0, "prefetch": 0}]


def test_plan_prints_the_estimate(folders: Folders, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["plan", str(folders.converted), "--memory", "1GiB", "--context", "64"]) == 0
    out = capsys.readouterr().out
    # 64 tokens of this Llama's KV cache: 384 bytes each (3 layers x keys and values x 2 heads x 8 x fp32).
    assert out.startswith("memory 1.00 GiB, KV cache 0.00 GiB; model 0.00 GiB: 0.00 GiB resident, 0.00 GiB streamed\n")
    assert re.search(r"^predicted [0-9.]+ tok/s \([0-9.]+ s per token\)$", out, re.M), out


@pytest.mark.parametrize(
    ("command", "status", "says"),
    [
        (["generate", "--help"], 0, "example:"),
        (["plan", "--help"], 0, "example:"),
        (["generate", "m", "p", "--max-new-tokens", "two"], 2, "pylomin generate: error: argument --max-new-tokens"),
        (["plan", "m", "--batch", "two"], 2, "pylomin plan: error: argument --batch"),
    ],
    ids=["generate --help", "plan --help", "generate bad int", "plan bad int"],
)
def test_help_and_argument_errors_of_generate_and_plan_import_no_torch(
    command: list[str], status: int, says: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(python.ROOT), "PYTHONPROFILEIMPORTTIME": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pylomin.tools.cli", *command], capture_output=True, text=True, env=env, timeout=60
    )
    imported = {ln.rsplit("|", 1)[1].strip() for ln in r.stderr.splitlines() if ln.startswith("import time:")}
    stderr = "\n".join(ln for ln in r.stderr.splitlines() if not ln.startswith("import time:"))
    assert r.returncode == status, stderr
    assert says in r.stdout + stderr
    assert "pylomin.errors" in imported, "no import times on stderr: the check below would pass whatever ran"
    assert "torch" not in imported, f"`pylomin {' '.join(command)}` imports torch"
