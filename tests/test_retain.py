"""The retain text: the frozen model's own statements of fact, sampled from the shipped prompts."""

from __future__ import annotations

import pytest
import torch

from smfd.errors import SmfdError
from smfd.learn.interference import RetainSet, fact_prompts, retain_text, sample_self_facts


def test_shipped_fact_prompts_are_distinct_lines():
    prompts = fact_prompts()
    assert len(prompts) >= 20
    assert len(set(prompts)) == len(prompts)


def test_self_facts_continue_the_prompts_deterministically(tiny_memory_model):
    mm = tiny_memory_model
    facts = sample_self_facts(mm.model, mm.tokenizer, mm.memories, 5)
    prompts = fact_prompts()

    assert len(facts) == 5
    for i, sequence in enumerate(facts):
        prompt_ids = mm.tokenizer(prompts[i], add_special_tokens=False).input_ids
        assert sequence[: len(prompt_ids)] == prompt_ids
        assert len(sequence) > len(prompt_ids), "the model must have continued the prompt"
    assert sample_self_facts(mm.model, mm.tokenizer, mm.memories, 5) == facts


def test_self_facts_are_the_base_models_whatever_the_memory_holds(tiny_memory_model):
    """Statements sampled after updates must still be the base model's: the memory is bypassed."""
    mm = tiny_memory_model
    before = sample_self_facts(mm.model, mm.tokenizer, mm.memories, 3)
    for memory in mm.memories:
        rows = torch.randn(memory.values.shape, generator=torch.Generator().manual_seed(1)) * 10.0
        memory.values.write(torch.arange(memory.values.n_slots), rows)
    assert sample_self_facts(mm.model, mm.tokenizer, mm.memories, 3) == before


def test_no_statements_asked_none_sampled(tiny_memory_model):
    mm = tiny_memory_model
    assert sample_self_facts(mm.model, mm.tokenizer, mm.memories, 0) == []


def test_retain_set_watches_at_most_the_asked_tokens(tiny_memory_model):
    mm = tiny_memory_model
    facts = sample_self_facts(mm.model, mm.tokenizer, mm.memories, 4)
    retain = RetainSet.collect(mm.model, mm.memories, facts, 20)
    assert retain.n_tokens == min(20, sum(len(s) for s in facts))


def test_retain_text_takes_the_statements_first_then_the_general_text():
    facts, general = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13]]
    assert retain_text(facts, general) == [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert retain_text([], general) == general


def test_retain_text_without_any_text_is_an_error():
    with pytest.raises(SmfdError, match="no statements of fact and no general text"):
        retain_text([], [])
