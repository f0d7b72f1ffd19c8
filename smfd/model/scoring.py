"""Scoring primitives shared by probes and the benchmark.

- cloze: NLL of a target after a prompt, and whether a greedy continuation contains it;
- choice: multiple choice by log-likelihood normalised by the ending's byte length (HellaSwag);
- heldout: mean NLL per token of plain text in fixed windows;
- drift: mean KL(base || current) of next-token distributions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from smfd.model.batch import forward_groups
from smfd.model.head_loss import head_token_nll, head_token_scores, log_softmax_


@dataclass
class ClozeResult:
    nll: float
    correct: bool
    continuation: str


@dataclass
class ChoiceResult:
    nll: float
    correct: bool
    predicted: int


def right_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask: every row's real tokens start at position 0."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return ids, mask


def left_padded(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and attention mask, so every row's last real token is at the end (for generation)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq) :] = torch.tensor(seq)
        mask[row, width - len(seq) :] = 1
    return ids, mask


@torch.no_grad()
def continuation_nll(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 16
) -> list[tuple[float, int]]:
    """For each (context, continuation): summed NLL of the continuation's tokens and their count."""
    return [(total, n) for total, n, _ in continuation_scores(model, tokenizer, pairs, batch_size)]


@torch.no_grad()
def continuation_scores(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: list[tuple[str, str]], batch_size: int = 16
) -> list[tuple[float, int, bool]]:
    """(summed NLL, token count, every continuation token is the argmax) for each (context, continuation).

    The last is teacher-forced greedy: true exactly when greedy decoding would begin with the continuation.
    Up to `batch_size` pairs a forward, fewer where they are long (`smfd.model.batch.forward_groups`).
    """
    device = next(model.parameters()).device
    results: list[tuple[float, int, bool]] = []
    all_sequences, all_spans = [], []
    for context, continuation in pairs:
        ctx_ids = tokenizer(context, add_special_tokens=False).input_ids
        cont_ids = tokenizer(continuation, add_special_tokens=False).input_ids
        all_sequences.append(ctx_ids + cont_ids)
        all_spans.append((len(ctx_ids), len(ctx_ids) + len(cont_ids)))
    for group in forward_groups([len(seq) for seq in all_sequences], batch_size):
        sequences, spans = all_sequences[group.start : group.stop], all_spans[group.start : group.stop]
        ids, mask = right_padded(sequences, tokenizer.pad_token_id)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        # The vocabulary projection is most of the cost: apply it only where a continuation token is predicted.
        rows = torch.cat([torch.full((hi - lo,), r, dtype=torch.long) for r, (lo, hi) in enumerate(spans)]).to(device)
        cols = torch.cat([torch.arange(lo - 1, hi - 1) for lo, hi in spans]).to(device)
        nll, top = head_token_scores(model.get_output_embeddings(), hidden[rows, cols], ids[rows, cols + 1])
        totals = torch.zeros(len(spans), device=device).index_add_(0, rows, -nll)
        misses = torch.zeros(len(spans), device=device).index_add_(0, rows, (~top).float())
        results.extend((float(-totals[r]), hi - lo, bool(misses[r] == 0)) for r, (lo, hi) in enumerate(spans))
    return results


@torch.no_grad()
def greedy_continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Greedy continuations, batched with left padding."""
    device = next(model.parameters()).device
    outputs: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        ids, mask = left_padded(
            [tokenizer(p, add_special_tokens=False).input_ids for p in chunk], tokenizer.pad_token_id
        )
        width = ids.shape[1]
        generated = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.extend(tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True))
    return outputs


def _contains(continuation: str, target: str) -> bool:
    return target.strip().lower() in continuation.lower()


def score_cloze(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[tuple[str, str]],
    batch_size: int = 16,
    extra_tokens: int = 8,
) -> list[ClozeResult]:
    """(prompt, target) items: mean NLL per target token, and whether greedy decoding produces the target."""
    if not items:
        return []
    nlls = continuation_nll(model, tokenizer, [(p, " " + t.strip()) for p, t in items], batch_size)
    longest = max(n for _, n in nlls)
    continuations = greedy_continuations(model, tokenizer, [p for p, _ in items], longest + extra_tokens, batch_size)
    return [
        ClozeResult(nll=total / max(n, 1), correct=_contains(text, target), continuation=text)
        for (total, n), text, (_, target) in zip(nlls, continuations, items)
    ]


def score_choice(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: list[tuple[str, list[str], int]],
    batch_size: int = 32,
) -> list[ChoiceResult]:
    """(context, endings, label) items, scored by NLL per byte of each ending (length-normalised)."""
    pairs = [(ctx, " " + ending.strip()) for ctx, endings, _ in items for ending in endings]
    scored = continuation_nll(model, tokenizer, pairs, batch_size)
    results, cursor = [], 0
    for _context, endings, label in items:
        per_byte = [scored[cursor + i][0] / max(len((" " + e.strip()).encode()), 1) for i, e in enumerate(endings)]
        cursor += len(endings)
        predicted = min(range(len(endings)), key=per_byte.__getitem__)
        total, n = scored[cursor - len(endings) + label]
        results.append(ChoiceResult(nll=total / max(n, 1), correct=predicted == label, predicted=predicted))
    return results


def text_windows(tokenizer: PreTrainedTokenizerBase, text: str, window: int, max_tokens: int | None) -> list[list[int]]:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return [ids[i : i + window] for i in range(0, len(ids), window) if len(ids[i : i + window]) > 1]


@torch.no_grad()
def heldout_nll(model: PreTrainedModel, windows: list[list[int]], batch_size: int = 4) -> float:
    """Mean NLL per predicted token over fixed token windows."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids, mask = right_padded(windows[start : start + batch_size], 0)
        ids, mask = ids.to(device), mask.to(device)
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        scored = mask[:, 1:].bool()
        nll = head_token_nll(model.get_output_embeddings(), hidden[:, :-1][scored], ids[:, 1:][scored])
        total += float(nll.sum())
        count += nll.numel()
    return total / max(count, 1)


@torch.no_grad()
def next_token_logprobs(model: PreTrainedModel, windows: list[list[int]], batch_size: int = 8) -> list[torch.Tensor]:
    """Log-probabilities at every real position of each window (for drift against a later state)."""
    device = next(model.parameters()).device
    out = []
    for group in forward_groups([len(w) for w in windows], batch_size):
        batch = windows[group.start : group.stop]
        ids, mask = right_padded(batch, 0)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logprobs = log_softmax_(logits.flatten(0, 1)).view(logits.shape).cpu()  # in place: one vocabulary-wide copy
        out.extend(logprobs[row, : len(seq)] for row, seq in enumerate(batch))
    return out


def drift_kl_by_group(
    model: PreTrainedModel,
    windows: list[list[int]],
    base_logprobs: Callable[[range], list[torch.Tensor]],
    batch_size: int = 8,
) -> float:
    """Mean per-position KL(base || model) over `windows`, one scoring forward group at a time.

    `base_logprobs(group)`: the base's log-probabilities for `windows[group]` (read from a file, or
    computed beside the model's). Each window's log-probabilities span the whole vocabulary (about
    200 KB per position for the embedded model), so only one group's, the model's and the base's,
    are alive at once rather than every window's.
    """
    total, positions = 0.0, 0
    for group in forward_groups([len(w) for w in windows], batch_size):
        now = next_token_logprobs(model, windows[group.start : group.stop], batch_size)
        group_total, count = drift_kl_sum(base_logprobs(group), now)
        total += group_total
        positions += count
    return total / max(positions, 1)


def drift_kl_sum(base_logprobs: list[torch.Tensor], current_logprobs: list[torch.Tensor]) -> tuple[float, int]:
    """(KL(base || current) summed over positions, in nats; the number of positions), for a mean over batches."""
    total, count = 0.0, 0
    for base, now in zip(base_logprobs, current_logprobs):
        total += float((base.exp() * (base - now)).sum())
        count += base.shape[0]
    return total, count
