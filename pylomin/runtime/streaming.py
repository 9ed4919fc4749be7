"""`load_streaming`: a converted folder becomes a live model whose parameters stay on disk until used.

Load: build the model on meta, bind its parameters to the unit files (`model`), let the memory
policy plan what stays resident (`policy`), pin that, start the reader (`prefetch`), and register the
hooks whose pass lifecycle pages everything else in and out (`lifecycle`, `pager`).
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin._os import Memory
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.quant import Scheme, parse_scheme
from pylomin.modeling import (
    build_on_meta,
    check_layout,
    experts_count,
    experts_routers,
    fused_experts,
    resolve_model_cls,
)
from pylomin.runtime.experts import ExpertPaging
from pylomin.runtime.lifecycle import Lifecycle
from pylomin.runtime.model import Stream, bind, pop_stream, set_stream, stored_dtype, stream_of
from pylomin.runtime.options import Options
from pylomin.runtime.pager import Pager
from pylomin.runtime.policy import MemoryPolicy, Plan, Target
from pylomin.runtime.prefetch import Prefetcher
from pylomin.runtime.quant import check_kernels, prepare_
from pylomin.runtime.stage import Copy, PinnedCopy, Stager
from pylomin.runtime.store import Store

logger = logging.getLogger(__name__)


def load_streaming(
    path: str | os.PathLike[str],
    model_cls: Callable[..., nn.Module] | type | str,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    drop_page_cache: bool | None = None,
    prefetch: int = 2,
    prefetch_bytes: int | str = "256MiB",
    memory_budget: int | str | None = "auto",
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    quantize: str | Scheme | None = None,
) -> nn.Module:
    """Build `model_cls` with its parameters on disk, paged in per unit as the model runs.

    Args:
        path: a folder written by `pylomin.convert` / `pylomin-convert`; or a Hub repo id
            (`org/name`) or a local Hugging Face folder (a `config.json`, no `pylomin.json`),
            converted on first use into pylomin's cache (logged at INFO) and reused afterwards.
        model_cls: a transformers model class (`BertModel`, `AutoModelForCausalLM`, ...), built
            from the folder's `config.json`; or any zero-argument callable returning the `nn.Module`;
            or its import path as a string (`"transformers.BertModel"`, `"pkg.mod:factory"`), as the
            CLI takes it.
        device: `"cpu"` (parameters are zero-copy views of the mapped files) or a CUDA device
            (each unit is copied in before it runs).
        dtype: cast floating-point parameters to this dtype as they are loaded; default: as stored.
        drop_page_cache: after a unit runs, also drop its pages from the page cache, so the
            process leaves no warm copy behind; `False` keeps them cached for the next forward.
            Default: chosen with the budget (kept when the whole model is resident, dropped
            when part of it streams, so that it never pushes the resident part out).
        prefetch: how many units a background reader makes resident ahead of the one running,
            in the execution order recorded on the first forward; 0 turns prefetching off.
            With `memory_budget="auto"`, at most this many: fewer when a wider window would not fit.
        prefetch_bytes: at most this many bytes read ahead (`"512MiB"`, `"2GB"` or an int).
        memory_budget: `"auto"` (default): read how much memory this process may use (cgroup
            v1/v2 limits and `MemAvailable`, the smallest), keep the whole model resident if it
            fits (in-memory speed), else keep resident what fits and stream the rest; re-read
            between forwards, at most once a second, and follow it (decisions are logged at
            INFO). An int or `"2GiB"`: a fixed budget (tied and embedding weights first, then in
            execution order; for MoE models, what is left keeps the most used experts). `0`:
            least memory, everything streams.
        revision: with a repo id, the branch, tag or commit (default `main`).
        cache_dir: with a repo id, where converted models are kept (default `$PYLOMIN_CACHE`,
            else `~/.cache/pylomin`).
        quantize: convert with quantized Linear weights (see `pylomin.convert`):
            `pylomin.Int8WeightOnly()`, `pylomin.Int4WeightOnly(...)` or `"int8"`, `"int4"`,
            `"int4-g128"`. A repo id, a Hugging Face folder or a converted folder holding weights as
            stored is converted into pylomin's cache (once; the scheme is part of the cache key); a
            converted folder holding quantized weights says what it holds (this only checks it).

    Returns:
        The model in eval mode, ready for inference; outputs equal the in-memory model's.

    Example:
        >>> model = pylomin.load_streaming("bert-pylomin/", transformers.BertModel)
        >>> with torch.no_grad():
        ...     out = model(input_ids)
    """
    options = Options.check(
        device=device,
        dtype=dtype,
        drop_page_cache=drop_page_cache,
        prefetch=prefetch,
        prefetch_bytes=prefetch_bytes,
        memory_budget=memory_budget,
    )
    return load(path, model_cls, options, revision=revision, cache_dir=cache_dir, quantize=quantize)


def load(
    path: str | os.PathLike[str],
    model_cls: Callable[..., nn.Module] | type | str,
    options: Options,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    quantize: str | Scheme | None = None,
) -> nn.Module:
    """`load_streaming` with its options checked already (`Options`, which also holds those only benchmarks set)."""
    model_cls = resolve_model_cls(model_cls)
    scheme = parse_scheme(quantize) if quantize is not None else None
    folder = Path(path)
    if not folder.exists() or _unconverted(folder) or scheme is not None and _unquantized(folder):
        # A repo id, a Hugging Face folder, or a converted folder to quantize: converted into the cache
        # on first use, found there afterwards. The converter is imported only here.
        from pylomin.converter import cache

        if scheme is not None:
            check_kernels(scheme)  # before converting: a scheme this machine cannot run is refused first
        folder = cache.resolve(os.fspath(path), revision, cache_dir=cache_dir, model_cls=model_cls, quantize=scheme)
    manifest = fmt.read(folder)
    held = manifest.quantization
    if scheme is not None and (held is None or held.scheme != scheme):
        holds = "unquantized weights" if held is None else f"{held.scheme} weights"
        if held is not None and held.scheme.head != scheme.head:
            holds += " (the LM head quantized too)" if held.scheme.head else " (the LM head as stored)"
        raise ValueError(
            f"quantize={quantize!r}, but `{folder}` holds {holds}; "
            f"a converted folder is loaded as it is: convert it with `pylomin-convert SRC OUT_DIR --quantize ...`"
        )
    model = build_on_meta(model_cls, folder, options.dtype or stored_dtype(manifest))
    check_layout(manifest.layout, model, folder)
    if held is not None:
        prepare_(model, held, folder, options.device)
    return attach_(model, folder, manifest, options).eval()


def self_draft(model: nn.Module, quantize: str | Scheme = "int4") -> nn.Module:
    """A draft for speculative decoding made of `model`'s own weights: its `quantize` conversion.

    `model` comes from `load_streaming`; its folder is converted once into pylomin's cache (later calls
    find it there) and loaded with the defaults, so the draft is kept resident where it fits. Greedy
    output with the draft stays exactly `model`'s: the draft only proposes tokens, `model` checks them
    all in one pass (one read of what it streams) and keeps the ones it would have chosen itself.

    Cost: on disk the quantized copy, once; in memory the same, resident. int4 (groups of 64) stores a
    Linear weight in ~0.16x its fp32 bytes; embeddings and the LM head stay as stored, so a model
    with a large vocabulary keeps more: 0.29x for a 1426 MiB fp32 Llama with 32000 tokens (416 MiB). The draft's memory comes first: it is
    planned as if `model` held nothing, and `model` gives back what the draft took at its next forward.
    The draft proposes 8 tokens at every pass (`DRAFT_PROPOSALS`): checking them costs `model` about
    what checking one does.

    Example:
        >>> draft = pylomin.self_draft(model)
        >>> out = model.generate(ids, assistant_model=draft, do_sample=False, max_new_tokens=64)
    """
    stream = stream_of(model)
    if stream.restore:
        raise ValueError(
            "self_draft needs a model from load_streaming; a lazy_loading model came from memory: "
            "quantize a copy of it with `pylomin.quantize_` and pass it as the draft"
        )
    with stream.policy.step_aside():  # the draft runs every token: it comes first, the model gives back the rest
        draft = load(stream.store.folder, stream.base_class, Options.check(device=stream.device), quantize=quantize)
    return propose_eagerly(draft)


# How a draft proposes over a streamed model (transformers reads them from the draft's generation config):
# a verify pass reads what streams once, however many tokens it checks (5 tokens cost 1.06x the time of 1
# under half the model), so the draft proposes 8 tokens every time instead of transformers' in-memory
# defaults (up to 20, stopping where its confidence falls below 0.4). Measured on a model trained on the
# standard library, half of it resident: the self-draft decoded 3.84x plain streamed decode this way,
# 1.82x with the defaults (`python -m benchmarks.speculative --parts draft`, docs/benchmarks.md).
DRAFT_PROPOSALS = {
    "num_assistant_tokens": 8,
    "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.0,
}


def propose_eagerly(draft: nn.Module) -> nn.Module:
    """Set `draft`'s generation config to propose as a streamed model's draft should (`DRAFT_PROPOSALS`)."""
    config = getattr(draft, "generation_config", None)
    if config is not None:
        for key, value in DRAFT_PROPOSALS.items():
            setattr(config, key, value)
    return draft


def _unquantized(folder: Path) -> bool:
    """A converted folder holding weights as stored (to be quantized into the cache)."""
    return (folder / fmt.MANIFEST_NAME).is_file() and fmt.read(folder).quantization is None


def _unconverted(folder: Path) -> bool:
    """A Hugging Face folder (a `config.json`, no `pylomin.json`), not a converted one."""
    return (folder / "config.json").is_file() and not (folder / fmt.MANIFEST_NAME).exists()


def attach_(
    model: nn.Module,
    folder: Path,
    manifest: fmt.Manifest,
    options: Options,
    *,
    strict: bool = True,
    restore: bool = False,
    remove_folder: bool = False,
    copy: Copy | None = None,
) -> nn.Module:
    """Bind `model` to the unit files of `folder`, plan, and register the hooks (for load_streaming and lazy_loading).

    `copy` copies streamed units to the device on the reader thread; default: through pinned
    buffers on CUDA, none on the CPU (parameters are views of the files there).
    """
    device = options.device
    store = Store(folder, manifest, drop_page_cache=options.drop_page_cache is not False)
    pager: Pager | None = None
    lifecycle: Lifecycle | None = None
    reader: Prefetcher | None = None
    try:
        slots = bind(model, manifest, store, options.dtype, strict=strict)
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buf.device != device:
                    module._buffers[name] = buf.to(device)
        position = {m: i for i, m in enumerate(model.modules())}
        order = sorted(slots, key=lambda m: position.get(m, len(position)))
        names = {m: n for n, m in model.named_modules()}
        targets = [
            Target(names.get(m, type(m).__name__), tuple(s.stored_name for s in slots[m]), isinstance(m, nn.Embedding))
            for m in order
        ]
        # Per-expert paging needs parameters that are views of the files (a device or dtype copy
        # copies whole tensors).
        zero_copy = device.type == "cpu" and options.dtype in (None, stored_dtype(manifest))
        stored = {(m, attr): s.stored_name for ss in slots.values() for s in ss for m, attr in s.owners}
        experts = fused_experts(model, stored) if zero_copy and options.expert_paging else {}
        policy = MemoryPolicy(
            targets,
            {name: store.location(name) for name in manifest.tensor_index()},
            memory_budget=options.memory_budget,
            prefetch_units=options.prefetch,
            prefetch_bytes=options.prefetch_bytes,
            drop_page_cache=options.drop_page_cache,
            experts={name: experts_count(m) or 0 for m, ns in experts.items() for name in ns},
            copies=not zero_copy,
            gpu=_gpu_memory(device) if options.memory_budget is None else None,
        )
        plan = policy.plan
        store.drop_page_cache = policy.drop_page_cache
        if policy.note:
            logger.info("%s", policy.note)
        pager = Pager(store, order, slots, plan, device=device)
        experts = {m: ns for m, ns in experts.items() if all(n in plan.experts for n in ns)}
        if experts:
            top_k = int(getattr(getattr(model, "config", None), "num_experts_per_tok", 0) or 2)
            pager.experts = ExpertPaging(store, experts, plan, top_k, pager.lock)
            if options.expert_guessing:
                pager.experts.predict_with(_guessing(model, list(experts), stored, store))
        for where in plan.random_access:
            store.random_access(where)
        pager.fault_in(pager.pin())
        if plan.prefetch_units > 0 or policy.adaptive and options.prefetch > 0:
            if copy is None and device.type == "cuda":
                copy = PinnedCopy(device, plan.largest_streamed)
            reader = _reader(store, pager, plan, copy)
        lifecycle = Lifecycle(model, pager, policy, reader)
        lifecycle.attach()
    except BaseException:
        if lifecycle is not None:
            lifecycle.detach()
        if reader is not None:
            reader.close()
        if pager is not None:
            pager.detach()  # no parameter may stay a view of a mapping closed below
        store.close()
        raise
    # Only what does not reference the model: the finalizer must not keep it alive.
    cleanup = weakref.finalize(model, _close, reader, store, folder if remove_folder else None)
    set_stream(model, Stream(store, policy, lifecycle, reader, type(model), device, restore, cleanup))
    return model


def _guessing(
    model: nn.Module, experts: list[nn.Module], stored: dict[tuple[nn.Module, str], str], store: Store
) -> list[tuple[nn.Module, nn.Module, nn.Module, torch.Tensor]]:
    """(router of an experts module, that module, the next experts module, a copy of the next one's router weight
    in memory) for each pair of consecutive experts modules whose routers are found and hold float weights."""
    routers = experts_routers(model)
    out = []
    for before, after in itertools.pairwise(experts):
        router, following = routers.get(before), routers.get(after)
        name = stored.get((following, "weight")) if following is not None else None
        if router is None or name is None:
            continue
        weight = store.view(name)
        if weight.is_floating_point() and weight.dim() == 2:
            # [E, hidden]: a few KiB for the tests' models, 3.5 MiB a layer at 256 experts x 7168 (bf16)
            out.append((router, before, after, weight.clone()))
    return out


def _reader(store: Store, pager: Pager, plan: Plan, copy: Copy | None) -> Prefetcher:
    """The reader thread, and on a device the stager that copies what it reads (the pager takes the copies)."""
    stager = None
    if copy is not None:
        streamed = {i: [s.stored_name for s in pager.slots[pager.order[i]] if not s.pinned] for i in plan.streamed}
        dtypes = {s.stored_name: s.placeholder.dtype for slots in pager.slots.values() for s in slots}
        stager = pager.stager = Stager(store, streamed, dtypes, copy)
    pager.reader = Prefetcher(
        store,
        dict(enumerate(map(list, plan.ranges))),
        list(range(len(pager.order))),  # module definition order, until a forward is recorded
        max_units=plan.prefetch_units,
        max_bytes=plan.prefetch_bytes,
        skip={i for i, r in enumerate(plan.read_ahead) if not r},
        stage=stager,
        whole_layers=pager.whole_layers(),
    )
    return pager.reader


def _gpu_memory(device: torch.device) -> Memory | None:
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return Memory(free, total, f"{device} free memory (torch.cuda.mem_get_info)")


def unload_(model: nn.Module) -> nn.Module:
    """Remove pylomin's hooks from `model`, stop its reader and close its files.

    A model from `lazy_loading` gets its parameters back in memory (and its temporary folder is
    removed); a model from `load_streaming` is left with its parameters on meta.

    Returns:
        The same model object.
    """
    stream = pop_stream(model)
    stream.policy.close()
    stream.lifecycle.detach()
    if stream.reader is not None:
        stream.reader.close()
    stream.lifecycle.pager.detach(restore=stream.restore)
    stream.cleanup()
    if not stream.restore:
        model.register_forward_pre_hook(_refuse_unloaded)
    return model


def _refuse_unloaded(module: nn.Module, args: Any) -> None:
    # Without its files, a streamed model's parameters are meta tensors: a forward would return meta
    # outputs (or fail far from the cause). Parameters assigned since (load_state_dict) run as usual.
    if any(p.is_meta for p in module.parameters()):
        raise PylominError(
            f"this `{type(module).__name__}` was unloaded by `pylomin.unload_`: its parameters are on meta; "
            "load it again with `pylomin.load_streaming`"
        )


def _close(prefetcher: Prefetcher | None, store: Store, folder: Path | None) -> None:
    if prefetcher is not None:
        prefetcher.close()
    store.close()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
