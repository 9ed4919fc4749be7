"""The speed before the run: what a streamed model keeps resident at a memory figure, reads per decode token, and decodes at.

`estimate` asks the model's own memory policy what it would keep resident at that memory (the KV cache
and the activations counted against it first), adds up what a decode token then reads from disk, and
turns that into seconds with two figures measured on this machine: a short cold read of the model's unit
files (the disk) and a one-row product over its weights (the compute). Nothing here decides anything
the runtime does; it only asks `MemoryPolicy.plan_at`.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pylomin._os import Memory, read_memory
from pylomin.format import manifest as fmt
from pylomin.modeling import kv_cache_bytes, pass_bytes
from pylomin.runtime.model import Stream, stream_of
from pylomin.runtime.options import Options, parse_bytes
from pylomin.runtime.policy import MemoryPolicy, Plan, with_available

logger = logging.getLogger(__name__)

MIB, GIB = 2**20, 2**30
# The cold read: enough of the unit files to see the disk's sustained rate, not just its cache
# (128 MiB and more read at the same rate as whole 1.4 GB models on the benchmarks' machine), and a
# set of weights larger than a CPU's last-level cache for the compute probe.
SAMPLE_MIN, SAMPLE_MAX = 128 * MIB, 256 * MIB
_CHUNK = 16 * MIB
# A cold read faster than this came from memory: pages that another mapping keeps in the page cache
# cannot be dropped. NVMe drives read 3-7 GB/s; the benchmarks' disk 1.1-2.1 GB/s.
PLAUSIBLE_DISK = 8e9
FALLBACK_DISK = 1e9  # then assumed: a conservative SSD figure, said so in `describe`
# The Python side of a decode token, in calls of a tiny `nn.Linear` (timed on this machine by
# `_call_seconds`): per token, generate()'s own work; per leaf module, the module call and the ops its
# parent runs around it (rotary, attention over the cache, reshapes); per hooked module, pylomin's hooks.
# Calibrated on the benchmarks' machine (docs/benchmarks.md, 2 cores) in thread CPU time on one thread,
# which other processes' load does not inflate: Llamas with 64-wide layers decoded in 123 / 294 / 1483
# tiny calls per token with 1 / 4 / 24 layers (14 / 44 / 244 leaves; a call 5.6 us): 32 + 6 per leaf;
# the 24-layer one 0.9-1.4 ms more through pylomin with everything resident (27 hooked modules): 6-9 each.
CALLS_PER_TOKEN = 32
CALLS_PER_LEAF = 6
CALLS_PER_TARGET = 8


@dataclass(frozen=True)
class Estimate:
    """What a streamed model would keep resident, read and decode at, for one memory figure (bytes, seconds)."""

    model_bytes: int
    memory: int  # bytes this process may use (given, or read as memory_budget="auto" reads it)
    resident_bytes: int  # what the memory policy would keep resident at that memory
    read_per_token: int  # bytes read from disk per decode token (MoE: the routed experts' share, less the expert cache)
    kv_bytes: int  # KV cache at batch x context (modeling.kv_cache_bytes)
    disk_bytes_per_s: float  # measured by a short cold read of the model's own unit files (or given)
    compute_s: float  # seconds per decode token with everything resident (measured by a probe, or given)
    seconds_per_token: float  # the prediction
    fits: bool  # False: the KV cache + activations + the smallest streaming window do not fit in memory
    reason: str  # why not, in words, naming the figures and what to do ("" when it fits)
    notes: tuple[str, ...] = ()  # how each figure was found (describe() prints them)

    @property
    def tokens_per_s(self) -> float:
        """The predicted decode speed: 1 / `seconds_per_token`."""
        return 1.0 / self.seconds_per_token if self.seconds_per_token > 0 else math.inf

    def describe(self) -> str:
        """A few lines for humans: memory, resident / streamed, bytes per token, disk GB/s, predicted tok/s."""
        reads = self.read_per_token / self.disk_bytes_per_s
        streamed = max(0, self.model_bytes - self.resident_bytes)
        lines = [
            f"memory {_gib(self.memory)}, KV cache {_gib(self.kv_bytes)}; model {_gib(self.model_bytes)}: "
            f"{_gib(self.resident_bytes)} resident, {_gib(streamed)} streamed",
            f"reads {_gib(self.read_per_token)} per token from a disk reading {self.disk_bytes_per_s / 1e9:.2f} GB/s "
            f"({reads:.3f} s); compute {self.compute_s:.3f} s per token with everything resident",
            f"predicted {self.tokens_per_s:.2f} tok/s ({self.seconds_per_token:.3f} s per token)"
            + ("" if self.fits else ": but it does not fit"),
            *self.notes,
        ]
        if self.reason:
            lines.append(self.reason)
        return "\n".join(lines)


def estimate(
    src: str | os.PathLike[str],
    model_cls: Callable[..., nn.Module] | type | str = "transformers.AutoModelForCausalLM",
    *,
    memory: int | str | None = None,
    batch: int = 1,
    context: int = 2048,
    disk_bytes_per_s: float | None = None,
    compute_s: float | None = None,
    model: nn.Module | None = None,
) -> Estimate:
    """Predict the decode speed of `src` streamed with pylomin's defaults at `memory`, before running it.

    What stays resident is the memory policy's own answer (`MemoryPolicy.plan_at`) at `memory` less the
    KV cache of `batch` x `context` tokens and what a decode step allocates beyond the policy's headroom
    (`modeling.pass_bytes`, as the runtime's re-check counts it). It fits when the prompt's pass (the
    cache it fills, its activations) and the decode steps each leave room for the headroom and the
    smallest streaming window (the largest unit read whole, nothing ahead). A decode token
    reads the streamed units whole, and of fused MoE experts that are not resident the ones the router
    chooses, `num_experts_per_tok` of E per sequence, with uniform routing assumed: a batch of B chooses
    E * (1 - (1 - k/E)^B) distinct experts per layer, and the expert cache, which keeps the most used
    ones, hits in proportion to its share of the experts' bytes. Seconds per token = compute_s +
    read_per_token / disk_bytes_per_s: the read-ahead runs at most two units ahead, so the resident part
    computes with the disk idle, and on the streamed part the kernel's work of bringing pages in and
    dropping them shares the cores with the compute (on the benchmarks' 2-core machine this sum came
    within 10 % of the measured decode at 25-75 % of the model, where max(compute, reads) was 25 % fast).

    Args:
        src: a converted folder (or anything `load_streaming` takes: a repo id, a Hugging Face folder).
        model_cls: the class or import path to build, as for `load_streaming`.
        memory: bytes this process may use (`"8GiB"` or an int); None or `"auto"`: read now, as
            `memory_budget="auto"` reads it (cgroup limits and MemAvailable, less what other streamed
            models of this process keep resident).
        batch: sequences decoded together.
        context: tokens per sequence, the prompt included.
        disk_bytes_per_s: the disk's read rate; default: measured by a cold read of 128-256 MiB of the
            model's unit files (their pages dropped first, and again after). A figure above 8 GB/s came
            from the page cache (another mapping holds the pages): 1 GB/s is assumed instead.
        compute_s: seconds per decode token with everything resident; default: measured, a one-row
            `F.linear` over real weights of the model (warm) scaled to the bytes a token multiplies by,
            plus the Python side of each module (a tiny module call, measured, times calibrated counts).
        model: a model `load_streaming` returned for `src`, reused (its read-ahead window is the one
            asked about); default: `src` loaded with nothing resident and no reader, then unloaded.

    Returns:
        An `Estimate`; `fits` is False (and `reason` says why) when the KV cache, the activations and
        the smallest streaming window do not fit in `memory`. Figures measured on a busy machine vary.

    Example:
        >>> e = pylomin.estimate("llama-pylomin/", memory="8GiB", context=4096)
        >>> print(e.describe())
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch={batch!r}: give a whole number of sequences, 1 or more")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context={context!r}: give a whole number of tokens, 1 or more")
    for name, given in (("disk_bytes_per_s", disk_bytes_per_s), ("compute_s", compute_s)):
        if given is not None and not (isinstance(given, (int, float)) and math.isfinite(given) and given > 0):
            raise ValueError(f"{name}={given!r}: give a positive number, or None to measure it")
    owned = model is None
    if model is None:
        from pylomin.runtime.streaming import load_streaming

        model = load_streaming(src, model_cls, memory_budget=0, prefetch=0)
    try:
        return _estimate(model, stream_of(model), owned, memory, batch, context, disk_bytes_per_s, compute_s)
    finally:
        if owned:
            from pylomin.runtime.streaming import unload_

            unload_(model)


def _estimate(
    model: nn.Module,
    stream: Stream,
    owned: bool,
    memory: int | str | None,
    batch: int,
    context: int,
    disk: float | None,
    compute: float | None,
) -> Estimate:
    policy = stream.policy
    config = getattr(model, "config", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    kv = kv_cache_bytes(config, batch, context, dtype) if config is not None else 0
    # What the runtime's own re-check sets aside (`modeling.pass_bytes`; within the headroom, the headroom
    # covers it): while decoding, the KV cache is allocated already and a step adds little; the prompt's pass
    # fills the cache and holds the widest activations (its attention scores, as the math kernel allocates them).
    step = pass_bytes(config, batch, 1, context - 1, logits=1, dtype=dtype) if config is not None else 0
    prompt = pass_bytes(config, batch, context, logits=1, dtype=dtype) if config is not None else 0
    figure = _memory(memory, policy)
    # A model loaded here to ask has no reader (prefetch=0): ask about the default's window instead.
    units = Options.check().prefetch if owned else None
    decoding = with_available(figure, -(kv + max(0, step - policy.headroom)))
    decision, plan = policy.plan_at(decoding, prefetch_units=units)
    top_k = _top_k(config)
    read, active, chosen_read = _per_token(policy, plan, top_k, batch)
    notes = [f"memory: {figure.source}; KV cache for batch {batch} x {context} tokens"]

    sample: list[torch.Tensor] = []
    if disk is None or compute is None:
        rate, sample, what = _sample(stream, cold=disk is None)
        if disk is None:
            if rate > PLAUSIBLE_DISK:
                what += (
                    f": {rate / 1e9:.1f} GB/s is the page cache, not the disk; {FALLBACK_DISK / 1e9:.1f} GB/s assumed"
                )
                rate = FALLBACK_DISK
            disk = rate
            notes.append(f"disk: {what}")
    else:
        notes.append("disk: given")
    if compute is None:
        compute, what = _compute(model, policy, sample, active, kv)
        notes.append(f"compute: {what}")
    else:
        notes.append("compute: given")

    # The smallest streaming window: the largest unit read whole (and a layer's chosen experts), nothing ahead.
    window = policy.largest_streamed(0) + chosen_read
    need = max(max(policy.headroom, prompt), kv + max(policy.headroom, step)) + min(window, policy.model_bytes)
    fits = figure.available >= need
    reason = ""
    if not fits:
        reason = (
            f"does not fit: the KV cache for batch {batch} x {context} tokens ({_gib(kv)}), the prompt's pass "
            f"({_gib(prompt)} with the cache it fills and its activations), the smallest streaming window "
            f"({_gib(window)}: the largest unit, read whole) and the {policy.headroom // MIB} MiB headroom need "
            f"{_gib(need)}, and the memory is {_gib(figure.available)}; give it more memory, or a smaller batch or "
            "context"
        )
    seconds = compute + read / disk
    logger.debug("estimate: %s; %s", decision.describe(), "; ".join(notes))
    return Estimate(
        model_bytes=policy.model_bytes,
        memory=figure.available,
        resident_bytes=plan.resident_bytes,
        read_per_token=read,
        kv_bytes=kv,
        disk_bytes_per_s=disk,
        compute_s=compute,
        seconds_per_token=seconds,
        fits=fits,
        reason=reason,
        notes=tuple(notes),
    )


def _memory(memory: int | str | None, policy: MemoryPolicy) -> Memory:
    # As "auto" reads it: the figure, less what the other streamed models of this process keep resident.
    if memory is None or isinstance(memory, str) and memory.strip().lower() == "auto":
        return with_available(read_memory(), -policy.resident_elsewhere())
    if isinstance(memory, bool) or not isinstance(memory, (int, str)):
        raise ValueError(f"memory={memory!r}: give a number of bytes, a size such as '8GiB', or None to read it")
    n = parse_bytes(memory)
    if n < 0:
        raise ValueError(f"memory={memory!r}: a size cannot be negative")
    return Memory(n, n, "given")


def _top_k(config: Any) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    k = getattr(text, "num_experts_per_tok", None)
    return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else 2  # as the runtime assumes


def _per_token(policy: MemoryPolicy, plan: Plan, top_k: int, batch: int) -> tuple[int, int, int]:
    """(bytes a decode token reads from disk, bytes of weights it multiplies by, the largest experts read of one
    layer): streamed units whole; of fused experts, the chosen ones under uniform routing, less the cache's hits."""
    fused = plan.experts
    loc = policy.locations
    read = sum(
        loc[n].length for i in plan.streamed for n in set(policy.targets[i].tensors) - plan.resident if n not in fused
    )
    dense = sum(loc[n].length for t in policy.targets if not t.lookup for n in set(t.tensors) if n not in fused)
    kept = not fused or set(fused) <= plan.resident
    total = sum(loc[n].length for n in fused)
    hit = 1.0 if kept else min(1.0, plan.expert_cache_bytes / total) if total else 1.0
    active = largest = 0
    for t in policy.targets:
        names = [n for n in t.tensors if n in fused]
        if not names:
            continue
        count = fused[names[0]].count
        k = min(top_k, count)
        distinct = count * (1 - (1 - k / count) ** batch)  # of E experts, those B sequences choose
        layer = distinct * sum(fused[n].stride for n in names)
        active += round(layer)
        largest = max(largest, 0 if kept else math.ceil(layer))
        read += round(layer * (1 - hit))
    return read, dense + active, largest


def _sample(stream: Stream, *, cold: bool) -> tuple[float, list[torch.Tensor], str]:
    """Read 128-256 MiB of the model's unit files into memory: the disk's rate (their pages dropped before and after
    when `cold`) and the floating matrices read ([rows, cols] views of the buffers, for the compute probe).

    Units the model keeps resident are read last: their mapped pages stay in the page cache.
    """
    store = stream.store
    resident = stream.policy.plan.resident

    def order(unit: fmt.Unit) -> tuple[bool, bool]:
        held = any(n in resident for n in unit.tensors)
        return held, not any(_matrix(info) for info in unit.tensors.values())

    picked: list[tuple[Path, fmt.Unit, int]] = []
    total = 0
    for unit in sorted(store.manifest.units, key=order):
        if total >= SAMPLE_MIN:
            break
        if total and total + unit.size > SAMPLE_MAX:
            continue
        n = min(unit.size, SAMPLE_MAX)
        picked.append((fmt.resolve_inside(store.folder, unit.file), unit, n))
        total += n
    paths = [p for p, _, _ in picked]
    if cold:
        _drop_pages(paths)
    buffers = []
    t0 = time.perf_counter()
    for path, _, n in picked:
        buf = torch.empty(n, dtype=torch.uint8)  # torch's allocator aligns to 64 bytes, as the unit files do
        view = memoryview((ctypes.c_char * n).from_address(buf.data_ptr())).cast("B")
        with open(path, "rb", buffering=0) as f:
            done = 0
            while done < n and (got := f.readinto(view[done : min(n, done + _CHUNK)])):
                done += got
        buffers.append(buf)
    seconds = time.perf_counter() - t0
    if cold:
        _drop_pages(paths)  # leave no warm copy behind, as streaming does
    matrices = [
        buf[info.offset : info.offset + info.length].view(info.torch_dtype).view(-1, info.shape[-1])
        for buf, (_, unit, n) in zip(buffers, picked, strict=True)
        for info in unit.tensors.values()
        if _matrix(info) and info.offset + info.length <= n
    ]
    rate = total / seconds if seconds > 0 else math.inf
    what = f"a cold read of {total / MIB:.0f} MiB of its unit files" if cold else "given"
    return rate, matrices, what


def _matrix(info: Any) -> bool:
    return len(info.shape) >= 2 and info.length > 0 and info.torch_dtype.is_floating_point


def _drop_pages(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped: a folder just converted may have some
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _compute(
    model: nn.Module, policy: MemoryPolicy, matrices: list[torch.Tensor], active: int, kv: int
) -> tuple[float, str]:
    """Seconds per decode token with everything resident: the bytes a token multiplies by (and half the KV
    cache, which attention reads, on average over a context filled as it decodes) at the probe's one-row rate,
    plus the Python side of every module."""
    if not matrices:  # nothing floating in the sample (a quantized model's layers): a matrix of that size
        matrices = [torch.randn(4096, 4096)]
    rate = _gemv_rate(matrices)
    call = _call_seconds()
    leaves = sum(1 for m in model.modules() if next(m.children(), None) is None)
    python = call * (CALLS_PER_TOKEN + CALLS_PER_LEAF * leaves + CALLS_PER_TARGET * len(policy.targets))
    seconds = (active + kv / 2) / rate + python
    what = (
        f"a one-row product over {sum(m.nbytes for m in matrices) / MIB:.0f} MiB of its weights at "
        f"{rate / 1e9:.1f} GB/s, {(active + kv / 2) / MIB:.0f} MiB per token, and {python * 1e3:.1f} ms of "
        f"Python ({leaves} modules, {len(policy.targets)} hooked)"
    )
    return seconds, what


@torch.no_grad()
def _gemv_rate(matrices: list[torch.Tensor], repeats: int = 7) -> float:
    """Bytes/second of `F.linear` of one row over `matrices`, warm (the first pass brings them into the caches
    it can); the median of `repeats` passes."""
    rows = {(m.shape[1], m.dtype): torch.randn(1, m.shape[1]).to(m.dtype) for m in matrices}
    nbytes = sum(m.nbytes for m in matrices)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        for m in matrices:
            F.linear(rows[(m.shape[1], m.dtype)], m)
        if i:
            times.append(time.perf_counter() - t0)
    return nbytes / max(statistics.median(times), 1e-9)


@torch.no_grad()
def _call_seconds(calls: int = 200, repeats: int = 5) -> float:
    """Seconds of one call of a tiny `nn.Linear` on one row: the Python and dispatch cost of a module."""
    layer, x = nn.Linear(16, 16), torch.randn(1, 16)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            layer(x)
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"
