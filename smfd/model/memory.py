"""Product-key memory layer (Lample et al. 2019) with the Memory+ gate (Berges et al. 2024).

Each token's hidden state becomes `heads` queries; every query is split in two halves scored
against two sub-key tables of `n_keys` entries; the top-k of each half are combined and the
best k of the k*k sums name slots `i1 * n_keys + i2`. The output is the softmax-weighted sum of
those slots' value rows, gated: `out(silu(gate(x)) * y)`.

Only `values` is ever trained by sparse updates. During an update a `RowSelection` is installed:
a small trainable tensor holding just the selected rows. Reads of those slots see the trainable
rows; everything else reads the frozen table, so gradients cannot reach any other row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from smfd.errors import SmfdError


@dataclass(frozen=True)
class MemoryConfig:
    """Sizes of every memory layer retrofitted into a model."""

    # Decoder layers that get a memory; negative numbers count from the top (-1 is the last block),
    # so one config fits models of any depth. Near the top a reworded prompt reads more of the rows
    # its original wording trained, so learned facts answer more paraphrases (measured: README).
    layers: tuple[int, ...] = (-2,)
    n_keys: int = 512
    heads: int = 4
    k: int = 8
    key_dim: int = 128
    seed: int = 0
    # Standardise each query dimension with statistics of general text (smfd.learn.heal.calibrate_from_inputs):
    # a pretrained model's hidden states share a large common direction, so raw queries all land on
    # the same popular slots, and a row trained for new text is then read by most ordinary tokens.
    query_norm: bool = True
    # Softmax temperature over the k slot scores of each head. Below 1 a token's read concentrates on
    # its best-matching slots: an update then trains the rows its text really addresses, and ordinary
    # text that merely has such a row somewhere in its top-k reads it with a small weight.
    read_temperature: float = 0.3
    # Reads whose softmax weight (within the head) is at most this count for nothing: neither in
    # the output nor in slot statistics and selection. A row trained for new text then changes
    # only the tokens that address it squarely, not the many that have it among their weak
    # candidates, which is where most known facts were lost. 0 turns it off.
    min_read_weight: float = 0.2

    @property
    def n_slots(self) -> int:
        return self.n_keys * self.n_keys

    def layer_indices(self, n_layers: int) -> list[int]:
        """The chosen decoder layers as indices into a stack of `n_layers`, negative ones counted from the top."""
        if not self.layers:
            raise SmfdError("memory.layers is empty: name at least one decoder layer")
        bad = [layer for layer in self.layers if not -n_layers <= layer < n_layers]
        if bad:
            raise SmfdError(f"memory.layers {bad} out of range: the model has {n_layers} decoder layers "
                            f"(0..{n_layers - 1}, or -{n_layers}..-1 counted from the top)")
        indices = [layer % n_layers for layer in self.layers]
        if len(set(indices)) != len(indices):
            raise SmfdError(f"memory.layers {list(self.layers)} names a layer twice (model of {n_layers} layers)")
        return sorted(indices)

    def validate(self, n_layers: int) -> None:
        self.layer_indices(n_layers)
        if self.key_dim % 2:
            raise SmfdError(f"memory.key_dim must be even (it is split in two halves), got {self.key_dim}")
        if not 1 <= self.k <= self.n_keys:
            raise SmfdError(f"memory.k={self.k} must be between 1 and memory.n_keys={self.n_keys}")
        if self.heads < 1:
            raise SmfdError(f"memory.heads must be >= 1, got {self.heads}")
        if not self.read_temperature > 0:
            raise SmfdError(f"memory.read_temperature must be > 0, got {self.read_temperature}")
        if not 0 <= self.min_read_weight < 1:
            raise SmfdError(f"memory.min_read_weight must be in [0, 1), got {self.min_read_weight}")


@dataclass
class Lookup:
    """The slots one forward pass read: indices and softmax weights, shape (batch, seq, heads, k)."""

    indices: torch.Tensor
    weights: torch.Tensor


@dataclass
class RowSelection:
    """The rows an update may change: slot ids and a trainable copy of their current values."""

    slot_ids: torch.Tensor
    rows: torch.Tensor
    position: torch.Tensor = field(repr=False)

    @classmethod
    def from_table(cls, values: torch.Tensor, slot_ids: torch.Tensor) -> "RowSelection":
        slot_ids = torch.unique(slot_ids.to(values.device))
        position = torch.full((values.shape[0],), -1, dtype=torch.long, device=values.device)
        position[slot_ids] = torch.arange(slot_ids.numel(), device=values.device)
        rows = values.detach()[slot_ids].clone().requires_grad_(True)
        return cls(slot_ids=slot_ids, rows=rows, position=position)


SelectRows = Callable[["ProductKeyMemory", Lookup], torch.Tensor]


class ProductKeyMemory(nn.Module):
    """A product-key memory read additively beside a decoder layer's MLP. Zero values => zero output."""

    def __init__(self, hidden_size: int, config: MemoryConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        half = config.key_dim // 2
        generator = torch.Generator().manual_seed(config.seed * 1000 + layer_index)
        self.query = nn.Linear(hidden_size, config.heads * config.key_dim, bias=False)
        nn.init.normal_(self.query.weight, std=hidden_size**-0.5, generator=generator)
        keys = torch.randn(config.heads, 2, config.n_keys, half, generator=generator) * half**-0.5
        self.keys = nn.Parameter(keys)
        self.values = nn.Parameter(torch.zeros(config.n_slots, hidden_size))
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

    def lookup(self, hidden: torch.Tensor, dense: bool = False) -> Lookup:
        """Address the memory: top-k slots per head for every token.

        Weights at or below `min_read_weight` are zero unless `dense` (healing balances the whole softmax).
        """
        cfg = self.config
        batch, seq, _ = hidden.shape
        half = cfg.key_dim // 2
        query = ((self.query(hidden) - self.query_shift) * self.query_scale).view(batch, seq, cfg.heads, 2, half)
        query = F.layer_norm(query, (half,))
        scores = torch.einsum("bthsd,hsnd->bthsn", query, self.keys)
        top_scores, top_idx = scores.topk(cfg.k, dim=-1)
        combined = top_scores[..., 0, :, None] + top_scores[..., 1, None, :]
        best, flat = combined.flatten(-2).topk(cfg.k, dim=-1)
        idx_a = top_idx[..., 0, :].gather(-1, flat // cfg.k)
        idx_b = top_idx[..., 1, :].gather(-1, flat % cfg.k)
        weights = (best / cfg.read_temperature).softmax(dim=-1)
        if cfg.min_read_weight > 0 and not dense:
            weights = weights * (weights > cfg.min_read_weight)
        return Lookup(indices=idx_a * cfg.n_keys + idx_b, weights=weights)

    def read(self, lookup: Lookup) -> torch.Tensor:
        """Weighted sum of value rows over k slots and all heads; selected rows come from the trainable copy."""
        batch, seq, heads, k = lookup.indices.shape
        flat_idx = lookup.indices.reshape(-1, heads * k)
        flat_w = lookup.weights.reshape(-1, heads * k).to(self.values.dtype)
        out = F.embedding_bag(flat_idx, self.values.detach(), per_sample_weights=flat_w, mode="sum")
        if self.selection is not None:
            position = self.selection.position[flat_idx]
            hit = position >= 0
            if bool(hit.any()):
                delta = self.selection.rows - self.values.detach()[self.selection.slot_ids]
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
        with torch.no_grad():
            self.values.index_copy_(0, self.selection.slot_ids, self.selection.rows.detach().to(self.values.dtype))
        written = int(self.selection.slot_ids.numel())
        self.selection = None
        return written


class MemoryAugmentedMLP(nn.Module):
    """`mlp(x) + memory(x)`: the base MLP is untouched, the memory adds to it."""

    def __init__(self, mlp: nn.Module, memory: ProductKeyMemory) -> None:
        super().__init__()
        self.mlp = mlp
        self.memory = memory

    def forward(self, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.mlp(hidden, *args, **kwargs) + self.memory(hidden)
