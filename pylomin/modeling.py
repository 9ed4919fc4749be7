"""Building a model with its parameters on meta (nothing allocated, nothing read), and what both layers know of its modules."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pylomin.errors import PylominError

_META_LOCK = threading.Lock()


def resolve_model_cls(model_cls: str | Callable[..., nn.Module] | type) -> Callable[..., nn.Module] | type:
    """An import path (`"transformers.BertModel"` or `"pkg.mod:factory"`) -> the object; anything else as is."""
    if not isinstance(model_cls, str):
        return model_cls
    module, sep, attr = model_cls.partition(":") if ":" in model_cls else model_cls.rpartition(".")
    if not sep or not module or not attr:
        raise ValueError(f"cannot import {model_cls!r}: write it as 'package.module.Class' or 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import `{model_cls}` ({e}); give e.g. transformers.BertModel") from None
    return obj  # type: ignore[no-any-return]


def build_on_meta(model_cls: Callable[..., nn.Module] | type, folder: Path, dtype: torch.dtype | None) -> nn.Module:
    is_hf = isinstance(model_cls, type) and (hasattr(model_cls, "_from_config") or hasattr(model_cls, "_model_mapping"))
    with params_on_meta():
        if is_hf:
            from transformers import AutoConfig

            if not (folder / "config.json").is_file():
                raise FileNotFoundError(
                    f"`{folder / 'config.json'}` not found: a transformers class is built from the folder's config; "
                    "pass a zero-argument factory returning the model instead"
                )
            config = AutoConfig.from_pretrained(folder)
            expected = getattr(getattr(model_cls, "config_class", None), "model_type", "")
            if expected and config.model_type != expected and not _borrowed(model_cls, config.model_type):
                raise PylominError(
                    f"`{folder / 'config.json'}` describes a `{config.model_type}` model, but `{model_cls.__name__}` "
                    f"is a `{expected}` class; pass the class matching the checkpoint (or an Auto class)"
                )
            build = getattr(model_cls, "_from_config", None) or model_cls.from_config  # type: ignore[union-attr]
            model = build(config, dtype=dtype) if dtype is not None else build(config)
            if hasattr(model, "tie_weights"):
                model.tie_weights()
        else:
            model = model_cls()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model_cls returned a {type(model).__name__}, not an nn.Module")
    return model


def _borrowed(model_cls: Any, model_type: str) -> bool:
    # transformers maps some model types to another architecture's class (exaone -> LlamaForCausalLM).
    from transformers.models.auto import modeling_auto

    tables = [getattr(modeling_auto, n) for n in dir(modeling_auto) if n.endswith("_MAPPING_NAMES")]
    names = [t.get(model_type) for t in tables if isinstance(t, dict)]
    flat = {x for n in names if n for x in (n if isinstance(n, (list, tuple)) else [n])}
    return model_cls.__name__ in flat


_BUILDING = threading.local()  # set in the thread that builds under `params_on_meta`


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered by this thread while this is active lands on meta; buffers stay real.

    Buffers computed in `__init__` (position ids, rotary frequencies, masks) keep their values,
    which building under `torch.device("meta")` would lose. `register_parameter` is patched on the
    class, so the patch checks the thread: modules other threads build meanwhile are untouched.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta" and getattr(_BUILDING, "on", False):
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    with _META_LOCK:
        nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
        _BUILDING.on = True
        try:
            yield
        finally:
            _BUILDING.on = False
            nn.Module.register_parameter = original  # type: ignore[method-assign]


def token_inputs(args: Any, kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    """A root forward's tokens: `input_ids` (`[batch, tokens]`) or `inputs_embeds` (`[batch, tokens, hidden]`),
    by keyword or as the first argument; None when it has neither."""
    x = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    return x if isinstance(x, torch.Tensor) else None


def kv_cache_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the key/value cache a decoder of `config` holds for `batch` sequences of `tokens` tokens.

    Keys and values per layer: `num_key_value_heads x head_dim` each (multi-latent attention, DeepSeek's:
    `heads x (qk_nope + qk_rope)` keys and `heads x v_head_dim` values, as transformers caches them).
    0 for a config without attention heads (an encoder-only or convolutional model still allocates
    activations, which the caller accounts for).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", None)
    layers = getattr(text, "num_hidden_layers", None)
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(heads, int) or not isinstance(layers, int) or heads <= 0:
        return 0
    if getattr(text, "qk_nope_head_dim", None) and getattr(text, "v_head_dim", None):
        per_token = heads * (text.qk_nope_head_dim + getattr(text, "qk_rope_head_dim", 0) + text.v_head_dim)
    else:
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or (hidden // heads if isinstance(hidden, int) else 0)
        per_token = 2 * kv_heads * head_dim
    return layers * per_token * batch * tokens * dtype.itemsize


def pass_bytes(
    config: Any, batch: int, new: int, past: int = 0, *, logits: int | None = None, dtype: torch.dtype = torch.float32
) -> int:
    """About what one forward of a decoder of `config` allocates beyond what it holds before: the KV cache
    it adds for `batch` x `new` tokens after `past` cached ones, and its largest live activations.

    Activations: a layer's hidden states and MLP intermediates for every new token, the attention
    scores (`heads x new x (past + new)` per sequence, as the math kernel allocates them), and the
    logits of `logits` tokens per sequence (None: every new token; `generate()` keeps the last one).
    An upper estimate: fused kernels allocate less. 0 for a config without the sizes.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = getattr(text, "hidden_size", None)
    if not isinstance(hidden, int) or batch <= 0 or new <= 0:
        return 0
    size = dtype.itemsize
    intermediate = max(
        [v for k in ("intermediate_size", "moe_intermediate_size") if isinstance(v := getattr(text, k, None), int)]
        or [4 * hidden]
    )
    heads = getattr(text, "num_attention_heads", None) or 1
    vocab = getattr(text, "vocab_size", None) or 0
    rows = batch * new
    activations = rows * (6 * hidden + 3 * intermediate) + batch * heads * new * (past + new)
    activations += batch * (new if logits is None else min(logits, new)) * vocab
    return kv_cache_bytes(config, batch, new, dtype) + activations * size


def experts_count(module: nn.Module) -> int | None:
    """The number of experts of a fused experts module (transformers' `forward(hidden_states, top_k_index,
    top_k_weights)` over `[E, ...]` parameters), else None."""
    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or isinstance(count, bool) or count <= 0:
        return None
    if "top_k_index" not in inspect.signature(module.forward).parameters:
        return None
    return count


# The fused tensors an experts forward multiplies by: gate and up concatenated (or up alone), then down.
EXPERTS_TENSORS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` is one of transformers' experts modules whose forward is picked by the config
    (`@use_experts_implementation`), the only ones pylomin's experts forward can stand in for."""
    return hasattr(type(module).forward, "__wrapped__") and isinstance(getattr(module, "is_transposed", None), bool)


def features(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a layer pylomin can quantize: `nn.Linear` (weight [out, in]) or transformers' `Conv1D`
    (GPT-2's, weight [in, out]); None for any other module, or a subclass with its own forward."""
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return module.out_features, module.in_features
    conv1d = _conv1d_class()
    weight = getattr(module, "weight", None)
    if conv1d is not None and type(module) is conv1d and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[1]), int(weight.shape[0])
    return None


def is_linear(module: nn.Module) -> bool:
    """Whether `module` stores its weight [out, in] (nn.Linear), not [in, out] (Conv1D)."""
    return isinstance(module, nn.Linear)


def as_out_in(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """`weight` of `module` as [out, in] (a transposed view for Conv1D)."""
    return weight if is_linear(module) else weight.t()


@functools.cache
def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D  # type: ignore[no-any-return]


def fused_experts(model: nn.Module, stored: Mapping[tuple[nn.Module, str], str]) -> dict[nn.Module, list[str]]:
    """Experts modules -> the stored names of their fused tensors (leading dim = number of experts).

    `stored`: (module, attribute) -> stored name, for every bound parameter.
    """
    out: dict[nn.Module, list[str]] = {}
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
            out[module] = names
    return out


def fingerprint(model: nn.Module) -> str:
    """A digest of the conversion mapping transformers applies to `model`'s class."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    transforms = get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
    described = [
        [
            type(t).__name__,
            list(t.source_patterns),
            list(t.target_patterns),
            [repr(op) for op in getattr(t, "operations", [])],
            t.scope_prefix,
        ]
        for t in transforms
    ]
    return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def check_layout(layout: dict[str, str] | None, model: nn.Module, folder: Path) -> None:
    """Refuse a folder whose layout the installed transformers would not give `model`: never a silent wrong answer."""
    if layout is None:
        return
    try:
        import transformers
    except ImportError:
        raise PylominError(
            f"`{folder}` holds the run-time layout of transformers {layout['transformers']}; install transformers "
            "(pip install 'pylomin[hf]') to load it"
        ) from None
    if not hasattr(model, "base_model_prefix") or not hasattr(model, "config"):
        raise PylominError(
            f"`{folder}` holds the run-time layout of transformers' `{layout['model_cls']}`; load it with that class "
            f"(transformers.{layout['model_cls']}), or convert the checkpoint again for a custom model"
        )
    digest = fingerprint(model)
    if digest != layout["mapping"]:
        raise PylominError(
            f"`{folder}` was converted for `{layout['model_cls']}` with the conversion mapping of transformers "
            f"{layout['transformers']}; the installed transformers {transformers.__version__} maps "
            f"`{type(model).__name__}` differently (mapping {digest}, the folder's {layout['mapping']}). Convert the "
            f"checkpoint again: pylomin-convert SRC OUT_DIR --model-cls {type(model).__name__}"
        )


def experts_routers(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """Experts modules -> their router: the one sibling (a child of the same parent) whose 2-D `weight` has a
    row per expert ([E, hidden]: scores per expert). Experts modules whose router is not found are left out."""
    out: dict[nn.Module, nn.Module] = {}
    for parent in model.modules():
        children = list(parent.children())
        for experts in children:
            count = experts_count(experts)
            if count is None:
                continue
            routers = [
                m
                for m in children
                if m is not experts
                and isinstance(w := getattr(m, "weight", None), torch.Tensor)
                and w.dim() == 2
                and w.shape[0] == count
            ]
            if len(routers) == 1:
                out[experts] = routers[0]
    return out
