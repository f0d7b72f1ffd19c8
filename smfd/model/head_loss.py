"""Next-token NLL through a frozen LM head without holding the logits of the whole batch.

The LM head of a small model is its largest matmul: 49,152 vocabulary rows for SmolLM2, so one
training batch of 8×128 tokens makes 200 MB of logits, and autograd keeps them, their log-softmax
and their gradient alive at once (600 MB, more than the memory layer and the top blocks together).
Here the loss is taken a chunk of positions at a time, and each chunk's gradient with respect to
the hidden states, `(softmax - onehot) @ W / n`, is computed in the same pass and kept instead
(n × hidden: 2 MB for the same batch). The backward pass then only scales it. The arithmetic is the
one autograd would do (same matmuls, no recomputation), so a step costs what it did.

Only for a frozen head without bias (the weight needs no gradient): otherwise use the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Positions whose logits exist at once: 12.5 MB of float32 at SmolLM2's vocabulary. In the daemon a
# training step's peak above its state was at most 42 MB with 64 against 86 MB with 128 and 74 MB with
# 256 (the LM head's chunk stacks on the retain penalty's tensors). Each chunk reads the whole head
# weight (113 MB), so smaller chunks cost time: a step took 8% longer with 64 than with 256.
CHUNK_POSITIONS = 64
LOG_SOFTMAX_ROWS = 32  # rows normalised at once: a 6 MB temporary instead of a second copy of the chunk's logits


def log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last dimension of a 2-D tensor, in place, a few rows at a time.

    `Tensor.log_softmax` returns a new tensor as large as its input, so a chunk's logits and
    their log-softmax would be alive together (25 MB per chunk of 64 positions); rows are
    normalised independently, so block by block gives the same values.
    """
    for start in range(0, logits.shape[0], LOG_SOFTMAX_ROWS):
        block = logits[start : start + LOG_SOFTMAX_ROWS]
        block.copy_(block.log_softmax(-1))
    return logits


class _HeadNll(torch.autograd.Function):
    """Mean NLL of `targets` under `hidden @ weight.T`, with d(loss)/d(hidden) computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, n, chunk):
            rows = slice(start, start + chunk)
            logprobs = log_softmax_(F.linear(hidden[rows], weight).float())
            picked = targets[rows].unsqueeze(1)
            total -= logprobs.gather(1, picked).sum()
            if grad_hidden is not None:
                probs = logprobs.exp_()
                probs.scatter_add_(1, picked, torch.full_like(picked, -1.0, dtype=probs.dtype))
                grad_hidden[rows] = (probs.to(weight.dtype) @ weight).to(hidden.dtype) / n
        if grad_hidden is not None:
            ctx.save_for_backward(grad_hidden)
        return total / n

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None


def head_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of `targets` (n,) given `hidden` (n, d) before the LM `head`."""
    weight = getattr(head, "weight", None)
    if not isinstance(head, nn.Linear) or head.bias is not None or weight is None or weight.requires_grad:
        return F.cross_entropy(head(hidden).float(), targets)
    return _HeadNll.apply(hidden, weight, targets, CHUNK_POSITIONS)


@torch.no_grad()
def head_token_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """NLL of each of `targets` (n,) given `hidden` (n, d), the logits a chunk of positions at a time."""
    return head_token_scores(head, hidden, targets)[0]


@torch.no_grad()
def head_token_scores(
    head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(NLL of each target, whether it is the argmax) for `targets` (n,) given `hidden` (n, d), the logits a chunk
    of positions at a time and normalised in place."""
    nll, top = [hidden.new_zeros(0)], [torch.zeros(0, dtype=torch.bool, device=hidden.device)]
    for start in range(0, hidden.shape[0], CHUNK_POSITIONS):
        picked = targets[start : start + CHUNK_POSITIONS]
        logits = head(hidden[start : start + CHUNK_POSITIONS]).float()
        top.append(logits.argmax(-1) == picked)
        nll.append(-log_softmax_(logits).gather(1, picked.unsqueeze(1)).squeeze(1))
    return torch.cat(nll), torch.cat(top)
