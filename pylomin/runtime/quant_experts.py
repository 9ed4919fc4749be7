"""Quantized fused experts: transformers' experts modules with int8 / int4 weights per expert, and the experts forward that runs them.

transformers' experts modules (`@use_experts_implementation`: fused `gate_up_proj` / `up_proj` and
`down_proj`, `[E, out, in]` or `[E, in, out]` when `is_transposed`) pick their forward by the config's
`_experts_implementation` from `ALL_EXPERTS_FUNCTIONS`. pylomin registers its own there, `"pylomin"`:
it runs only the experts the router chose, each with torch's int8 / int4 kernels on that expert's
payload (`[E, out, in]` int8 or `[E, out, in/2]` packed int4, whatever the source's orientation) and
its scales (the `<name>_scales` parameter beside it), and every expert tensor left unquantized with
`F.linear`. One expert is one contiguous byte range of each tensor, paged alone like a float expert.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pylomin.format.quant import KERNEL_DTYPE, scales_name
from pylomin.modeling import EXPERTS_TENSORS
from pylomin.runtime.kernels import int4_matmul, int8_matmul

IMPLEMENTATION = "pylomin"


def swap_tensor_(module: nn.Module, attr: str, payload: torch.Tensor, scales: torch.Tensor) -> None:
    """Replace the fused tensor `attr` of experts `module` by its quantized payload and scales (kept in
    their dtypes whatever dtype the model is loaded or cast in): both or, on any error, neither."""
    name = scales_name(attr)
    old = module._parameters[attr]
    try:
        module._parameters[attr] = nn.Parameter(payload, requires_grad=False)
        module.register_parameter(name, nn.Parameter(scales, requires_grad=False))
    except BaseException:
        module._parameters[attr] = old
        module._parameters.pop(name, None)
        raise
    object.__setattr__(module, "exact_dtype", (*getattr(module, "exact_dtype", ()), attr, name))
    if "_apply" not in vars(module):  # `.half()`, `.to(dtype)` must not cast the scales (QuantLinear's rule)
        object.__setattr__(module, "_apply", _ApplyKeepingScales(module))


class _ApplyKeepingScales:
    """An experts module's `_apply` (what `.to()`, `.half()`, `.cuda()` call) once it holds quantized tensors:
    the scales travel as raw 16-bit integers through a cast, so a device move still applies to them. An
    object rather than a bound method, so the module still pickles and deep-copies; it holds the module
    weakly, so a deleted model is freed at once (no reference cycle)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = weakref.ref(module)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ApplyKeepingScales, (self.module(),))

    def __call__(self, fn: Any, recurse: bool = True) -> nn.Module:
        module = self.module()
        assert module is not None  # called through the module
        names = [n for n in map(scales_name, EXPERTS_TENSORS) if module._parameters.get(n) is not None]

        def view(name: str, dtype: torch.dtype) -> None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.detach().view(dtype), requires_grad=False)

        for n in names:
            view(n, torch.int16)
        try:
            type(module)._apply(module, fn, recurse)
        finally:
            for n in names:
                view(n, KERNEL_DTYPE)
        return module


def use_quantized_experts(model: nn.Module, modules: list[nn.Module]) -> None:
    """Make `modules` (experts modules holding quantized tensors) run pylomin's experts forward."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward)
    set_implementation = getattr(model, "set_experts_implementation", None)
    if callable(set_implementation):
        set_implementation(IMPLEMENTATION)
    for module in modules:  # a config transformers' setter did not reach (a part built on its own)
        config: Any = module.config
        if config._experts_implementation != IMPLEMENTATION:
            config._experts_implementation = IMPLEMENTATION


def experts_forward(
    self: Any, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The experts forward of an experts module, quantized tensors or not: as transformers' eager one,
    the chosen experts one after the other, each on the tokens that chose it."""
    if not any(hasattr(self, scales_name(a)) for a in EXPERTS_TENSORS):  # nothing quantized: eager
        return type(self).forward.__wrapped__(self, hidden_states, top_k_index, top_k_weights)  # type: ignore[no-any-return]
    # hidden_states: [T, H]; top_k_index, top_k_weights: [T, k]
    out = torch.zeros_like(hidden_states)
    count: int = self.num_experts
    for expert in torch.unique(top_k_index).tolist():
        if expert >= count:  # a placeholder index (expert parallelism): no expert here
            continue
        token, slot = torch.where(top_k_index == expert)
        x = hidden_states[token]  # [t, H]
        if self.has_gate:
            h = self._apply_gate(_project(self, "gate_up_proj", expert, x))
        else:
            h = self.act_fn(_project(self, "up_proj", expert, x))
        y = _project(self, "down_proj", expert, h)
        if self.has_post_expert_norm:
            y = self.post_expert_norm(y)
        y = y * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


def _project(self: Any, attr: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    # x: [t, in] -> [t, out] through expert `expert` of the fused tensor `attr` (and its bias, if any).
    weight: torch.Tensor = getattr(self, attr)[expert]
    scales: torch.Tensor | None = getattr(self, scales_name(attr), None)
    if scales is None:
        y = x @ weight if self.is_transposed else F.linear(x, weight)
    elif weight.dtype == torch.int8:
        y = int8_matmul(x, weight, scales[expert]).to(x.dtype)
    else:  # int4: [out, in/2] packed, scales [in/group, out, 2]
        group = 2 * weight.shape[-1] // scales.shape[1]
        y = int4_matmul(x, weight, scales[expert], group).to(x.dtype)
    bias: Any = getattr(self, f"{attr}_bias", None) if self.has_bias else None
    return y if bias is None else y + bias[expert]
