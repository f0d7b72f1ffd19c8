"""Product-key memory layer (Lample et al. 2019) with the Memory+ gate (Berges et al. 2024).

Each token's hidden state becomes `heads` queries; every query is split in two halves scored
against two sub-key tables of `n_keys` entries; the top-k of each half are combined and the
best k of the k*k sums name slots `i1 * n_keys + i2`. The output is the softmax-weighted sum of
those slots' value rows, gated: `out(silu(gate(x)) * y)`.

Only `values` is ever trained by sparse updates. It is a `SparseRows` table: rows never written
take no memory and read as zero. During an update a `RowSelection` is installed: a small
trainable tensor holding just the selected rows. Reads of those slots see the trainable rows;
everything else reads the frozen table, so gradients cannot reach any other row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from smfd.config import MemorySection
from smfd.model.sparse_rows import SparseRows


@dataclass
class Lookup:
    """The slots one forward pass read: indices and softmax weights, shape (batch, seq, heads, k), and
    the reads' key scores (the sums the softmax is taken over; None where a lookup was built by hand)."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor | None = None


@dataclass
class RowSelection:
    """The rows an update may change: slot ids and a trainable copy of their current values."""

    slot_ids: torch.Tensor
    rows: torch.Tensor
    position: torch.Tensor = field(repr=False)

    @classmethod
    def from_table(cls, values: SparseRows, slot_ids: torch.Tensor) -> RowSelection:
        slot_ids = torch.unique(slot_ids.to(values.device))
        position = torch.full((values.n_slots,), -1, dtype=torch.long, device=values.device)
        position[slot_ids] = torch.arange(slot_ids.numel(), device=values.device)
        rows = values.gather(slot_ids).requires_grad_(True)
        return cls(slot_ids=slot_ids, rows=rows, position=position)


SelectRows = Callable[["ProductKeyMemory", Lookup], torch.Tensor]


class ProductKeyMemory(nn.Module):
    """A product-key memory read additively beside a decoder layer's MLP. Zero values => zero output."""

    def __init__(self, hidden_size: int, config: MemorySection, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        half = config.key_dim // 2
        generator = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
        self.query = nn.Linear(hidden_size, config.heads * config.key_dim, bias=False)
        nn.init.normal_(self.query.weight, std=hidden_size**-0.5, generator=generator)
        keys = torch.randn(config.heads, 2, config.n_keys, half, generator=generator) * half**-0.5
        self.keys = nn.Parameter(keys)
        self.values = SparseRows(config.n_slots, hidden_size)
        # Identity until calibrated on general text; saved with the memory like any parameter.
        self.register_buffer("query_shift", torch.zeros(config.heads * config.key_dim))
        self.register_buffer("query_scale", torch.ones(config.heads * config.key_dim))
        self.gate = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.gate.weight, std=hidden_size**-0.5, generator=generator)
        self.out = nn.Linear(hidden_size, hidden_size, bias=False)
        nn.init.normal_(self.out.weight, std=hidden_size**-0.5, generator=generator)
        self.requires_grad_(False)
        self.enabled = True
        self.selection: RowSelection | None = None
        self.select_rows: SelectRows | None = None
        self.last_lookup: Lookup | None = None
        self.record_lookup = False
        # Set only while an update ranks or trains rows (smfd.learn.updater): (std, generator).
        self.query_noise: tuple[float, torch.Generator] | None = None

    def lookup(self, hidden: torch.Tensor, dense: bool = False) -> Lookup:
        """Address the memory: top-k slots per head for every token.

        Weights at or below `min_read_weight` are zero unless `dense` (healing balances the whole softmax).
        With `read_floor_margin` set, so is the weight of a read that scores more than the margin below
        its row's read floor: a trained row answers only tokens that address it about as squarely as
        the text it was trained on did, not the ordinary tokens that merely have it among their k.
        """
        cfg = self.config
        batch, seq, _ = hidden.shape
        half = cfg.key_dim // 2
        query = ((self.query(hidden) - self.query_shift) * self.query_scale).view(batch, seq, cfg.heads, 2, half)
        query = F.layer_norm(query, (half,))
        if self.query_noise is not None:
            std, generator = self.query_noise
            noise = torch.randn(query.shape, generator=generator, dtype=query.dtype, device=query.device)
            query = F.layer_norm(query + std * noise, (half,))
        scores = torch.einsum("bthsd,hsnd->bthsn", query, self.keys)
        top_scores, top_idx = scores.topk(cfg.k, dim=-1)
        combined = top_scores[..., 0, :, None] + top_scores[..., 1, None, :]
        best, flat = combined.flatten(-2).topk(cfg.k, dim=-1)
        idx_a = top_idx[..., 0, :].gather(-1, flat // cfg.k)
        idx_b = top_idx[..., 1, :].gather(-1, flat % cfg.k)
        weights = (best / cfg.read_temperature).softmax(dim=-1)
        if cfg.min_read_weight > 0 and not dense:
            weights = weights * (weights > cfg.min_read_weight)
        indices = idx_a * cfg.n_keys + idx_b
        if cfg.read_floor_margin is not None and not dense:
            weights = weights * (best >= self.values.floors(indices) - cfg.read_floor_margin)
        return Lookup(indices=indices, weights=weights, scores=best)

    def read(self, lookup: Lookup) -> torch.Tensor:
        """Weighted sum of value rows over k slots and all heads; selected rows come from the trainable copy."""
        batch, seq, heads, k = lookup.indices.shape
        flat_idx = lookup.indices.reshape(-1, heads * k)
        flat_w = lookup.weights.reshape(-1, heads * k).to(self.values.dtype)
        out = self.values.read(flat_idx, flat_w)
        if self.selection is not None:
            position = self.selection.position[flat_idx]
            hit = position >= 0
            if bool(hit.any()):
                delta = self.selection.rows - self.values.gather(self.selection.slot_ids)
                out = out + F.embedding_bag(position.clamp(min=0), delta, per_sample_weights=flat_w * hit, mode="sum")
        return out.view(batch, seq, -1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return torch.zeros_like(hidden)
        found = self.lookup(hidden)
        if self.record_lookup:
            self.last_lookup = found
        if self.select_rows is not None:
            self.selection = RowSelection.from_table(self.values, self.select_rows(self, found))
        read = self.read(found)
        return self.out(F.silu(self.gate(hidden)) * read)

    def commit_selection(self) -> int:
        """Write the trained rows back into the table; returns how many rows were written."""
        if self.selection is None:
            return 0
        self.values.write(self.selection.slot_ids, self.selection.rows.detach())
        written = int(self.selection.slot_ids.numel())
        self.selection = None
        return written


@contextlib.contextmanager
def recording_lookups(memories: Iterable[ProductKeyMemory]) -> Iterator[None]:
    """Inside, each memory keeps its latest lookup in `last_lookup`; on the way out recording stops and
    the lookup is dropped (it holds a whole batch's slot indices and weights)."""
    memories = list(memories)
    for memory in memories:
        memory.record_lookup = True
    try:
        yield
    finally:
        for memory in memories:
            memory.record_lookup = False
            memory.last_lookup = None


class MemoryAugmentedMLP(nn.Module):
    """`mlp(x) + memory(x)`: the base MLP is untouched, the memory adds to it."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.mlp(hidden, *args, **kwargs) + self.memory(hidden)
