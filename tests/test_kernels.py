"""torch's int8 / int4 CPU kernels as pylomin calls them: at any address, under each CPU capability."""

from __future__ import annotations

import pytest

from tests import python

# A fresh interpreter per capability (torch reads ATEN_CPU_CAPABILITY once, at start), so that a
# segfault fails this test instead of ending pytest.
FORWARDS_AT_ODD_ADDRESSES = """
    import logging, torch
    from torch import nn
    from pylomin.converter.rounding import quantize_weight
    from pylomin.format.quant import parse_scheme
    from pylomin.runtime import quant

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")

    def at(t, offset):
        # A contiguous copy of `t` whose data starts `offset` bytes past a 64-byte boundary.
        raw = torch.empty(t.numel() * t.element_size() + 64, dtype=torch.uint8)
        out = raw[offset : offset + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        out.copy_(t)
        assert out.data_ptr() % 64 == offset
        return out

    print("CAPABILITY", torch.backends.cpu.get_cpu_capability())
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    ran = 0
    for spec in ("int8", "int4"):
        scheme = parse_scheme(spec)
        quant.check_kernels(scheme)
        payload, scales = quantize_weight(linear.weight.detach(), scheme)
        aligned = quant.make_module(linear, scheme, payload, scales)
        for w_off in (0, 1, 8):  # the int8 kernel needs 16 bytes (AVX-512)
            moved = quant.make_module(linear, scheme, at(payload, w_off), at(scales, 2))
            for rows in (1, 5, 40):  # one row; the kernel's 4-row blocks; below kernels.PROMPT_ROWS
                big = torch.randn(1, rows * 256 + 16, generator=gen).to(torch.bfloat16)
                for x_off in (1, 8):  # 2 and 16 bytes: AVX-512 needs 32, AVX2 16
                    x = big[0, x_off : x_off + rows * 256].view(1, rows, 256)  # a view, as a model's slice is
                    assert x.is_contiguous() and x.data_ptr() % 32 == 2 * x_off
                    with torch.no_grad():
                        got, want = moved(x), aligned(x.clone())
                    assert torch.equal(got, want), (spec, w_off, rows, x_off)
                    ran += 1
                # The same row sliced out of a wider one, as in the issue's report.
                wide = torch.randn(1, 257, generator=gen).to(torch.bfloat16)
                with torch.no_grad():
                    assert torch.equal(moved(wide[..., 1:]), aligned(wide[..., 1:].clone()))
    print("RAN", ran)
"""


@pytest.mark.parametrize("capability", [None, "avx2", "default"], ids=["best", "avx2", "default"])
def test_quantized_layers_run_inputs_and_weights_at_any_address(capability: str | None) -> None:
    env = {} if capability is None else {"ATEN_CPU_CAPABILITY": capability}
    done = python.run(FORWARDS_AT_ODD_ADDRESSES, env, timeout=240)
    # -11: the int8 kernel segfaulted on an unaligned input or weight (fixed by copying it aligned).
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "RAN 36" in done.stdout, done.stdout
    scalar = "CAPABILITY DEFAULT" in done.stdout
    assert scalar == (capability == "default") or capability is None, done.stdout
    # Scalar kernels are right but slow: said once per scheme, with the fix.
    warned = done.stderr.count("kernel as scalar code here (CPU capability DEFAULT")
    assert warned == (2 if scalar else 0), done.stderr
    if capability == "default":
        assert "as ATEN_CPU_CAPABILITY=default asks" in done.stderr and "unset ATEN_CPU_CAPABILITY" in done.stderr
