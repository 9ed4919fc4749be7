"""Stream any nn.Module whose state dict matches the checkpoint: pass a zero-argument factory.

python examples/stream_custom_module.py
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import torch
from torch import nn

import pylomin


class MLP(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)  # x: [B, D]
        return self.norm(x)


def main() -> None:
    torch.manual_seed(0)
    model = MLP(dim=512, depth=8).eval()
    x = torch.randn(4, 512)
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(model.state_dict(), Path(tmp) / "mlp.pt")
        out = pylomin.convert(Path(tmp) / "mlp.pt", Path(tmp) / "mlp-pylomin", progress=False)
        # One unit per `layers.N` block; `partial(MLP, ...)` builds the skeleton, parameters stay on disk.
        streamed = pylomin.load_streaming(out, partial(MLP, dim=512, depth=8))
        with torch.no_grad():
            same = torch.equal(streamed(x), model(x))
        on_meta = all(p.device.type == "meta" for p in streamed.parameters())
        print(
            f"units: {len(pylomin.format.manifest.read(out).units)}; parameters on meta between calls: {on_meta}; identical: {same}"
        )


if __name__ == "__main__":
    main()
