"""Frozen prefix: the decoder blocks below the lowest memory layer, run once per sequence per update.

Sparse finetuning changes only memory value rows, so the hidden state entering the lowest
memory layer's block depends on nothing that trains: for a given sequence it is the same in
every pass of an update. `PrefixCache` keeps it from the first forward over the sequence (the
update's selection forward, or its first step) and later forwards start from it, skipping those
blocks.
With the default memory at the second-to-last block (28 of 30 in the embedded model) that is
nearly all of the blocks' forward work in every step after the first look at a batch.

The skip reuses the model's own forward (embeddings, rotary tables, masks are still built
there, they are cheap): the blocks below are swapped for a pass-through while the first memory
block's input is replaced by the cached tensor. The cache holds float hidden states, batch x
length x hidden size per sequence, up to a size limit (sequences beyond it run every block),
and is emptied at the end of each update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from smfd.model.batch import TokenBatch


class _PassThrough(nn.Module):
    """Stands in for a skipped decoder block: returns the hidden states it is given."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def _right_padded(batch: TokenBatch) -> bool:
    """True when every row's real tokens come first: their positions, hence hidden states, do not depend on the batch."""
    mask = batch.attention_mask.long()
    return bool((mask.cummin(dim=1).values == mask).all())


class PrefixCache:
    """Hidden states entering block `first_layer`, per sequence, for the duration of one update.

    Kept per sequence, not per batch, because each pass reshuffles the sequences into new
    batches. With right padding and a causal mask a sequence's real positions do not depend on
    the rows beside it; a batch's rows are laid back into a padded tensor (zeros at padding,
    which no real position attends to and no loss reads).
    """

    def __init__(self, layers: nn.ModuleList, first_layer: int, max_bytes: int) -> None:
        self.layers = layers
        self.first_layer = first_layer
        self.max_bytes = max_bytes
        self._hidden: dict[tuple[int, ...], torch.Tensor] = {}
        self._bytes = 0

    @property
    def n_bytes(self) -> int:
        return self._bytes

    def clear(self) -> None:
        self._hidden = {}
        self._bytes = 0

    @contextlib.contextmanager
    def forward_for(self, batch: TokenBatch) -> Iterator[None]:
        """Inside, a model forward over `batch` either fills the cache or starts from it."""
        if self.first_layer == 0 or self.max_bytes == 0 or not _right_padded(batch):
            yield  # nothing below the first memory block, or positions that depend on the batch
            return
        rows = batch.sequences()
        if all(row in self._hidden for row in rows):
            with self._skip(self._assemble(batch, rows)):
                yield
        else:
            with self._capture(batch, rows):
                yield

    def _assemble(self, batch: TokenBatch, rows: list[tuple[int, ...]]) -> torch.Tensor:
        first = self._hidden[rows[0]]
        hidden = first.new_zeros((len(rows), batch.input_ids.shape[1], first.shape[-1]))
        for i, (row, mask) in enumerate(zip(rows, batch.attention_mask)):
            hidden[i, mask.bool()] = self._hidden[row]
        return hidden

    @contextlib.contextmanager
    def _capture(self, batch: TokenBatch, rows: list[tuple[int, ...]]) -> Iterator[None]:
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = (args[0] if args else kwargs["hidden_states"]).detach()
            for i, (row, mask) in enumerate(zip(rows, batch.attention_mask)):
                kept = hidden[i, mask.bool()]
                size = kept.numel() * kept.element_size()
                if row not in self._hidden and self._bytes + size <= self.max_bytes:  # full: those run every block
                    self._hidden[row] = kept.clone()
                    self._bytes += size

        handle = self.layers[self.first_layer].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def _skip(self, cached: torch.Tensor) -> Iterator[None]:
        def start_from_cache(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (cached, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": cached}

        skipped = [self.layers[i] for i in range(self.first_layer)]
        for i, block in enumerate(skipped):
            pass_through = _PassThrough()
            if hasattr(block, "attention_type"):  # some model loops read it from the block
                pass_through.attention_type = block.attention_type
            self.layers[i] = pass_through
        handle = self.layers[self.first_layer].register_forward_pre_hook(start_from_cache, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()
            for i, block in enumerate(skipped):
                self.layers[i] = block
