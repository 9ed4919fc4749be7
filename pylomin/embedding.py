"""`chunked_embedding`: an embedding table split into row chunks, so a lookup touches only the chunks it hits."""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


class ChunkedEmbedding(nn.Module):
    """`nn.Embedding` stored as `ceil(num_embeddings / chunk_size)` embeddings of `chunk_size` rows.

    Lookups gather from the chunks their ids fall in, and only those chunks run: combined with
    `lazy_loading`, only they are read from disk. Outputs are bit-identical to the original table.
    """

    def __init__(self, embedding: nn.Embedding, chunk_size: int):
        super().__init__()
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if embedding.max_norm is not None:
            raise ValueError("chunked_embedding does not support max_norm (it renormalizes rows in place)")
        if embedding.sparse:
            raise ValueError("chunked_embedding does not support sparse=True embeddings")
        self.num_embeddings, self.embedding_dim = embedding.weight.shape
        self.chunk_size = chunk_size
        self.padding_idx = embedding.padding_idx
        weight = embedding.weight
        self.chunks = nn.ModuleList()
        for start in range(0, self.num_embeddings, chunk_size):
            rows = min(chunk_size, self.num_embeddings - start)
            chunk = nn.Embedding(rows, self.embedding_dim, device="meta", dtype=weight.dtype)
            # A view of the original rows: no copy, and the original storage goes once all views do.
            chunk.weight = nn.Parameter(weight.detach()[start : start + rows], requires_grad=weight.requires_grad)
            self.chunks.append(chunk)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [*], output: [*, D]
        lo, hi = torch.aminmax(ids) if ids.numel() else (0, 0)  # one pass over the ids
        if int(lo) < 0 or int(hi) >= self.num_embeddings:
            raise IndexError(f"index out of range in ChunkedEmbedding of {self.num_embeddings} rows")
        chunk_of = torch.div(ids, self.chunk_size, rounding_mode="floor")
        hit = torch.unique(chunk_of).tolist()
        if len(hit) == 1:  # the common case: no scatter needed
            return self.chunks[hit[0]](ids - hit[0] * self.chunk_size)
        out = torch.empty(
            *ids.shape, self.embedding_dim, dtype=next(self.chunks[0].parameters()).dtype, device=ids.device
        )
        for c in hit:
            mask = chunk_of == c
            out[mask] = self.chunks[c](ids[mask] - c * self.chunk_size)
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, chunk_size={self.chunk_size}, chunks={len(self.chunks)}"


def chunked_embedding(model: M, target_module_name: str, chunk_size: int) -> M:
    """Replace the `nn.Embedding` at `target_module_name` by an equivalent `ChunkedEmbedding`.

    Args:
        model: the model, changed in place.
        target_module_name: dotted path of the embedding, e.g. `"embeddings.word_embeddings"`.
        chunk_size: rows per chunk (the last chunk may be shorter).

    Returns:
        The same model object.

    Example:
        >>> pylomin.chunked_embedding(model, "embeddings.word_embeddings", chunk_size=4096)
    """
    try:
        embedding = model.get_submodule(target_module_name)
    except AttributeError:
        raise ValueError(f"`{target_module_name}` is not a submodule of {type(model).__name__}") from None
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(f"`{target_module_name}` is a {type(embedding).__name__}, not an nn.Embedding")
    if embedding.weight.device.type == "meta":
        raise ValueError(
            f"`{target_module_name}` is streamed already: its lookups read only the rows they touch; "
            "chunk it before lazy_loading"
        )
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is embedding.weight and not name.startswith(target_module_name + "."):
            raise ValueError(
                f"`{target_module_name}.weight` is tied to `{name}`; chunking would untie them "
                "(untie the weights first, or leave this embedding whole)"
            )
    parent_name, _, attr = target_module_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    setattr(parent, attr, ChunkedEmbedding(embedding, chunk_size))
    return model
