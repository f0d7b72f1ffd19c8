"""The chunked LM-head loss is the plain cross-entropy: same value, same gradient, less memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smfd.model import head_loss
from smfd.model.head_loss import head_nll, head_token_nll, head_token_scores


@pytest.mark.parametrize("positions", [1, 7, 256, 600])
def test_chunked_loss_and_gradient_match_the_plain_cross_entropy(positions, monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_POSITIONS", 64)  # several chunks, the last one short
    generator = torch.Generator().manual_seed(positions)
    head = nn.Linear(24, 500, bias=False).requires_grad_(False)
    nn.init.normal_(head.weight, generator=generator)
    hidden = torch.randn(positions, 24, generator=generator, dtype=torch.float64).float().requires_grad_(True)
    targets = torch.randint(0, 500, (positions,), generator=generator)

    plain = F.cross_entropy(head(hidden).float(), targets)
    (plain_grad,) = torch.autograd.grad(plain, hidden)
    chunked = head_nll(head, hidden, targets)
    (chunked_grad,) = torch.autograd.grad(chunked * 3.0, hidden)

    assert torch.allclose(chunked, plain, rtol=1e-5, atol=1e-6)
    assert torch.allclose(chunked_grad, 3.0 * plain_grad, rtol=1e-4, atol=1e-7)


def test_a_trainable_head_gets_its_gradient_through_the_plain_loss():
    head = nn.Linear(8, 40, bias=False)
    hidden, targets = torch.randn(5, 8), torch.randint(0, 40, (5,))
    head_nll(head, hidden, targets).backward()
    assert head.weight.grad is not None and bool(head.weight.grad.abs().sum() > 0)


def test_per_token_nll_in_chunks_matches_the_plain_cross_entropy(monkeypatch):
    monkeypatch.setattr(head_loss, "CHUNK_POSITIONS", 16)
    generator = torch.Generator().manual_seed(3)
    head = nn.Linear(12, 90, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(50, 12, generator=generator), torch.randint(0, 90, (50,), generator=generator)
    expected = F.cross_entropy(head(hidden), targets, reduction="none")
    assert torch.allclose(head_token_nll(head, hidden, targets), expected, atol=1e-6)


def test_per_token_scores_are_the_plain_log_softmax_and_argmax_to_the_bit(monkeypatch):
    """Normalising in place, a few rows at a time, changes no value: scores before and after the change compare."""
    monkeypatch.setattr(head_loss, "CHUNK_POSITIONS", 16)
    monkeypatch.setattr(head_loss, "LOG_SOFTMAX_ROWS", 5)  # blocks that do not divide a chunk
    generator = torch.Generator().manual_seed(4)
    head = nn.Linear(12, 90, bias=False).requires_grad_(False)
    hidden, targets = torch.randn(50, 12, generator=generator), torch.randint(0, 90, (50,), generator=generator)
    logits = torch.cat([head(hidden[start : start + 16]) for start in range(0, 50, 16)])  # the same matmuls
    targets[::3] = logits.argmax(-1)[::3]  # some targets are the argmax
    nll, top = head_token_scores(head, hidden, targets)
    assert torch.equal(nll, F.cross_entropy(logits, targets, reduction="none"))
    assert torch.equal(top, logits.argmax(-1) == targets) and bool(top.any()) and not bool(top.all())
