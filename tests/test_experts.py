"""Mixture-of-experts models are paged per expert: a forward reads the experts the router chose, never the others."""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
import transformers

import pylomin
from pylomin import manifest as fmt
from tests import models
from tests.test_layout import mixtral

PAGE = mmap.PAGESIZE


def test_a_forward_reads_only_the_chosen_experts(disk_dir: Path) -> None:
    # 8 experts of 32 KiB (gate_up) + 16 KiB (down): every expert a whole number of pages.
    src = disk_dir / "src"
    mixtral(experts=8, hidden=64, intermediate=64).save_pretrained(src)
    folder = pylomin.convert(src, disk_dir / "out", progress=False)
    ref = transformers.MixtralForCausalLM.from_pretrained(src).eval()
    models.evict([folder / u.file for u in fmt.read(folder).units])
    model = pylomin.load_streaming(folder, transformers.MixtralForCausalLM, drop_page_cache=False)
    chosen: dict[str, set[int]] = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "MixtralExperts":
            module.register_forward_pre_hook(
                lambda m, args, name=name: chosen.setdefault(name, set()).update(args[1].unique().tolist())
            )
    x = models.ids(batch=1, seq=1)  # one token: top-2 of 8 experts per layer
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref(x).logits)
    m = fmt.read(folder)
    for layer, experts in chosen.items():
        assert len(experts) == 2, experts
        unit = next(u for u in m.units if f"{layer}.gate_up_proj" in u.tensors)
        assert unit.name == layer  # fused experts have a file of their own: no read-around from neighbours
        pages = models.cached_pages(folder / unit.file)
        for tensor in ("gate_up_proj", "down_proj"):
            info = unit.tensors[f"{layer}.{tensor}"]
            stride = info.length // 8
            for e in range(8):
                first, last = (info.offset + e * stride) // PAGE, (info.offset + (e + 1) * stride - 1) // PAGE
                inner = pages[first + 1 : last]  # pages wholly inside expert e
                if e in experts:
                    assert all(inner), (layer, tensor, e)
                else:
                    assert not any(inner), (layer, tensor, e, sum(inner))
