"""`load_streaming`: a converted folder becomes a live model whose parameters stay on disk until used."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import re
import shutil
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin.converter import cache, hub, layout
from pylomin.errors import PylominError
from pylomin.format import manifest as fmt
from pylomin.format.quant import Scheme, parse_scheme
from pylomin.modeling import build_on_meta, experts_count, resolve_model_cls
from pylomin.runtime.adapt import HEADROOM, Adaptive, Decision, decide, with_available
from pylomin.runtime.build import bind, stored_dtype
from pylomin.runtime.hooks import HookManager, Slot
from pylomin.runtime.limits import Memory, read_memory
from pylomin.runtime.plan import Plan, Target, make_plan
from pylomin.runtime.prefetch import Prefetcher
from pylomin.runtime.quant import check_kernels, prepare_
from pylomin.runtime.stage import Copy, PinnedCopy
from pylomin.runtime.store import Store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Options:
    """The runtime options of a streamed model, checked: what `load_streaming` and `lazy_loading` share."""

    device: torch.device
    dtype: torch.dtype | None
    drop_page_cache: bool | None  # None: chosen with the budget ("auto")
    prefetch: int
    prefetch_bytes: int
    memory_budget: int | None  # None: "auto", from the memory this process may use

    @classmethod
    def check(
        cls,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | str | None = None,
        drop_page_cache: bool | None = None,
        prefetch: int = 2,
        prefetch_bytes: int | str = "256MiB",
        memory_budget: int | str | None = "auto",
    ) -> Options:
        """Options from the user's arguments; a `ValueError` that says what is allowed for a bad one."""
        auto = memory_budget is None or isinstance(memory_budget, str) and memory_budget.strip().lower() == "auto"
        return cls(
            device=_check_device(device),
            dtype=_check_dtype(dtype),
            drop_page_cache=None if drop_page_cache is None else _check_bool("drop_page_cache", drop_page_cache),
            prefetch=_check_count("prefetch", prefetch),
            prefetch_bytes=_check_size("prefetch_bytes", prefetch_bytes),
            memory_budget=None if auto else _check_size("memory_budget", memory_budget),  # type: ignore[arg-type]
        )


@dataclass
class Stream:
    """What pylomin attaches to a model it streams: its files, its hooks, and how to undo them."""

    store: Store
    manager: HookManager
    base_class: type
    device: torch.device
    restore: bool  # unload_ copies parameters back into memory (models that came from memory)
    cleanup: Any  # weakref.finalize closing the files (and removing a temporary folder)


# Page fused experts per expert (the router's choice); False reads them with their layer, like any
# other tensor: only for benchmarks that compare the two.
PER_EXPERT = True

_STREAM = "_pylomin_stream"  # the one key pylomin sets on a model; read only through stream_of


def stream_of(model: nn.Module) -> Stream:
    """The `Stream` of a model from `load_streaming` or `lazy_loading`; `ValueError` for any other model."""
    stream = model.__dict__.get(_STREAM)
    if not isinstance(stream, Stream):
        raise ValueError(
            f"`{type(model).__name__}` is not a pylomin model (not returned by load_streaming or lazy_loading)"
        )
    return stream


def is_streamed(model: nn.Module) -> bool:
    """Whether pylomin streams `model` now."""
    return isinstance(model.__dict__.get(_STREAM), Stream)


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
        path: a folder written by `pylomin.convert` / `pylomin-convert`, or a Hub repo id
            (`org/name`), converted on first use into pylomin's cache and reused afterwards.
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
        quantize: with a repo id, convert it with quantized Linear weights (see `pylomin.convert`):
            `pylomin.Int8WeightOnly()`, `pylomin.Int4WeightOnly(...)` or `"int8"`, `"int4"`,
            `"int4-g128"`; the scheme is part of the cache key. A converted folder needs nothing:
            it says what it holds (this only checks it).

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
    model_cls = resolve_model_cls(model_cls)
    scheme = parse_scheme(quantize) if quantize is not None else None
    folder = Path(path)
    if hub.is_repo_id(path):
        if scheme is not None:
            check_kernels(scheme)  # before converting: a scheme this machine cannot run is refused first
        folder = cache.converted(os.fspath(path), revision, cache_dir=cache_dir, model_cls=model_cls, quantize=scheme)
    elif not folder.exists():
        raise FileNotFoundError(
            f"`{folder}` does not exist; convert a model first with `pylomin-convert MODEL {folder}`"
        )
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
    layout.check(manifest.layout, model, folder)
    if held is not None:
        prepare_(model, held, folder, options.device)
    return attach_(model, folder, manifest, options).eval()


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
    manager: HookManager | None = None
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
        locations = {name: store.location(name) for name in manifest.tensor_index()}
        # Per-expert paging needs parameters that are views of the files (a device or dtype copy
        # copies whole tensors).
        zero_copy = device.type == "cpu" and options.dtype in (None, stored_dtype(manifest))
        experts = _fused_experts(model, slots) if zero_copy and PER_EXPERT else {}
        fused = {name: count for names, count in experts.values() for name in names}
        model_bytes = sum(locations[n][2] for n in {n for t in targets for n in t.tensors})

        def plan_for(budget: int, units: int) -> Plan:
            return make_plan(
                targets,
                locations,
                memory_budget=budget,
                prefetch_units=units,
                prefetch_bytes=options.prefetch_bytes,
                experts=fused,
            )

        def largest_streamed(budget: int) -> int:  # what one streamed unit reads (a lookup: a few rows)
            plan = plan_for(budget, 0)
            return max(
                (
                    sum(locations[n][2] for n in set(t.tensors) - plan.resident - set(plan.experts))
                    for t in targets
                    if not t.lookup
                ),
                default=0,
            )

        decision = None
        if options.memory_budget is None:
            decision = _decide(options, device, model_bytes, largest_streamed)
            store.drop_page_cache = decision.drop_page_cache
            logger.info("%s", decision.describe())
            plan = plan_for(decision.memory_budget, decision.prefetch_units)
        else:
            plan = plan_for(options.memory_budget, options.prefetch)
        if copy is None and device.type == "cuda":
            copy = PinnedCopy(device, plan.largest_streamed)
        manager = HookManager(
            store,
            model,
            order,
            slots,
            plan,
            device=device,
            copy=copy,
            experts={m: names for m, (names, _) in experts.items() if all(n in plan.experts for n in names)},
        )
        if decision is not None:
            manager.memory_note = decision.describe()
            if device.type == "cpu":
                manager.adaptive = _adaptive(manager, decision, options, plan_for, largest_streamed, zero_copy)
        manager.attach()
        _LIVE.add(manager)
    except BaseException:
        if manager is not None:
            manager.detach()
        store.close()
        raise
    base = type(model)
    model.__class__ = _streamed_class(base)
    # Only what does not reference the model: the finalizer must not keep it alive.
    cleanup = weakref.finalize(model, _close, manager.prefetcher, store, folder if remove_folder else None)
    model.__dict__[_STREAM] = Stream(store, manager, base, device, restore, cleanup)
    return model


# The hook managers of the streamed models alive in this process: what each keeps resident is page
# cache that the memory figure counts as reclaimable, but that model will not give it up.
_LIVE: weakref.WeakSet[HookManager] = weakref.WeakSet()


def _resident_elsewhere(manager: HookManager | None) -> int:
    """Bytes the other streamed models of this process keep resident (file pages: host memory)."""
    return sum(m.plan.resident_bytes for m in list(_LIVE) if m is not manager and m.device.type == "cpu")


def _decide(
    options: Options, device: torch.device, model_bytes: int, largest_streamed: Callable[[int], int]
) -> Decision:
    """The `"auto"` decision at load: on the CPU from the memory this process may use (less what the
    other streamed models of this process keep resident); on CUDA the GPU holds what fits in its free
    memory, and the host page cache keeps the model warm if it fits."""
    host = with_available(read_memory(), -_resident_elsewhere(None))
    units, window = options.prefetch, options.prefetch_bytes
    if device.type != "cuda":
        return decide(
            host,
            model_bytes,
            largest_streamed,
            prefetch_units=units,
            prefetch_bytes=window,
            drop_page_cache=options.drop_page_cache,
        )
    free, total = torch.cuda.mem_get_info(device)
    gpu = Memory(free, total, f"{device} free memory (torch.cuda.mem_get_info)")
    on_gpu = decide(gpu, model_bytes, largest_streamed, prefetch_units=units, prefetch_bytes=window)
    warm_on_host = model_bytes <= host.available - HEADROOM
    drop = options.drop_page_cache if options.drop_page_cache is not None else not warm_on_host
    return dataclasses.replace(on_gpu, drop_page_cache=drop)


def _adaptive(
    manager: HookManager,
    decision: Decision,
    options: Options,
    plan_for: Callable[[int, int], Plan],
    largest_streamed: Callable[[int], int],
    zero_copy: bool,
) -> Adaptive:
    """Re-plans `manager` when the memory this process may use moves (CPU)."""

    def apply(d: Decision) -> None:
        manager.replan(
            plan_for(d.memory_budget, d.prefetch_units), drop_page_cache=d.drop_page_cache, note=d.describe()
        )

    def held() -> int:  # resident copies (a dtype cast) are anonymous memory, not reclaimable pages
        return 0 if zero_copy else manager.plan.resident_bytes

    return Adaptive(
        decision,
        largest_streamed,
        apply,
        prefetch_units=options.prefetch,
        prefetch_bytes=options.prefetch_bytes,
        drop_page_cache=options.drop_page_cache,
        held=held,
        taken=lambda: _resident_elsewhere(manager),
    )


def _fused_experts(model: nn.Module, slots: dict[nn.Module, list[Slot]]) -> dict[nn.Module, tuple[list[str], int]]:
    """Experts modules (transformers' `forward(hidden_states, top_k_index, top_k_weights)`) -> their fused
    tensors' stored names (leading dim = number of experts) and the number of experts."""
    stored = {(m, attr): s.stored_name for ss in slots.values() for s in ss for m, attr in s.owners}
    out: dict[nn.Module, tuple[list[str], int]] = {}
    for module in model.modules():
        count = experts_count(module)
        if count is None:
            continue
        names = [
            stored[(module, attr)]
            for attr, p in module._parameters.items()
            if p is not None and p.dim() >= 2 and p.shape[0] == count and (module, attr) in stored
        ]
        if names:
            out[module] = (names, count)
    return out


def unload_(model: nn.Module) -> nn.Module:
    """Remove pylomin's hooks from `model`, stop its reader and close its files.

    A model from `lazy_loading` gets its parameters back in memory (and its temporary folder is
    removed); a model from `load_streaming` is left with its parameters on meta.

    Returns:
        The same model object.
    """
    stream = stream_of(model)
    del model.__dict__[_STREAM]
    _LIVE.discard(stream.manager)
    stream.manager.detach(restore=stream.restore)
    stream.cleanup()
    model.__class__ = stream.base_class
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


_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(size: int | str) -> int:
    """`"2GiB"`, `"512MB"`, `"1.5 GiB"` or an int -> bytes."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", size)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {size!r} as a size; write e.g. '512MiB', '2GB' or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def _check_device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"device={device!r}: pylomin streams to 'cpu' or a CUDA device ('cuda', 'cuda:N')")
    if not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r}, but this torch sees no CUDA device (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, built with CUDA {torch.version.cuda}); use device='cpu'"
        )
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise ValueError(
            f"device={device!r}, but this machine has {count} CUDA device(s): use 'cuda:0'..'cuda:{count - 1}'"
        )
    return torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev


def _check_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    cast = fmt.parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if cast is not None and (not isinstance(cast, torch.dtype) or not cast.is_floating_point):
        raise ValueError(f"dtype={dtype!r}: give a floating-point dtype (float32, float16, bfloat16) or None")
    return cast


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r}: give True or False")
    return value


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name}={value!r}: give a whole number of units, 0 or more (0 turns it off)")
    return value


def _check_size(name: str, value: int | str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{name}={value!r}: give a number of bytes or a size such as '512MiB'")
    nbytes = parse_bytes(value)
    if nbytes < 0:
        raise ValueError(f"{name}={value!r}: a size cannot be negative")
    return nbytes


_STREAMED_CLASSES: dict[type, type] = {}


def _streamed_class(base: type) -> type:
    """A subclass of `base` for a streamed model: `device` is the streaming device, not that of its first
    (meta) parameter; `.to` where it already is does nothing, elsewhere says how to load it there;
    pickling says what to save instead. Its name and module are `base`'s, so it prints the same."""
    cls = _STREAMED_CLASSES.get(base)
    if cls is None:
        ns: dict[str, Any] = {
            "to": _to,
            "cpu": lambda self: _to(self, "cpu"),
            "cuda": lambda self, device=None: _to(self, "cuda" if device is None else torch.device("cuda", device)),
            "float": lambda self: _to(self, torch.float32),
            "half": lambda self: _to(self, torch.float16),
            "bfloat16": lambda self: _to(self, torch.bfloat16),
            "double": lambda self: _to(self, torch.float64),
            "__reduce_ex__": _refuse_pickle,
        }
        if isinstance(inspect.getattr_static(base, "device", None), property):
            # transformers reads `model.device` from the first parameter, which is on meta here.
            ns["device"] = property(lambda self: stream_of(self).device)
        cls = type(base.__name__, (base,), ns)
        cls.__module__ = base.__module__
        cls.__qualname__ = base.__qualname__
        _STREAMED_CLASSES[base] = cls
    return cls


def _to(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
    stream = stream_of(self)
    here = stream.device
    if device is not None and device.type == "meta":
        raise PylominError(
            "a streamed model's parameters are placeholders on meta already, paged in from their files per unit; "
            "`pylomin.unload_(model)` detaches it from its files"
        )
    if device is not None and (device.type != here.type or device.index not in (None, here.index)):
        raise PylominError(
            f"this streamed model runs on `{here}`; its weights stay in their files, so `.to({device})` cannot move "
            f"them: load it with `pylomin.load_streaming(..., device='{device}')`"
        )
    if dtype is not None:
        floats = {  # a quantized layer's scales keep their own dtype (`exact_dtype`), as in memory
            p.dtype
            for m in self.modules()
            for n, p in m._parameters.items()
            if p is not None and p.is_floating_point() and n not in getattr(m, "exact_dtype", ())
        }
        if floats - {dtype}:
            raise PylominError(
                f"this streamed model's weights are {', '.join(sorted(map(str, floats)))}; its weights stay in their "
                f"files, so `.to({dtype})` cannot cast them: load it with `pylomin.load_streaming(..., dtype={dtype})`"
            )
    return self


def _refuse_pickle(self: nn.Module, protocol: int) -> Any:
    raise TypeError(
        f"a streamed `{type(self).__name__}` cannot be pickled: its weights are mappings of the files of "
        f"`{stream_of(self).store.folder}`. Save `model.state_dict()` (it holds the real tensors) or call "
        "`save_pretrained`, or pickle the folder's path and load it again"
    )
