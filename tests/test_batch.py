"""Scoring forwards are grouped so that none holds more than a bounded number of padded tokens,
and the grouping never changes a score."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from smfd.learn.surprise import sequence_surprise
from smfd.model.batch import forward_groups
from smfd.model.scoring import continuation_scores, drift_kl_by_group, drift_kl_sum, next_token_logprobs


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 300), max_size=40),
    max_rows=st.integers(1, 16),
    padded_tokens=st.integers(16, 1024),
)
def test_forward_groups_cover_every_item_once_within_both_limits_and_no_more_groups_than_needed(
    lengths, max_rows, padded_tokens
):
    groups = forward_groups(lengths, max_rows, padded_tokens)
    assert [i for group in groups for i in group] == list(range(len(lengths)))
    for group in groups:
        assert 1 <= len(group) <= max_rows
        widest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * widest <= padded_tokens
    for group, following in zip(groups, groups[1:]):  # the next item did not fit: the group was closed for a reason
        joined = range(group.start, following.start + 1)
        assert len(joined) > max_rows or len(joined) * max(lengths[i] for i in joined) > padded_tokens


def test_forward_groups_refuse_groups_of_no_rows():
    with pytest.raises(ValueError, match="max_rows"):
        forward_groups([3, 4], 0)


def _sequences(generator: torch.Generator, vocab: int, lengths: list[int]) -> list[list[int]]:
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


def test_surprise_does_not_depend_on_how_sequences_are_grouped(tiny_memory_model):
    mm = tiny_memory_model
    sequences = _sequences(torch.Generator().manual_seed(0), mm.model.config.vocab_size, [5, 40, 12, 33, 7, 21])
    pad = mm.tokenizer.pad_token_id
    alone = sequence_surprise(mm.model, mm.memories, sequences, pad, 1, "cpu")
    grouped = sequence_surprise(mm.model, mm.memories, sequences, pad, 4, "cpu")
    assert [len(t) for t in grouped] == [len(s) for s in sequences]
    for one, many in zip(alone, grouped):
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)


def test_continuation_and_drift_scores_do_not_depend_on_the_grouping(tiny_memory_model):
    mm = tiny_memory_model
    pairs = [("the river", " runs north"), ("a", " small stone house by the old mill"), ("bread and", " salt")] * 3
    alone = continuation_scores(mm.model, mm.tokenizer, pairs, batch_size=1)
    grouped = continuation_scores(mm.model, mm.tokenizer, pairs, batch_size=16)
    assert [(n, top) for _, n, top in grouped] == [(n, top) for _, n, top in alone]
    assert [nll for nll, _, _ in grouped] == pytest.approx([nll for nll, _, _ in alone], rel=1e-5)
    windows = _sequences(torch.Generator().manual_seed(1), mm.model.config.vocab_size, [9, 30, 4, 17])
    for one, many in zip(next_token_logprobs(mm.model, windows, 1), next_token_logprobs(mm.model, windows, 8)):
        torch.testing.assert_close(many, one, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(many.exp().sum(-1), torch.ones(len(many)))  # normalised in place, row by row


def test_drift_by_group_equals_drift_over_all_windows_and_asks_the_base_one_group_at_a_time(tiny_memory_model):
    mm = tiny_memory_model
    memory = mm.memories[0]
    everywhere = torch.arange(memory.config.n_slots)
    memory.values.write(everywhere, torch.randn(memory.config.n_slots, memory.values.width) * 5)
    windows = _sequences(torch.Generator().manual_seed(2), mm.model.config.vocab_size, [9, 30, 4, 17, 12, 6])
    with mm.base():
        base = next_token_logprobs(mm.model, windows)
    asked: list[range] = []

    def base_of(group: range) -> list[torch.Tensor]:
        asked.append(group)
        return [base[i] for i in group]

    total, positions = drift_kl_sum(base, next_token_logprobs(mm.model, windows))
    expected = total / positions
    assert expected > 1e-4
    assert drift_kl_by_group(mm.model, windows, base_of, batch_size=2) == pytest.approx(expected, rel=1e-5)
    assert [i for group in asked for i in group] == list(range(len(windows)))  # every window once, in order
    assert max(len(group) for group in asked) == 2
