"""Tiny random-weight models shared by the tests: real transformers architectures and a plain nn.Module."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn

transformers.logging.set_verbosity_error()
VOCAB = 99


def bert() -> transformers.BertModel:
    cfg = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    return transformers.BertModel(cfg).eval()


def gpt2() -> transformers.GPT2LMHeadModel:
    cfg = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=3,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


def llama(hidden: int = 32, intermediate: int = 64, positions: int = 64) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=positions,
        bos_token_id=0,
        eos_token_id=1,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def llama_quantizable() -> transformers.LlamaForCausalLM:
    """A Llama whose MLPs (128 x 64) are large enough to be quantized (`llama()`'s are all kept as stored)."""
    return llama(hidden=64, intermediate=128, positions=128)


HF_MODELS = {"bert": bert, "gpt2": gpt2, "llama": llama}


def tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built here, no download: `<s>` `</s>` `<unk>` (0-2), then words `w0`..`w95`.

    One token per id of the models' vocabulary, so any id they generate decodes; words split on spaces
    and decode joined by spaces.
    """
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel

    words = ["<s>", "</s>", "<unk>", *(f"w{i}" for i in range(VOCAB - 3))]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def pretrained(cls: Any, folder: Path | str, **kwargs: Any) -> Any:
    """`cls.from_pretrained(folder, **kwargs)` in eval mode, its weights copied into memory torch allocated.

    The reference that streamed models are compared with. `from_pretrained` leaves the weights as views
    into the mapped model.safetensors, placed by the length of its JSON header (test_quant's Llama: from
    byte 2200, every weight at 24 mod 64; its GPT-2: 8 mod 64). Where MKL takes its generic path (an AMD
    EPYC with AVX-512), a one-row fp32 product rounds differently by the weight's 16-byte alignment, so
    such a reference differed from the same weights at 64 bytes by an ulp (lm_head; GotOcr2's
    projector). torch's allocator aligns to 64 bytes, as the unit files do.
    """
    model = cls.from_pretrained(folder, **kwargs).eval()
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original kept alive, copy)
    with torch.no_grad():
        for p in model.parameters():  # one per tied weight: the ties stay
            p.data = p.data.clone()
            assert p.data_ptr() % 64 == 0, "torch's CPU allocator no longer aligns to 64 bytes"
        for module in model.modules():
            for name, b in module._buffers.items():
                if b is not None:  # a buffer shared by several modules stays shared
                    module._buffers[name] = copies.setdefault(id(b), (b, b.clone()))[1]
    return model


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + torch.relu(self.fc(x)))


class Custom(nn.Module):
    """Root-level parameter, a shared block called twice, a tied head and a non-persistent buffer."""

    def __init__(self, dim: int = 16, vocab: int = VOCAB) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.scale = nn.Parameter(torch.randn(dim))
        self.blocks = nn.ModuleList(Block(dim) for _ in range(3))
        self.shared = Block(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight
        self.register_buffer("offset", torch.linspace(-1, 1, dim), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) * self.scale + self.offset  # x: [B, S, D]
        for block in self.blocks:
            x = self.shared(block(x))
        return self.head(x)


def ids(batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(2, VOCAB, (batch, seq), generator=g)


def mappings_of(prefix: str) -> list[dict[str, str]]:
    """This process's `/proc/self/smaps` entries for files whose path starts with `prefix` (field -> value)."""
    out: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if "-" in head[0] and not head[0].endswith(":"):  # a mapping's header line
                current = {} if len(head) == 6 and head[5].rstrip("\n").startswith(prefix) else None
                if current is not None:
                    out.append(current)
            elif current is not None:
                key, _, value = line.partition(":")
                current[key] = value.strip()
    return out


def kib(value: str) -> int:
    """Bytes of an smaps size field such as `"132 kB"`."""
    return int(value.split()[0]) * 1024


_libc = ctypes.CDLL(None, use_errno=True)  # the tests' own handle: argtypes set here stay out of pylomin's
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def cached_pages(path: Path) -> list[bool]:
    """Which pages of the file are in the page cache: mincore(2) on a fresh mapping, which touches none."""
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
    vec = (ctypes.c_ubyte * (-(-size // mmap.PAGESIZE)))()
    try:
        assert _libc.mincore(addr, size, vec) == 0, os.strerror(ctypes.get_errno())
    finally:
        _libc.munmap(addr, size)
    return [bool(b & 1) for b in vec]


def evict(files: list[Path]) -> None:
    """Write `files` back and drop them from the page cache: what is cached afterwards, something read."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def chosen_experts(model: nn.Module) -> dict[str, set[int]]:
    """Records, per experts module of `model`, the experts its router chooses in each forward from now on."""
    from pylomin.modeling import experts_count

    chosen: dict[str, set[int]] = {}
    for name, module in model.named_modules():
        if experts_count(module) is not None:
            module.register_forward_pre_hook(
                lambda m, args, name=name: chosen.setdefault(name, set()).update(args[1].unique().tolist())
            )
    return chosen


def load_unguessed(folder: Path, cls: Any, **kwargs: Any) -> Any:
    """`pylomin.load_streaming(folder, cls, **kwargs)` with each layer's experts read only once its router has chosen,
    never guessed ahead from the layer before (`Options.expert_guessing=False`)."""
    import dataclasses

    from pylomin.runtime import options, streaming

    return streaming.load(folder, cls, dataclasses.replace(options.Options.check(**kwargs), expert_guessing=False))
