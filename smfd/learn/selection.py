"""Slot selection: which memory rows an optimizer step may change.

Slots are ranked by how much more this batch reads them than general text does
(counting only real tokens), and the top t per memory layer are trained:
- "tfidf" (Lin et al. 2025): term frequency times inverse background document frequency.
- "kl" (Goyal et al. 2026): each slot's share of KL(batch reads || background reads).
- "surprise-kl": "kl" with each token's reads weighted by its surprise (NLL under the frozen
  base), so slots read only by tokens the model already predicts carry little weight.
"""

from __future__ import annotations

import torch

from smfd.errors import SmfdError
from smfd.model.memory import Lookup
from smfd.model.slot_stats import BackgroundStats

RULES = ("kl", "tfidf", "surprise-kl")


def batch_reads(lookup: Lookup, token_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot ids read in this batch and the weight of each read; `token_weights` (batch, seq) is 0 for padding and masked positions.

    A read whose own softmax weight is zero (cut by `min_read_weight`) is not a read.
    """
    n_reads = lookup.indices.shape[-2] * lookup.indices.shape[-1]
    weights = token_weights.to(torch.float64).unsqueeze(-1).expand(*token_weights.shape, n_reads)
    flat_idx = lookup.indices.reshape(*token_weights.shape, n_reads)
    keep = (weights > 0) & (lookup.weights.reshape(*token_weights.shape, n_reads) > 0)
    return flat_idx[keep], weights[keep]


def lowest_read_scores(lookup: Lookup, token_mask: torch.Tensor, lowest: torch.Tensor) -> None:
    """Lower `lowest` (one entry per slot) to the smallest key score at which a token of `token_mask`
    (batch, seq; 0 for padding) read each slot with a non-zero weight: the read floors of an update."""
    if lookup.scores is None:
        raise SmfdError("lowest_read_scores needs a lookup with its key scores (ProductKeyMemory.lookup)")
    keep = (token_mask[..., None, None] > 0) & (lookup.weights > 0)
    lowest.scatter_reduce_(0, lookup.indices[keep], lookup.scores[keep].to(lowest), reduce="amin")


def slot_scores(
    rule: str, reads: torch.Tensor, read_weights: torch.Tensor, background: BackgroundStats
) -> torch.Tensor:
    """Score every slot; slots this batch does not read get -inf."""
    n_slots = background.counts.numel()
    counts = torch.bincount(reads, weights=read_weights, minlength=n_slots)
    total = counts.sum()
    if total <= 0:
        return torch.full((n_slots,), float("-inf"), dtype=torch.float64)
    p = counts / total
    if rule == "tfidf":
        idf = torch.log((background.n_batches + 1) / (background.doc_freq + 1))
        scores = p * idf
    elif rule in ("kl", "surprise-kl"):
        smoothed = background.counts + 1
        q = smoothed / smoothed.sum()
        scores = p * torch.log(p.clamp_min(1e-300) / q)
    else:
        raise SmfdError(f"unknown slot selection rule {rule!r}; choose one of {', '.join(RULES)}")
    return torch.where(counts > 0, scores, torch.full_like(scores, float("-inf")))


def select_slots(
    rule: str,
    lookup: Lookup,
    token_mask: torch.Tensor,
    surprise: torch.Tensor | None,
    background: BackgroundStats,
    top_t: int,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """The top-t slot ids for one memory layer and one optimizer step (whole batch, real tokens only).

    Only slots with a positive score qualify: a slot general text reads at least as often as this
    batch does is never trained, however few slots that leaves; nor does any slot in `excluded`.
    """
    weights = token_mask.to(torch.float64)
    if rule == "surprise-kl":
        if surprise is None:
            raise SmfdError("selection rule 'surprise-kl' needs per-token surprise for the batch")
        weights = weights * surprise.to(torch.float64).clamp_min(0)
    reads, read_weights = batch_reads(lookup, weights)
    return top_slots(rule, reads, read_weights, background, top_t, excluded)


def top_slots(
    rule: str,
    reads: torch.Tensor,
    read_weights: torch.Tensor,
    background: BackgroundStats,
    top_t: int,
    excluded: torch.Tensor | None = None,
) -> torch.Tensor:
    """The top-t positively scored slots for a set of reads (one step's, or a whole update's); slot ids in
    `excluded` never qualify."""
    scores = slot_scores(
        rule, reads.to(background.counts.device), read_weights.to(background.counts.device), background
    )
    if excluded is not None and excluded.numel():
        scores[excluded.to(scores.device)] = float("-inf")
    eligible = int(torch.isfinite(scores).sum())
    top = scores.topk(min(top_t, eligible)).indices
    return top[scores[top] > 0]
