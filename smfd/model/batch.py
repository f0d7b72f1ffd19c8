"""Turn texts into padded token batches for training steps, and group sequences for scoring forwards."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

# Padded tokens per scoring forward (no gradient). A forward's activations grow with the tokens it
# holds, about 70 KB per token on the embedded model: 8 sequences of 128 tokens made the daemon's
# largest passing peak (72 MB above its resident base); 512 tokens hold about 35 MB.
FORWARD_TOKENS = 512


@dataclass
class TokenBatch:
    """A padded batch. `loss_mask[b, t]` marks tokens whose prediction is trained (never padding, never token 0)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    surprise: torch.Tensor | None = None
    # Context distillation (smfd.learn.distill): per token the teacher's top-k ids and log-probs, (batch, seq, k).
    teacher_ids: torch.Tensor | None = None
    teacher_logprobs: torch.Tensor | None = None

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        """Every per-row tensor, in field order (for slicing and moving a batch as a whole)."""
        return (
            self.input_ids,
            self.attention_mask,
            self.loss_mask,
            self.surprise,
            self.teacher_ids,
            self.teacher_logprobs,
        )

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def sequences(self) -> list[tuple[int, ...]]:
        """Each row's real tokens: the identity of a sequence whatever batch (and padding) it lands in."""
        return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(self.input_ids, self.attention_mask)]

    def to(self, device: torch.device) -> TokenBatch:
        return TokenBatch(*(None if t is None else t.to(device) for t in self.tensors()))

    def rows(self, pick: slice) -> TokenBatch:
        """These rows of the batch (views: every per-row tensor sliced alike)."""
        return TokenBatch(*(None if t is None else t[pick] for t in self.tensors()))


@dataclass
class TeacherTarget:
    """The teacher's view of one query: per token i (row 0 unused) its top-k ids and log-probs,
    and how far the document moves the base model's prediction of that token (KL, nats)."""

    ids: torch.Tensor  # (n, k) long
    logprobs: torch.Tensor  # (n, k) float, teacher log-probs (not renormalised)
    shift: torch.Tensor  # (n,) float, KL(teacher top-k ‖ base); 0 at row 0
    trained: torch.Tensor  # (n,) bool, tokens whose prediction the document moves enough to train (never row 0)


def packed(sequences: list[list[int]], dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
    """Token sequences as the two flat tensors smfd stores them in: `ids` end to end and their `lengths`."""
    return {
        "ids": torch.tensor([t for seq in sequences for t in seq], dtype=dtype),
        "lengths": torch.tensor([len(seq) for seq in sequences], dtype=dtype),
    }


def unpacked(ids: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """The sequences `packed` stored (the caller checks that `lengths` add up to the ids)."""
    return [chunk.tolist() for chunk in torch.split(ids, lengths.tolist())]


def encode(tokenizer: PreTrainedTokenizerBase, texts: list[str], seq_len: int) -> list[list[int]]:
    """Token ids per text, cut into pieces of at most `seq_len` tokens (no special tokens: probes have none)."""
    pieces = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        pieces.extend(ids[i : i + seq_len] for i in range(0, len(ids), seq_len) if len(ids[i : i + seq_len]) > 1)
    return pieces


def make_batch(
    sequences: list[list[int]],
    pad_id: int,
    surprise: list[torch.Tensor] | None = None,
    teacher: list[TeacherTarget] | None = None,
) -> TokenBatch:
    """Right-padded batch; every real token after the first is trained."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    weights = torch.zeros((len(sequences), width)) if surprise is not None else None
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        if weights is not None:
            weights[row, : len(seq)] = surprise[row][: len(seq)]
    loss_mask = mask.clone()
    loss_mask[:, 0] = 0
    if teacher is None:
        return TokenBatch(ids, mask, loss_mask, weights)
    k = teacher[0].ids.shape[1]
    teacher_ids = torch.zeros((len(sequences), width, k), dtype=torch.long)
    teacher_logprobs = torch.zeros((len(sequences), width, k))
    for row, target in enumerate(teacher):
        loss_mask[row, : len(target.trained)] &= target.trained.to(loss_mask.dtype)
        teacher_ids[row, : len(target.ids)] = target.ids
        teacher_logprobs[row, : len(target.ids)] = target.logprobs
    return TokenBatch(ids, mask, loss_mask, weights, teacher_ids, teacher_logprobs)


def epoch_batches(
    sequences: list[list[int]],
    batch_size: int,
    passes: int,
    pad_id: int,
    seed: int = 0,
    surprise: list[torch.Tensor] | None = None,
    teacher: list[TeacherTarget] | None = None,
) -> list[TokenBatch]:
    """`passes` shuffled passes over the sequences, grouped into batches of similar length to waste little padding."""
    rng = random.Random(seed)
    batches = []
    order = list(range(len(sequences)))
    for _ in range(passes):
        rng.shuffle(order)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            seqs = [sequences[i] for i in rows]
            weights = [surprise[i] for i in rows] if surprise is not None else None
            targets = [teacher[i] for i in rows] if teacher is not None else None
            batches.append(make_batch(seqs, pad_id, weights, targets))
    return batches


def forward_groups(lengths: list[int], max_rows: int, padded_tokens: int = FORWARD_TOKENS) -> list[range]:
    """Consecutive index ranges, one scoring forward each: at most `max_rows` items, and at most
    `padded_tokens` once padded to the group's longest (an item longer than that is a group alone)."""
    if max_rows < 1:
        raise ValueError(f"forward_groups: max_rows must be at least 1, got {max_rows}")
    groups, start, longest = [], 0, 0
    for index, length in enumerate(lengths):
        wider = max(longest, length)
        if index > start and (index - start == max_rows or (index - start + 1) * wider > padded_tokens):
            groups.append(range(start, index))
            start, wider = index, length
        longest = wider
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups
