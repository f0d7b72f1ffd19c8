"""Forgetting paths: where an SMF memory loses a known fact.

The memory adds its read to one layer's MLP output at every token, so a known fact the base model
answered can be lost in two places:

- the *answer read*: the memory's output at the prompt's last token (the one that predicts the
  answer's first token) and at each token greedy decoding appends after it;
- the *context reads*: its output at the earlier prompt tokens, which the layers above carry to
  the answer through attention.

For every lost fact the model is asked again (greedy, one prompt at a time) with the memory
silenced at one of the two places. A fact that comes back with the answer read silenced was lost
through that read; one that comes back with the context reads silenced was lost through
attention. Beside that, the share of each read's weight that lands on trained rows, for lost and
for kept facts: whether lost facts are the ones whose prompts address trained rows at all.
Silencing everything is the base model exactly, so it is not asked.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

import torch

from smfd.bench.data import KnownFact
from smfd.model.memory import ProductKeyMemory, recording_lookups
from smfd.model.memory_model import MemoryModel
from smfd.model.scoring import score_cloze

Silenced = Literal["answer", "context"]


def _silencer(where: Silenced):  # noqa: ANN202 (a forward hook)
    """A memory forward hook that zeroes the output at the answer side or at the earlier prompt tokens.

    With a KV cache the prompt arrives in one call (its last position is the answer read) and each
    generated token in a call of its own (also answer side).
    """

    def hook(_module: ProductKeyMemory, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        keep = torch.ones(output.shape[1], 1, dtype=output.dtype, device=output.device)
        if output.shape[1] == 1:  # a generated token
            keep[:] = 0.0 if where == "answer" else 1.0
        elif where == "answer":
            keep[-1] = 0.0
        else:
            keep[:-1] = 0.0
        return output * keep

    return hook


@contextlib.contextmanager
def silenced(memories: list[ProductKeyMemory], where: Silenced) -> Iterator[None]:
    """Inside, every memory's output is zero at `where` (single, unpadded prompts only)."""
    handles = [m.register_forward_hook(_silencer(where)) for m in memories]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _answered(mm: MemoryModel, facts: list[KnownFact]) -> list[bool]:
    """Greedy cloze, one prompt per call (the silencing hook needs unpadded rows); only `correct` is used."""
    return [score_cloze(mm.model, mm.tokenizer, [(f.prompt, f.answer)], batch_size=1)[0].correct for f in facts]


def _trained_share(mm: MemoryModel, prompt: str, trained: dict[int, torch.Tensor]) -> tuple[float, float]:
    """Share of the read weight on trained rows at the prompt's last token, and over its earlier tokens."""
    ids = mm.tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids.to(mm.device)
    answer_hit = answer_all = context_hit = context_all = 0.0
    with recording_lookups(mm.memories), torch.no_grad():
        mm.model.get_decoder()(input_ids=ids)
        for memory in mm.memories:
            found = memory.last_lookup
            if found is None:
                continue
            weights = found.weights[0]  # (seq, heads, k)
            on_trained = weights * torch.isin(found.indices[0], trained[memory.layer_index])
            answer_hit += float(on_trained[-1].sum())
            answer_all += float(weights[-1].sum())
            context_hit += float(on_trained[:-1].sum())
            context_all += float(weights[:-1].sum())
    return answer_hit / answer_all if answer_all else 0.0, context_hit / context_all if context_all else 0.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _read_shares(
    mm: MemoryModel, facts: list[KnownFact], trained: dict[int, torch.Tensor], prefix: str
) -> dict[str, Any]:
    shares = [_trained_share(mm, f.prompt, trained) for f in facts]
    return {
        f"{prefix}_answer_read_on_trained": _mean([a for a, _ in shares]),
        f"{prefix}_context_read_on_trained": _mean([c for _, c in shares]),
    }


@torch.no_grad()
def forgetting_paths(mm: MemoryModel, lost: list[KnownFact], kept: list[KnownFact]) -> dict[str, Any]:
    """How many lost facts come back with the memory silenced at the answer or at the context, and what
    share of the lost and kept facts' reads lands on trained rows."""
    model = mm.model
    training = model.training
    model.eval()
    try:
        trained = {layer: table.trained_slots() for layer, table in mm.values().items()}
        still_lost = [f for f, ok in zip(lost, _answered(mm, lost)) if not ok]
        back: dict[str, int] = {}
        for where in ("answer", "context"):
            with silenced(mm.memories, where):
                back[where] = sum(_answered(mm, still_lost))
        return {
            "lost": len(lost),
            "lost_unbatched": len(still_lost),  # lost again when asked alone (padding can round differently)
            "back_without_answer_read": back["answer"],
            "back_without_context_reads": back["context"],
            **_read_shares(mm, lost, trained, "lost"),
            **_read_shares(mm, kept, trained, "kept"),
        }
    finally:
        model.train(training)
