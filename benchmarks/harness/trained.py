"""Trained models for the benchmarks: a target Llama and a draft, and a mixture-of-experts, trained here on Python.

The corpus is the Python standard library's own source (every `*.py` under `sysconfig`'s stdlib
folder, `site-packages` left out, sorted). About 5 % of the files are held out, chosen by a hash of
their path relative to that folder, so the split is the same on every run: the held-out loss is
measured on them and the benchmark takes its prompts and its "rewrite this file" tasks from them.

A byte-level BPE (4096 tokens, `<|endoftext|>` between files) is trained on the training files, then
two `LlamaForCausalLM` that share it: the target (hidden 512, 6 layers, untied head: 93 MB fp32) and
the draft (hidden 256, 2 layers, tied head: 11 MB), each for its share of a wall-clock budget
(AdamW, warmup then cosine decay over the budget's time, random 256-token windows of the token
stream: positions past 256 are untrained, though the configs allow 2048). bf16 autocast: measured
1.6x faster on an AVX512-BF16 CPU (1.02 against 1.66 s a target step), and after 300 equal steps of
the draft its held-out loss within 0.02 nats of fp32's (5.094 against 5.079). Both are saved in fp32
with `save_pretrained` (safetensors), the tokenizer and a generation config beside them, and a
`train.json`: parameters, bytes, steps, tokens seen, wall time, train and held-out loss, and how
often the draft's greedy choice equals the target's on held-out prompts.

The mixture-of-experts (`stdlib-moe`, built on demand only: the routing benchmark's model) is a
`Qwen3MoeForCausalLM` with the same tokenizer: hidden 256, 6 layers, 32 experts of intermediate 160
per layer, top-4 (109 MB fp32), trained in the same loop for `moe_minutes` with transformers' router
load-balancing loss on (coefficient 0.01), so that the experts share the traffic rather than
collapse onto a few; random weights route tokens about uniformly, which makes any cache measured
on them meaningless. Its experts run transformers' eager loop: 1.55 s a step on 2 cores, against
8-9 s for `grouped_mm` (its CPU fallback) and 110 s for `batched_mm`. 13 minutes on 2 shared cores
gave 335 steps (686k tokens) and a held-out loss of 4.85 nats (the target Llama: 3.7 after 1,498
steps); 27 of its 192 experts were never chosen on 4096 held-out tokens despite the balancing loss.

They live outside the repository, in `$PYLOMIN_BENCH_MODELS` or else `~/.cache/pylomin-bench/`:
`stdlib-bpe/` (the tokenizer), `stdlib-llama-target/`, `stdlib-llama-draft/`, `stdlib-moe/`. Each is written
to a temporary folder and renamed into place when complete, so a folder that exists is complete.

    target() / draft()       the model folder, trained first if missing
    moe()                    the mixture-of-experts' folder, trained first if missing
    tokenizer()              the shared tokenizer (a PreTrainedTokenizerFast)
    heldout_files()          the held-out source files
    prompts(n, tokens)       the starts of held-out files, `tokens` tokens each
    heldout_ids(n, tokens)   the same as token ids
    build(recipe, force)     all of it (`python -m benchmarks.train`)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import transformers

log = logging.getLogger(__name__)

ENV_VAR = "PYLOMIN_BENCH_MODELS"
EOS = "<|endoftext|>"
HELDOUT_PERCENT = 5
TOKENIZER, TARGET, DRAFT = "stdlib-bpe", "stdlib-llama-target", "stdlib-llama-draft"
MOE = "stdlib-moe"

TARGET_CONFIG: dict[str, Any] = dict(
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
DRAFT_CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    tie_word_embeddings=True,
)
MOE_CONFIG: dict[str, Any] = dict(
    hidden_size=256,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=160,
    norm_topk_prob=True,
    router_aux_loss_coef=0.01,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Recipe:
    """How the tokenizer and both models are trained; the defaults make the benchmark's models."""

    minutes: float = 30.0  # training time of both models together
    target_share: float = 0.73  # of `minutes` for the target, the rest for the draft
    vocab: int = 4096
    seq: int = 256  # tokens per training window
    batch: int = 8  # windows per step
    target_lr: float = 2e-3
    draft_lr: float = 3e-3
    moe_minutes: float = 13.0  # the mixture-of-experts' own budget, apart from `minutes`
    moe_lr: float = 2e-3
    warmup_steps: int = 40
    bf16: bool = True  # autocast the forward and backward; weights, optimizer state and saved files stay fp32
    max_position_embeddings: int = 2048
    target_config: Mapping[str, Any] = field(default_factory=lambda: dict(TARGET_CONFIG))
    draft_config: Mapping[str, Any] = field(default_factory=lambda: dict(DRAFT_CONFIG))
    moe_config: Mapping[str, Any] = field(default_factory=lambda: dict(MOE_CONFIG))
    corpus_bytes: int | None = None  # only the first files, up to this many bytes (held-out files: a 20th); tests
    eval_tokens: int = 32768  # held-out tokens the final loss is measured on
    agree_prompts: int = 16  # held-out prompts of `agree_prompt` tokens, `agree_new` greedy tokens each
    agree_prompt: int = 32
    agree_new: int = 32
    seed: int = 0


# ---------------------------------------------------------------------------------------------- corpus


def cache_dir() -> Path:
    """Where the trained models live: `$PYLOMIN_BENCH_MODELS`, else `~/.cache/pylomin-bench`."""
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "pylomin-bench")


def stdlib() -> Path:
    """The folder of the running Python's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relative: str) -> bool:
    """Whether the file at `relative` (a POSIX path under the stdlib folder) is held out: a hash of the path."""
    return int.from_bytes(hashlib.sha256(relative.encode()).digest()[:4], "big") % 100 < HELDOUT_PERCENT


def corpus_files() -> list[Path]:
    """Every `*.py` of the standard library outside `site-packages`, sorted by relative path."""
    root = stdlib()
    files = (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts and p.is_file())
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def train_files() -> list[Path]:
    """The files the models are trained on: all but the held-out ones."""
    root = stdlib()
    return [p for p in corpus_files() if not is_heldout(p.relative_to(root).as_posix())]


def heldout_files() -> list[Path]:
    """The held-out files (about 5 %): never trained on; the held-out loss, the prompts and rewrite tasks."""
    root = stdlib()
    return [p for p in corpus_files() if is_heldout(p.relative_to(root).as_posix())]


def read(path: Path) -> str:
    """A source file's text (UTF-8; the few files in other encodings with replacement characters)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def _first(files: list[Path], limit: int | None) -> list[Path]:
    """The first of `files` up to `limit` bytes (at least one), or all of them."""
    if limit is None:
        return files
    out: list[Path] = []
    total = 0
    for p in files:
        if out and total + p.stat().st_size > limit:
            break
        out.append(p)
        total += p.stat().st_size
    return out


def _split(cap: int | None) -> tuple[list[Path], list[Path]]:
    """The training and held-out files, each cut to `cap` bytes (held-out: a 20th of it) where `cap` is set."""
    return _first(train_files(), cap), _first(heldout_files(), None if cap is None else cap // 20)


# ---------------------------------------------------------------------------------------------- tokenizer


def _tokenizer_folder(root: Path) -> Path:
    return root / TOKENIZER


def _place(tmp: Path, final: Path) -> None:
    """Rename the complete folder `tmp` to `final`, replacing an older `final` (`--force`)."""
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)


def _scratch(final: Path) -> Path:
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _train_tokenizer(folder: Path, recipe: Recipe) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t0 = time.perf_counter()
    files, _ = _split(recipe.corpus_bytes)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator((read(p) for p in files), trainer, length=len(files))
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=EOS)
    fast.model_max_length = recipe.max_position_embeddings
    tmp = _scratch(folder)
    fast.save_pretrained(tmp)
    _place(tmp, folder)
    log.info(
        "tokenizer: %d tokens from %d files in %.1f s -> %s", len(fast), len(files), time.perf_counter() - t0, folder
    )


def tokenizer_path(root: Path | None = None, recipe: Recipe | None = None) -> Path:
    """The shared tokenizer's folder, trained first if missing (copied from a model folder where one exists)."""
    recipe = recipe or Recipe()
    root = root or cache_dir()
    folder = _tokenizer_folder(root)
    if not (folder / "tokenizer.json").is_file():
        model = next((root / n for n in (TARGET, DRAFT) if (root / n / "tokenizer.json").is_file()), None)
        if model is not None:  # keep what the existing model was trained with
            tmp = _scratch(folder)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (model / name).is_file():
                    shutil.copy2(model / name, tmp / name)
            _place(tmp, folder)
        else:
            _train_tokenizer(folder, recipe)
    return folder


def tokenizer(root: Path | None = None) -> transformers.PreTrainedTokenizerFast:
    """The shared tokenizer (byte-level BPE, eos = bos = pad = `<|endoftext|>`), trained first if missing."""
    import transformers

    return transformers.PreTrainedTokenizerFast.from_pretrained(tokenizer_path(root))


@functools.lru_cache(maxsize=4)
def _streams(folder: Path, cap: int | None) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The training and held-out token streams (int32, `<|endoftext|>` after every file), and their sizes."""
    import torch
    from tokenizers import Tokenizer

    t0 = time.perf_counter()
    bpe = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eos = bpe.token_to_id(EOS)
    out: list[torch.Tensor] = []
    nbytes: list[int] = []
    split = _split(cap)
    for files in split:
        texts = [read(p) for p in files]
        ids = [torch.tensor([*e.ids, eos], dtype=torch.int32) for e in bpe.encode_batch(texts)]
        out.append(torch.cat(ids))
        nbytes.append(sum(len(t.encode()) for t in texts))
    train, heldout = out
    info = dict(
        train_files=len(split[0]),
        heldout_files=len(split[1]),
        train_bytes=nbytes[0],
        train_tokens=len(train),
        heldout_bytes=nbytes[1],
        heldout_tokens=len(heldout),
        bytes_per_token=round(nbytes[0] / len(train), 3),
    )
    log.info("corpus: %s (%.1f s)", info, time.perf_counter() - t0)
    return train, heldout, info


def prompts(n: int, tokens: int, root: Path | None = None) -> list[str]:
    """The first `tokens` tokens of `n` held-out files (those at least twice that long, in hash order), as text."""
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(tokenizer_path(root) / "tokenizer.json"))
    return [bpe.decode(ids) for ids in heldout_ids(n, tokens, root)]


def heldout_ids(n: int, tokens: int, root: Path | None = None) -> list[list[int]]:
    """The first `tokens` token ids of `n` held-out files (those at least twice that long, in hash order)."""
    from tokenizers import Tokenizer

    bpe = Tokenizer.from_file(str(tokenizer_path(root) / "tokenizer.json"))
    return [ids[:tokens] for ids in _heldout_starts(bpe, 2 * tokens)[:n]]


def _heldout_starts(bpe: Any, min_tokens: int) -> list[list[int]]:
    """The token ids of the held-out files with at least `min_tokens` tokens, in the order of a hash of their path."""
    root = stdlib()
    files = sorted(heldout_files(), key=lambda p: hashlib.sha256(p.relative_to(root).as_posix().encode()).digest())
    encoded = bpe.encode_batch([read(p) for p in files])
    return [e.ids for e in encoded if len(e.ids) >= min_tokens]


# ---------------------------------------------------------------------------------------------- training


def _new_model(recipe: Recipe, name: str, vocab: int, eos: int) -> tuple[Any, Mapping[str, Any], float, float]:
    """The untrained model `name`, its shape, its seconds of training and its peak learning rate."""
    import transformers

    common: dict[str, Any] = dict(
        vocab_size=vocab,
        max_position_embeddings=recipe.max_position_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    if name == MOE:
        # router_logits in the output: the forward adds the load-balancing loss to the loss it returns
        config = transformers.Qwen3MoeConfig(**recipe.moe_config, **common, output_router_logits=True)
        return transformers.Qwen3MoeForCausalLM(config), recipe.moe_config, recipe.moe_minutes * 60, recipe.moe_lr
    is_target = name == TARGET
    shape = recipe.target_config if is_target else recipe.draft_config
    share = recipe.target_share if is_target else 1 - recipe.target_share
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, **common))
    return model, shape, recipe.minutes * 60 * share, recipe.target_lr if is_target else recipe.draft_lr


def _lr(recipe: Recipe, peak: float, step: int, frac: float) -> float:
    """Linear warmup over `warmup_steps`, then cosine from `peak` to a tenth of it over the time budget."""
    warm = min(1.0, (step + 1) / recipe.warmup_steps)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


class _Threads:
    """Torch's intra-op thread count, chosen by measured step time: now and then a few steps with the other count.

    When other processes share the cores, one thread can train 2-3x faster than two (measured on 2
    cores under a load of 4: 2.0 against 4-7 s a step), as the threads wait at every barrier for a
    descheduled sibling; on idle cores two are 2x faster than one. A trial (`trial` steps, the first
    not counted) comes `wait` seconds after the last; each lost trial doubles the wait, up to 8x.
    """

    def __init__(self, wait: float = 60.0, trial: int = 3) -> None:
        import torch

        self.torch = torch
        self.initial = torch.get_num_threads()
        self.choices = sorted({1, self.initial})
        self.current, self.trial, self.wait, self.base = self.initial, trial, wait, wait
        self.next_trial = wait
        self.plan: list[int] = []
        self.times: dict[int, list[float]] = {n: [] for n in self.choices}
        self.steps: dict[int, int] = {n: 0 for n in self.choices}
        self.last = self.initial

    def before(self, now: float) -> None:
        """Set the thread count of the next step; `now`: seconds since training began."""
        if len(self.choices) > 1 and not self.plan and now >= self.next_trial:
            self.plan = [n for n in self.choices if n != self.current][:1] * self.trial
        self.torch.set_num_threads(self.plan[0] if self.plan else self.current)

    def after(self, seconds: float, now: float) -> None:
        """Record the step that took `seconds`; at a trial's end keep the faster count."""
        n = self.torch.get_num_threads()
        self.steps[n] += 1
        if n == self.last:  # the first step after a switch wakes the other pool up: not counted
            self.times[n] = [*self.times[n][-2:], seconds]
        self.last = n
        if self.plan:
            self.plan.pop(0)
            if not self.plan:
                ranked = sorted((sorted(t)[len(t) // 2], m) for m, t in self.times.items() if t)
                best = ranked[0][1]
                if best != self.current:
                    log.info("%d thread(s) now: %.2f s a step against %.2f", best, ranked[0][0], ranked[-1][0])
                self.wait = self.base if best != self.current else min(8 * self.base, 2 * self.wait)
                self.current, self.next_trial = best, now + self.wait

    def close(self) -> dict[int, int]:
        """Restore the thread count; the steps run with each count."""
        self.torch.set_num_threads(self.initial)
        return self.steps


def _fit(model: Any, data: torch.Tensor, seconds: float, peak: float, recipe: Recipe, name: str) -> dict[str, Any]:
    """Train `model` on random windows of `data` for `seconds` of wall clock (at least 2 steps)."""
    import torch

    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=peak, betas=(0.9, 0.95), eps=1e-8)
    g = torch.Generator().manual_seed(recipe.seed)
    model.train()
    losses: list[float] = []
    curve: list[dict[str, float]] = []
    threads = _Threads()
    step, t0, next_log = 0, time.perf_counter(), 0.0
    while True:
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and step >= 2:
            break
        lr = _lr(recipe, peak, step, elapsed / seconds)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(data) - recipe.seq, (recipe.batch,), generator=g).tolist()
        x = torch.stack([data[s : s + recipe.seq] for s in starts]).long()
        t_step = time.perf_counter()
        threads.before(t_step - t0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        threads.after(time.perf_counter() - t_step, time.perf_counter() - t0)
        step += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= next_log:
            mean = sum(losses[-20:]) / len(losses[-20:])
            tok_s = step * recipe.batch * recipe.seq / elapsed
            log.info("%s step %5d  %6.0f s  loss %.3f  lr %.2e  %.0f tok/s", name, step, elapsed, mean, lr, tok_s)
            curve.append(dict(step=step, seconds=round(elapsed, 1), loss=round(mean, 4)))
            next_log = elapsed + 30.0
    wall = time.perf_counter() - t0
    steps_by_threads = threads.close()
    model.eval()
    tail = losses[-max(1, min(50, len(losses) // 10)) :]
    return dict(
        steps=step,
        tokens_seen=step * recipe.batch * recipe.seq,
        train_wall_s=round(wall, 1),
        tokens_per_s=round(step * recipe.batch * recipe.seq / wall, 1),
        final_train_loss=round(sum(tail) / len(tail), 4),
        steps_by_threads=steps_by_threads,
        curve=curve,
    )


def evaluate(model: Any, data: torch.Tensor, recipe: Recipe) -> dict[str, float]:
    """Cross-entropy (nats per token) and top-1 accuracy in fp32 on non-overlapping windows of held-out `data`."""
    import torch

    n = max(1, min(recipe.eval_tokens, len(data)) // recipe.seq)
    windows = data[: n * recipe.seq].long().view(n, recipe.seq)
    total, right, count = 0.0, 0, 0
    with torch.no_grad():
        for x in windows.split(8):
            logits = model(input_ids=x).logits[:, :-1].float()
            y = x[:, 1:]
            total += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
            ).item()
            right += int((logits.argmax(-1) == y).sum())
            count += y.numel()
    return dict(heldout_loss=round(total / count, 4), heldout_top1=round(right / count, 4), heldout_eval_tokens=count)


def _train_model(root: Path, name: str, recipe: Recipe) -> Path:
    """Train the target, the draft or the mixture-of-experts into `root / name` (renamed into place when complete)."""
    import torch
    import transformers

    t_start = time.perf_counter()
    tok_folder = tokenizer_path(root, recipe)
    train, heldout, corpus = _streams(tok_folder, recipe.corpus_bytes)
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(tok_folder)
    eos = fast.eos_token_id
    assert isinstance(eos, int)
    torch.manual_seed(recipe.seed)
    model, shape, seconds, lr = _new_model(recipe, name, len(fast), eos)
    params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2fM parameters, %.0f s of training ...", name, params / 1e6, seconds)
    fit = _fit(model, train, seconds, lr, recipe, name)
    model.config.output_router_logits = False  # inference needs no load-balancing loss (Llama: no such option)
    scores = evaluate(model, heldout, recipe)
    log.info("%s: %s, held-out %s", name, {k: v for k, v in fit.items() if k != "curve"}, scores)
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=eos, eos_token_id=eos, pad_token_id=eos, do_sample=False
    )
    tmp = _scratch(root / name)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    nbytes = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    record = dict(
        name=name,
        role={TARGET: "target", DRAFT: "draft", MOE: "moe"}[name],
        architecture=type(model).__name__,
        parameters=params,
        bytes=nbytes,
        mb=round(nbytes / 1e6, 2),
        config=dict(shape, vocab_size=len(fast), max_position_embeddings=recipe.max_position_embeddings),
        python=sys.version.split()[0],
        corpus=corpus,
        budget_s=round(seconds, 1),
        lr=lr,
        batch=recipe.batch,
        seq=recipe.seq,
        bf16_autocast=recipe.bf16,
        **{k: v for k, v in fit.items() if k != "curve"},
        **scores,
        total_wall_s=round(time.perf_counter() - t_start, 1),
        recipe={k: v for k, v in asdict(recipe).items() if not k.endswith("_config")},
        curve=fit["curve"],
    )
    (tmp / "train.json").write_text(json.dumps(record, indent=1) + "\n")
    _place(tmp, root / name)
    log.info("%s: %.1f MB -> %s", name, nbytes / 1e6, root / name)
    return root / name


def agreement(target_folder: Path, draft_folder: Path, recipe: Recipe | None = None) -> dict[str, Any]:
    """How often the draft's greedy choice equals the target's on held-out prompts.

    `teacher_forced`: along the target's greedy continuation, the share of tokens the draft predicts
    (its argmax after the same prefix): what greedy speculative decoding accepts. `greedy_equal`: the
    share of positions where both models' own greedy continuations hold the same token, and
    `median_first_difference`: where they first part.
    """
    import torch
    import transformers
    from tokenizers import Tokenizer

    recipe = recipe or Recipe()
    bpe = Tokenizer.from_file(str(target_folder / "tokenizer.json"))
    p, k = recipe.agree_prompt, recipe.agree_new
    starts = _heldout_starts(bpe, p)[: recipe.agree_prompts]
    x = torch.tensor([ids[:p] for ids in starts])
    target = transformers.LlamaForCausalLM.from_pretrained(target_folder).eval()
    drafter = transformers.LlamaForCausalLM.from_pretrained(draft_folder).eval()
    kw = dict(attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=k, min_new_tokens=k)
    with torch.no_grad():
        t_seq = target.generate(x, **kw)
        d_seq = drafter.generate(x, **kw)
        guess = drafter(input_ids=t_seq[:, :-1]).logits[:, p - 1 :].argmax(-1)
    t_new, d_new = t_seq[:, p:], d_seq[:, p:]
    firsts = sorted(int(row.nonzero()[0]) if bool(row.any()) else k for row in t_new != d_new)
    return dict(
        prompts=len(starts),
        prompt_tokens=p,
        new_tokens=k,
        teacher_forced=round(float((guess == t_new).float().mean()), 4),
        greedy_equal=round(float((t_new == d_new).float().mean()), 4),
        median_first_difference=firsts[len(firsts) // 2],
    )


def _record_agreement(root: Path, recipe: Recipe) -> dict[str, Any]:
    """Measure `agreement` and write it into both models' train.json (each replaced whole)."""
    result = agreement(root / TARGET, root / DRAFT, recipe)
    for name in (TARGET, DRAFT):
        path = root / name / "train.json"
        record = json.loads(path.read_text())
        record["agreement"] = result
        tmp = path.with_name(f".train.json.{os.getpid()}")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, path)
    log.info("draft vs target: %s", result)
    return result


# ---------------------------------------------------------------------------------------------- API


def _model(name: str, root: Path | None, recipe: Recipe | None) -> Path:
    root = root or cache_dir()
    folder = root / name
    if not (folder / "config.json").is_file():
        _train_model(root, name, recipe or Recipe())
    return folder


def target(root: Path | None = None, recipe: Recipe | None = None) -> Path:
    """The target model's folder (93 MB fp32 Llama, with its tokenizer), trained first if missing."""
    return _model(TARGET, root, recipe)


def draft(root: Path | None = None, recipe: Recipe | None = None) -> Path:
    """The draft model's folder (11 MB fp32 Llama, the target's tokenizer), trained first if missing."""
    return _model(DRAFT, root, recipe)


def moe(root: Path | None = None, recipe: Recipe | None = None, force: bool = False) -> Path:
    """The mixture-of-experts' folder (109 MB fp32 Qwen3-MoE, 32 experts a layer, top-4), trained first if missing."""
    root = root or cache_dir()
    if force and (root / MOE).exists():
        shutil.rmtree(root / MOE)
    return _model(MOE, root, recipe)


def build(root: Path | None = None, recipe: Recipe | None = None, force: bool = False) -> dict[str, Path]:
    """The tokenizer, the target, the draft (all retrained with `force`), and their agreement in train.json."""
    root = root or cache_dir()
    recipe = recipe or Recipe()
    root.mkdir(parents=True, exist_ok=True)
    if force:
        _streams.cache_clear()
        for name in (_tokenizer_folder(root).name, TARGET, DRAFT):
            if (root / name).exists():
                shutil.rmtree(root / name)
    out = {"tokenizer": tokenizer_path(root, recipe), "target": target(root, recipe), "draft": draft(root, recipe)}
    if any("agreement" not in json.loads((out[k] / "train.json").read_text()) for k in ("target", "draft")):
        _record_agreement(root, recipe)
    return out
