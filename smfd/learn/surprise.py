"""Surprise: how badly the frozen base model predicts each token of new text.

A chunk whose mean surprise is low is something the model already knows and is skipped;
per-token surprise can also weight slot selection ("surprise-kl").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from smfd.model.batch import forward_groups, make_batch
from smfd.model.head_loss import head_token_nll
from smfd.model.memory import ProductKeyMemory
from smfd.model.retrofit import memory_bypassed


@dataclass
class Surprise:
    """Per-token NLL (nats) of one sequence; `token_nll[i]` is the NLL of token i (token 0 has none: 0)."""

    token_nll: torch.Tensor

    @property
    def mean(self) -> float:
        scored = self.token_nll[1:]
        return float(scored.mean()) if scored.numel() else 0.0


@torch.no_grad()
def token_nll(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """NLL of every token given its prefix, shape (batch, seq); position 0 and padding are 0."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    scored = attention_mask[:, 1:].bool()
    nll = torch.zeros(scored.shape, dtype=torch.float32, device=input_ids.device)
    nll[scored] = head_token_nll(model.get_output_embeddings(), hidden[:, :-1][scored], input_ids[:, 1:][scored])
    return F.pad(nll, (1, 0))


@torch.no_grad()
def score_surprise(
    model: PreTrainedModel,
    memories: list[ProductKeyMemory],
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token NLL under the frozen base model (memory bypassed), shape (batch, seq)."""
    with memory_bypassed(memories):
        return token_nll(model, input_ids, attention_mask)


def sequence_surprise(
    model: PreTrainedModel,
    memories: list[ProductKeyMemory],
    sequences: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
) -> list[torch.Tensor]:
    """Per-token surprise of each token sequence, at most `batch_size` a forward (and at most
    `smfd.model.batch.FORWARD_TOKENS` padded tokens); one CPU tensor per sequence, its length."""
    out: list[torch.Tensor] = []
    for rows in forward_groups([len(seq) for seq in sequences], batch_size):
        group = sequences[rows.start : rows.stop]
        batch = make_batch(group, pad_id).to(device)
        nll = score_surprise(model, memories, batch.input_ids, batch.attention_mask).cpu()
        out.extend(nll[row, : len(seq)] for row, seq in enumerate(group))
    return out
