"""`pylomin generate`: a prompt through a streamed causal LM, the text written as it is made, the run's figures after.

The order matters: the speed estimate first (it refuses a run whose KV cache cannot fit before anything
heavy is loaded), then the draft, then the model, so that the model's memory policy counts the draft's
resident bytes. Drafts go through transformers' own assisted generation; greedy output with any draft is
the model's own. What the run measured (`Stats`) is counted with a forward pre-hook on the model and a
streamer, and `/proc/self/io`: nothing inside transformers is replaced.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from torch import nn

    from pylomin.tools.plan import Estimate

# The draft words `--draft` takes; anything else is a folder or a repo id.
SELF_DRAFT = "int4"
LOOKUP = "lookup"
# Prompt lookup proposes this many tokens per pass: transformers' default for its prompt lookup
# generator and the method's reference implementation. A streamed verify pass costs one read of what
# streams however many tokens it checks, so a long guess that fails costs little (a few more rows of
# compute) and one that holds saves whole passes.
LOOKUP_TOKENS = 10
MIB = 2**20


@dataclass(frozen=True)
class Stats:
    """What one `generate` run measured.

    `passes` and `drafted` come from the model's forward pre-hook: a pass checks the tokens it was given
    and yields the accepted ones plus one of its own, so `accepted = new_tokens - passes`; the first pass
    reads the prompt, every later one the last token plus the draft's, so
    `drafted = sum(pass lengths) - prompt_tokens - (passes - 1)` (0 without a draft).
    """

    prompt_tokens: int
    new_tokens: int
    seconds: float  # the whole generate() call: the prompt's pass included
    decode_tokens: int  # new tokens made after the first pass (which reads the prompt)
    decode_seconds: float  # from the end of the first pass to the last token
    passes: int  # forwards of the model (not of the draft)
    drafted: int
    read_bytes: int | None  # `read_bytes` of /proc/self/io over generate(); None where it cannot be read

    @property
    def accepted(self) -> int:
        return self.new_tokens - self.passes

    @property
    def acceptance(self) -> float:
        """Share of the drafted tokens the model kept; 0.0 with nothing drafted."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        """Decode speed: new tokens after the first pass over their time (the whole run's when the first pass made them all)."""
        if self.decode_tokens > 0 and self.decode_seconds > 0:
            return self.decode_tokens / self.decode_seconds
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


def generate(
    src: str | os.PathLike[str],
    prompt: str,
    *,
    model_cls: Callable[..., nn.Module] | type | str = "transformers.AutoModelForCausalLM",
    max_new_tokens: int = 128,
    do_sample: bool = False,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
    chat: bool = False,
    memory_budget: int | str = "auto",
    revision: str | None = None,
    draft: str | None = None,
    estimate: bool = True,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> Stats:
    """Generate from `prompt` with the streamed model `src`, writing the text to `out` as it is made.

    Args:
        src: a converted folder, a Hugging Face folder or a Hub repo id (converted into the cache once).
        prompt: the text to continue; with `chat`, the user's message, put in the tokenizer's chat template.
        draft: `"int4"` (the model's own int4 conversion, `pylomin.self_draft`), `"lookup"` (prompt
            lookup: candidates copied from the prompt) or a folder / repo id of a small model with the
            same tokenizer; None: plain decoding.
        estimate: print the speed estimate of `pylomin plan` first, and refuse (`ValueError`) when
            its KV cache and activations cannot fit.
        out, err: where the text and the figures go (default: stdout, stderr).

    Returns:
        The run's `Stats`, also written to `err` as lines after the text.

    Example:
        >>> generate("./llama-pylomin", "The capital of France is", max_new_tokens=16, draft="lookup")
    """
    import torch

    from pylomin.modeling import resolve_model_cls
    from pylomin.runtime.model import stream_of
    from pylomin.runtime.streaming import load_streaming, self_draft, unload_

    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    sampling = {k: v for k, v in (("temperature", temperature), ("top_p", top_p), ("top_k", top_k)) if v is not None}
    if sampling and not do_sample:
        raise ValueError(f"{', '.join(sampling)} go with do_sample (greedy decoding has no temperature or top-p/k)")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens}: generate at least 1 token")
    cls = resolve_model_cls(model_cls)
    folder = _converted_folder(src, cls, revision)
    tokenizer = _load_tokenizer(folder)
    ids = _encode(tokenizer, prompt, chat=chat, folder=folder)  # ids: [1, S]
    expected: Estimate | None = None
    if estimate:
        expected = _check_estimate(folder, model_cls, memory_budget, int(ids.shape[1]), max_new_tokens, err)

    drafter: nn.Module | None = None
    model: nn.Module | None = None
    try:
        if draft not in (None, SELF_DRAFT, LOOKUP):
            drafter = _load_draft(draft, cls, tokenizer, revision)  # before the model: its policy sees the draft
        model = load_streaming(folder, cls, memory_budget=memory_budget)
        if draft == SELF_DRAFT:
            # self_draft needs the model; the model's next forward re-reads the memory, the draft counted.
            drafter = self_draft(model, SELF_DRAFT)
        kwargs: dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, **sampling)
        if drafter is not None:
            kwargs["assistant_model"] = drafter
        elif draft == LOOKUP:
            kwargs["prompt_lookup_num_tokens"] = LOOKUP_TOKENS
        if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
            kwargs["pad_token_id"] = tokenizer.eos_token_id  # batch 1 pads nothing; this only silences the warning
        if seed is not None:
            torch.manual_seed(seed)
        stats = _measured(model, ids, _streamer(tokenizer, out), kwargs)
        memory = [f"draft {_memory(drafter, stream_of)}"] if drafter is not None else []
        memory.append(_memory(model, stream_of))
        for line in _report(stats, draft, expected, memory):
            print(line, file=err)
        return stats
    finally:
        for m in (model, drafter):
            if m is not None:
                unload_(m)


def _measured(model: nn.Module, ids: Any, streamer: Any, kwargs: dict[str, Any]) -> Stats:
    """`model.generate(ids, **kwargs)` with the streamer, its passes counted, timed, and the bytes read during it."""
    import torch

    passes = Passes(model)
    read0 = _read_bytes()
    start = time.perf_counter()
    try:
        with torch.no_grad():
            result = model.generate(ids, attention_mask=torch.ones_like(ids), streamer=streamer, **kwargs)  # type: ignore[operator]
    finally:
        passes.remove()
    seconds = time.perf_counter() - start
    read1 = _read_bytes()
    prompt = int(ids.shape[1])
    new = int(result.shape[1]) - prompt
    started = streamer.first_at is not None
    return Stats(
        prompt_tokens=prompt,
        new_tokens=new,
        seconds=seconds,
        decode_tokens=new - streamer.first_tokens if started else 0,
        decode_seconds=streamer.last_at - streamer.first_at if started else 0.0,
        passes=passes.count,
        drafted=passes.drafted(prompt),
        read_bytes=None if read0 is None or read1 is None else read1 - read0,
    )


def _converted_folder(src: str | os.PathLike[str], model_cls: Any, revision: str | None) -> Path:
    """The converted folder of `src`: itself, or (a Hugging Face folder, a repo id) its conversion in the cache."""
    from pylomin.format import manifest as fmt

    folder = Path(src)
    if (folder / fmt.MANIFEST_NAME).is_file():
        return folder
    from pylomin.converter import cache  # converts once; later runs find the folder there

    return cache.resolve(os.fspath(src), revision, model_cls=model_cls)


def _load_tokenizer(folder: Path) -> Any:
    """`AutoTokenizer.from_pretrained(folder)`, or a `FileNotFoundError` naming the folder when it holds none."""
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError, KeyError) as e:
        # transformers' own message for a folder without tokenizer files varies by version and class.
        raise FileNotFoundError(
            f"`{folder}` holds no tokenizer transformers can load ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it"
        ) from None


def _encode(tokenizer: Any, prompt: str, *, chat: bool, folder: Path) -> Any:
    """The prompt's token ids, `[1, S]`; with `chat`, the prompt as the user's message in the chat template."""
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"--chat: the tokenizer of `{folder}` has no chat template (chat_template in tokenizer_config.json "
                "or chat_template.jinja); drop --chat and write the prompt in the model's own format"
            )
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        # The template writes the special tokens (BOS included) itself.
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty once tokenized; give some text to continue")
    return ids


def _check_estimate(
    folder: Path, model_cls: Any, memory_budget: int | str, prompt_tokens: int, max_new_tokens: int, err: TextIO
) -> Estimate:
    """Print `pylomin plan`'s estimate for this run; `ValueError` with its reason when it cannot fit."""
    from pylomin.runtime.options import parse_bytes
    from pylomin.tools.plan import estimate

    # The memory this process may use, as "auto" reads it: a fixed budget bounds the resident weights,
    # not the KV cache, so whether the run fits is still the machine's question.
    e = estimate(folder, model_cls, memory=None, batch=1, context=prompt_tokens + max_new_tokens)
    auto = isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
    if not auto:
        e = _for_budget(e, parse_bytes(memory_budget))
    for line in e.describe().splitlines():
        print(f"estimate: {line}", file=err)
    if not e.fits:
        raise ValueError(
            f"not run: {e.reason} (context: a prompt of {prompt_tokens} tokens + --max-new-tokens {max_new_tokens})"
        )
    return e


def _for_budget(e: Estimate, budget: int) -> Estimate:
    """`e` (made for memory_budget="auto") for a fixed budget: what "auto" would keep resident beyond
    `budget` is read per token instead.

    Bytes, not units: exact for a dense model; with a budget too small for the embedding table, which
    a token reads a few rows of, it counts the whole table as read.
    """
    import dataclasses

    extra = max(0, e.resident_bytes - budget)
    if not extra:
        return e
    return dataclasses.replace(
        e,
        resident_bytes=e.resident_bytes - extra,
        read_per_token=e.read_per_token + extra,
        seconds_per_token=e.seconds_per_token + extra / e.disk_bytes_per_s,
        notes=(*e.notes, f"resident: at most the fixed memory_budget of {budget / MIB:.0f} MiB"),
    )


def _load_draft(draft: str, model_cls: Any, tokenizer: Any, revision: str | None) -> nn.Module:
    """A draft model from a folder or repo id, checked to share the model's tokens."""
    from pylomin.runtime.streaming import load_streaming, propose_eagerly

    folder = _converted_folder(draft, model_cls, revision)
    try:
        theirs = _load_tokenizer(folder)
    except FileNotFoundError:
        theirs = None  # a draft without tokenizer files: trusted to share the model's
    if theirs is not None and theirs.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"--draft `{draft}`: its tokenizer's vocabulary differs from the model's; a draft must propose the "
            "same token ids (a smaller model of the same family), or use --draft int4 / lookup"
        )
    return propose_eagerly(load_streaming(folder, model_cls))  # as the self-draft proposes


def _report(stats: Stats, draft: str | None, expected: Estimate | None, memory: list[str]) -> list[str]:
    """The lines `pylomin generate` writes to stderr at the end."""
    versus = f"; estimate {expected.tokens_per_s:.2f} tok/s" if expected is not None else ""
    if stats.decode_tokens > 0:
        speed = (
            f"decode {stats.tokens_per_s:.2f} tok/s ({stats.decode_tokens} tokens after the prompt's pass, "
            f"{stats.decode_seconds:.2f} s{versus})"
        )
    else:
        speed = f"{stats.tokens_per_s:.2f} tok/s (the prompt's pass made every token{versus})"
    lines = [
        f"generated {stats.new_tokens} tokens from a prompt of {stats.prompt_tokens} in {stats.seconds:.2f} s; {speed}"
    ]
    if draft is not None:
        lines.append(
            f"draft {draft}: acceptance {stats.acceptance:.0%} ({stats.accepted} of {stats.drafted} drafted tokens kept; "
            f"{stats.passes} passes of the model, {stats.new_tokens / max(stats.passes, 1):.2f} tokens per pass)"
        )
    if stats.read_bytes is None:
        lines.append("read from disk: unknown (/proc/self/io cannot be read here)")
    else:
        lines.append(
            f"read from disk: {stats.read_bytes / max(stats.new_tokens, 1) / MIB:.2f} MiB per token "
            f"({stats.read_bytes / MIB:.1f} MiB in all: /proc/self/io read_bytes over generate, the prompt's pass "
            "included, page cache hits not counted)"
        )
    lines.extend(memory)
    return lines


def _memory(model: nn.Module, stream_of: Callable[[nn.Module], Any]) -> str:
    # The policy's own line with "auto"; a fixed budget says nothing, so say what it keeps.
    policy = stream_of(model).policy
    if policy.note:
        return str(policy.note)
    resident, model_bytes = policy.plan.resident_bytes, policy.model_bytes
    return f"memory: a fixed budget; {resident / MIB:.1f} MiB of the model's {model_bytes / MIB:.1f} MiB resident, the rest streamed"


class Passes:
    """Counts the model's forwards and the tokens they read, with a forward pre-hook (removed by `remove`)."""

    def __init__(self, model: nn.Module) -> None:
        self.count = 0
        self.tokens = 0
        from pylomin.modeling import token_inputs  # torch: imported when a run starts, not for --help

        self._token_inputs = token_inputs
        self._handle = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = self._token_inputs(args, kwargs)
        self.count += 1
        self.tokens += int(x.shape[1]) if x is not None else 1

    def drafted(self, prompt_tokens: int) -> int:
        """Tokens a draft proposed: every pass after the first reads the last token plus the draft's (`Stats`)."""
        return self.tokens - prompt_tokens - max(self.count - 1, 0)

    def remove(self) -> None:
        self._handle.remove()


def _streamer(tokenizer: Any, out: TextIO) -> Any:
    """transformers' `TextStreamer` writing to `out`, noting when the first pass's tokens and the last ones came."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):  # type: ignore[misc]
        prompt_seen = False
        first_at: float | None = None  # when the first pass's tokens came
        first_tokens = 0
        last_at = 0.0

        def put(self, value: Any) -> None:
            super().put(value)
            if not self.prompt_seen:  # generate() hands the prompt over first
                self.prompt_seen = True
                return
            self.last_at = time.perf_counter()
            if self.first_at is None:
                self.first_at = self.last_at
                self.first_tokens = int(value.numel())

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _read_bytes() -> int | None:
    # Bytes this process had the kernel fetch from storage (all threads: the reader's too); page cache hits are not counted.
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return None
