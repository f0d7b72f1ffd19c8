"""Forgetting paths: silencing the memory at the answer read or at the context reads, and a fact lost
through one of them coming back only when that one is silenced."""

from __future__ import annotations

import torch

from smfd.bench.data import KnownFact
from smfd.bench.forgetting import forgetting_paths, silenced
from smfd.model.memory import MemorySection, recording_lookups
from smfd.model.retrofit import memory_bypassed
from smfd.model.scoring import greedy_continuations

OPEN_READS = MemorySection(layers=(1,), n_keys=16, heads=2, k=4, key_dim=16, min_read_weight=0.0)
PROMPT = "The harbour bridge was painted bright orange by"


def _logits(mm, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return mm.model(input_ids=ids).logits


def _write(memory, slots: torch.Tensor, scale: float) -> None:
    generator = torch.Generator().manual_seed(7)
    memory.values.write(slots, scale * torch.randn(slots.numel(), memory.values.shape[1], generator=generator))


def test_silencing_the_answer_read_or_the_context_reads_changes_only_those_positions(make_memory_model, tokenizer):
    mm = make_memory_model(OPEN_READS)
    for memory in mm.memories:
        _write(memory, torch.arange(memory.values.n_slots), 5.0)
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    full = _logits(mm, ids)
    with memory_bypassed(mm.memories):
        base = _logits(mm, ids)
    with silenced(mm.memories, "answer"):
        no_answer = _logits(mm, ids)
    with silenced(mm.memories, "context"):
        no_context = _logits(mm, ids)

    # Causal attention: the last position's read never reaches an earlier position.
    assert torch.equal(no_answer[0, :-1], full[0, :-1]) and not torch.equal(no_answer[0, -1], full[0, -1])
    # Without the context reads the earlier positions are the base model's; the last still reads the memory.
    assert torch.equal(no_context[0, :-1], base[0, :-1]) and not torch.equal(no_context[0, -1], base[0, -1])
    assert all(not m._forward_hooks for m in mm.memories)  # the hooks are gone on the way out


def test_a_fact_lost_through_the_answer_reads_comes_back_only_when_they_are_silenced(make_memory_model, tokenizer):
    mm = make_memory_model(OPEN_READS)
    with memory_bypassed(mm.memories):
        answer = greedy_continuations(mm.model, tokenizer, [PROMPT], 3)[0].strip()
    assert answer, "the tiny base model continues the prompt with some text"
    ids = tokenizer(PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    with recording_lookups(mm.memories), torch.no_grad():
        mm.model.get_decoder()(input_ids=ids)
        reads = {m.layer_index: m.last_lookup.indices[0] for m in mm.memories}
    for memory in mm.memories:  # every row but those the earlier prompt tokens read: the context reads stay silent
        all_slots = torch.arange(memory.values.n_slots)
        unread = all_slots[~torch.isin(all_slots, reads[memory.layer_index][:-1].flatten())]
        assert torch.isin(reads[memory.layer_index][-1].flatten(), unread).any()
        _write(memory, unread, 50.0)
    fact = KnownFact(PROMPT, answer, "test:1")

    paths = forgetting_paths(mm, [fact], [])

    assert paths["lost"] == paths["lost_unbatched"] == 1, "the written rows change the greedy answer"
    assert paths["back_without_answer_read"] == 1 and paths["back_without_context_reads"] == 0
    assert paths["lost_answer_read_on_trained"] > 0 and paths["lost_context_read_on_trained"] == 0.0
    assert paths["kept_answer_read_on_trained"] is None
