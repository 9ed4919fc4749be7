"""`quantize_`: the Linear layers of a model in memory quantized in place, as a converted folder holds them."""

from __future__ import annotations

from torch import nn

from pylomin.converter.compress import choose, choose_experts, quantize_experts
from pylomin.converter.rounding import quantize_weight
from pylomin.format.quant import Scheme, parse_scheme
from pylomin.modeling import as_out_in
from pylomin.runtime.quant import check_kernels, make_module
from pylomin.runtime.quant_experts import swap_tensor_, use_quantized_experts


def quantize_(model: nn.Module, scheme: str | Scheme) -> dict[str, str]:
    """Quantize the Linear layers and fused experts of an in-memory `model` in place; returns the skipped ones.

    The same layers and modules a converted folder gets, so an in-memory model and a streamed one
    give identical outputs. One layer at a time; fused experts (transformers' experts modules) expert
    by expert, run by pylomin's experts forward (`experts_implementation="pylomin"`). A scheme this
    machine's kernels cannot run is refused first.

    Args:
        model: a model in memory (changed in place).
        scheme: `pylomin.Int8WeightOnly()` or `pylomin.Int4WeightOnly(group_size=...)` (with
            `head=True`, the LM head too), or the shorthand `"int8"`, `"int4"`, `"int4-g128"`.

    Returns:
        The Linear layers (and fused experts tensors) left as they are, each with the reason (too small,
        tied, an odd width, the head).

    Example:
        >>> skipped = pylomin.quantize_(model, "int8")
        >>> skipped = pylomin.quantize_(model, pylomin.Int4WeightOnly(group_size=128, head=True))
    """
    scheme = parse_scheme(scheme)
    check_kernels(scheme)
    chosen, skipped = choose(model, scheme)
    for name in chosen:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        layer = getattr(owner, attr)
        payload, scales = quantize_weight(as_out_in(layer, layer.weight), scheme)  # on the CPU
        device = layer.weight.device
        setattr(owner, attr, make_module(layer, scheme, payload.to(device), scales.to(device)))
    experts, skipped_experts = choose_experts(model, scheme)
    if experts:  # first: pylomin's experts forward runs float and quantized tensors alike, so a model
        # interrupted in the loop below still computes what it holds
        use_quantized_experts(model, list({model.get_submodule(f.module): None for f in experts}))
    for fused in experts:  # per expert, each fused tensor at a time
        module = model.get_submodule(fused.module)
        weight = module._parameters[fused.attr]
        assert weight is not None
        payload, scales = quantize_experts(weight.detach().cpu(), scheme, transposed=fused.transposed)
        swap_tensor_(module, fused.attr, payload.to(weight.device), scales.to(weight.device))
    return {**skipped, **skipped_experts}
