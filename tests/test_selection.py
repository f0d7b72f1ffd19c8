"""Slot selection decides which memory rows an update may touch: scores must follow the published
rules, and padding or slots that general text reads as much must never be picked."""

from __future__ import annotations

import math

import pytest
import torch

from smfd.errors import SmfdError
from smfd.learn.selection import batch_reads, select_slots, slot_scores
from smfd.model.memory import Lookup
from smfd.model.slot_stats import BackgroundStats

N_SLOTS = 6
NEG_INF = float("-inf")


@pytest.fixture
def background() -> BackgroundStats:
    """Three background batches over 6 slots: reads of slots 0, 2 and 5."""
    stats = BackgroundStats.empty(N_SLOTS)
    stats.add_batch(torch.tensor([0, 5, 5]))
    stats.add_batch(torch.tensor([2, 2, 5]))
    stats.add_batch(torch.tensor([5]))
    return stats


def test_background_stats_count_reads_and_batches(background):
    assert background.n_batches == 3
    assert background.counts.tolist() == [1, 0, 2, 0, 0, 4]
    assert background.doc_freq.tolist() == [1, 0, 1, 0, 0, 3]


def test_tfidf_scores_match_a_hand_computation(background):
    reads = torch.tensor([0, 0, 1, 3])  # p = [1/2, 1/4, 0, 1/4, 0, 0]
    scores = slot_scores("tfidf", reads, torch.ones(4, dtype=torch.float64), background)

    # idf = log((n_batches + 1) / (doc_freq + 1)) with n_batches = 3
    expected = [0.5 * math.log(4 / 2), 0.25 * math.log(4 / 1), NEG_INF, 0.25 * math.log(4 / 1), NEG_INF, NEG_INF]
    assert scores.tolist() == pytest.approx(expected)


def test_kl_scores_match_a_hand_computation(background):
    reads = torch.tensor([0, 0, 1, 3, 5])
    weights = torch.tensor([1.0, 1.0, 2.0, 1.0, 3.0], dtype=torch.float64)  # weighted counts: 2, 2, 0, 1, 0, 3
    scores = slot_scores("kl", reads, weights, background)

    # q = (background counts + 1) / sum = [2, 1, 3, 1, 1, 5] / 13 ; p = [2, 2, 0, 1, 0, 3] / 8
    q = [2 / 13, 1 / 13, 3 / 13, 1 / 13, 1 / 13, 5 / 13]
    p = [2 / 8, 2 / 8, 0, 1 / 8, 0, 3 / 8]
    expected = [p[i] * math.log(p[i] / q[i]) if p[i] else NEG_INF for i in range(N_SLOTS)]
    assert scores.tolist() == pytest.approx(expected)
    assert scores[5] < 0, "a slot general text reads more often than this batch scores below zero"


def test_surprise_kl_scores_like_kl_on_the_same_weights(background):
    reads, weights = torch.tensor([0, 1, 1, 4]), torch.tensor([0.5, 2.0, 1.0, 0.25], dtype=torch.float64)
    assert torch.equal(
        slot_scores("surprise-kl", reads, weights, background), slot_scores("kl", reads, weights, background)
    )


def test_slots_not_read_get_minus_infinity_and_an_empty_batch_scores_nothing(background):
    scores = slot_scores("kl", torch.tensor([3]), torch.ones(1, dtype=torch.float64), background)
    assert torch.isfinite(scores).nonzero().flatten().tolist() == [3]
    assert torch.isneginf(scores).sum() == N_SLOTS - 1

    empty = slot_scores("tfidf", torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.float64), background)
    assert torch.isneginf(empty).all()


def test_unknown_rule_is_refused_by_name(background):
    with pytest.raises(SmfdError, match="unknown slot selection rule 'bm25'"):
        slot_scores("bm25", torch.tensor([0]), torch.ones(1, dtype=torch.float64), background)


def lookup_of(indices: list) -> Lookup:
    """A lookup with given slot indices, shape (batch, seq, heads=1, k)."""
    idx = torch.tensor(indices)[:, :, None, :]
    return Lookup(indices=idx, weights=torch.full(idx.shape, 1.0 / idx.shape[-1]))


# Two sequences of 4 positions, k=2. Real tokens read slots 0..4; the padded tail of the second
# sequence reads slots 7 and 8, which no real token and no background text reads (the most
# "novel" slots there are, if padding counted).
PADDED_LOOKUP = [
    [[0, 1], [1, 2], [2, 3], [3, 4]],
    [[0, 4], [1, 3], [7, 8], [8, 7]],
]
PADDED_MASK = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])


@pytest.fixture
def wide_background() -> BackgroundStats:
    stats = BackgroundStats.empty(10)
    stats.add_batch(torch.tensor([0, 9, 9]))
    stats.add_batch(torch.tensor([5, 6, 9]))
    return stats


@pytest.mark.parametrize("rule", ["kl", "tfidf", "surprise-kl"])
def test_select_slots_never_picks_slots_read_only_by_padding(rule, wide_background):
    lookup = lookup_of(PADDED_LOOKUP)
    surprise = torch.ones(2, 4)

    chosen = select_slots(rule, lookup, PADDED_MASK, surprise, wide_background, top_t=10)

    assert chosen.numel() > 0
    assert set(chosen.tolist()) <= {0, 1, 2, 3, 4}
    # The same call counting every position would pick the padding slots: the mask is what excludes them.
    unmasked = select_slots(rule, lookup, torch.ones(2, 4), surprise, wide_background, top_t=10)
    assert {7, 8} <= set(unmasked.tolist())


@pytest.mark.parametrize("rule", ["kl", "tfidf"])
def test_select_slots_returns_at_most_top_t_of_the_best_scored_slots(rule, wide_background):
    lookup = lookup_of(PADDED_LOOKUP)
    reads, weights = batch_reads(lookup, PADDED_MASK.double())
    scores = slot_scores(rule, reads, weights, wide_background)

    for top_t in (1, 2, 3):
        chosen = select_slots(rule, lookup, PADDED_MASK, None, wide_background, top_t)
        assert chosen.numel() == top_t
        assert len(set(chosen.tolist())) == top_t
        others = [s for s in range(10) if s not in chosen.tolist()]
        assert scores[chosen].min() >= scores[others].max()


def test_select_slots_skips_slots_general_text_reads_as_often(wide_background):
    """Slot 0 fills most of the background reads: its KL share is negative, so it is never trained."""
    heavy = BackgroundStats.empty(10)
    for _ in range(20):
        heavy.add_batch(torch.tensor([0, 0, 0, 0, 1]))
    lookup = lookup_of([[[0, 2], [0, 3]]])

    chosen = select_slots("kl", lookup, torch.ones(1, 2), None, heavy, top_t=10)
    assert sorted(chosen.tolist()) == [2, 3]


def test_batch_reads_drops_masked_positions_and_keeps_weights():
    lookup = lookup_of([[[5, 6], [7, 8]]])
    reads, weights = batch_reads(lookup, torch.tensor([[0.0, 2.5]]))
    assert reads.tolist() == [7, 8]
    assert weights.tolist() == [2.5, 2.5]


def test_surprise_weights_shift_selection_toward_surprising_tokens():
    stats = BackgroundStats.empty(10)
    stats.add_batch(torch.tensor([9]))
    lookup = lookup_of([[[1, 2], [3, 4]]])
    mask = torch.ones(1, 2)

    chosen = select_slots("surprise-kl", lookup, mask, torch.tensor([[0.0, 3.0]]), stats, top_t=10)
    assert sorted(chosen.tolist()) == [3, 4], "tokens the model already predicts (surprise 0) pick no slots"


def test_surprise_kl_without_surprise_raises(wide_background):
    with pytest.raises(SmfdError, match="surprise-kl.*needs per-token surprise"):
        select_slots("surprise-kl", lookup_of(PADDED_LOOKUP), PADDED_MASK, None, wide_background, top_t=4)


def test_reads_cut_by_min_read_weight_are_not_counted():
    """A slot a batch reads only weakly is not this batch's slot: it is neither counted nor selectable."""
    indices = torch.tensor([[[[3, 5], [7, 9]]]])  # (batch 1, seq 1, heads 2, k 2)
    weights = torch.tensor([[[[0.8, 0.0], [0.6, 0.0]]]])  # slots 5 and 9 were read below the cut
    reads, read_weights = batch_reads(Lookup(indices, weights), torch.ones(1, 1))
    assert sorted(reads.tolist()) == [3, 7]
    assert read_weights.tolist() == [1.0, 1.0]
