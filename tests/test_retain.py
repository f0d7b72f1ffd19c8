"""The retain text: the frozen model's own statements of fact, sampled from the shipped prompts."""

from __future__ import annotations

import pytest
import torch

from smfd.errors import SmfdError
from smfd.learn.heal import memory_inputs
from smfd.learn.interference import RetainSet, fact_prompts, fact_recipe, retain_text
from smfd.learn.kept_text import model_text


def test_shipped_fact_prompts_are_distinct_lines():
    prompts = fact_prompts()
    assert len(prompts) >= 20
    assert len(set(prompts)) == len(prompts)


def test_self_facts_continue_the_prompts_deterministically(tiny_memory_model):
    mm = tiny_memory_model
    facts = model_text(mm, fact_recipe(5), None).sequences
    prompts = fact_prompts()

    assert len(facts) == 5
    for i, sequence in enumerate(facts):
        prompt_ids = mm.tokenizer(prompts[i], add_special_tokens=False).input_ids
        assert sequence[: len(prompt_ids)] == prompt_ids
        assert len(sequence) > len(prompt_ids), "the model must have continued the prompt"
    assert model_text(mm, fact_recipe(5), None).sequences == facts


def test_self_facts_are_the_base_models_whatever_the_memory_holds(tiny_memory_model):
    """Statements sampled after updates must still be the base model's: the memory is bypassed."""
    mm = tiny_memory_model
    before = model_text(mm, fact_recipe(3), None).sequences
    for memory in mm.memories:
        rows = torch.randn(memory.values.shape, generator=torch.Generator().manual_seed(1)) * 10.0
        memory.values.write(torch.arange(memory.values.n_slots), rows)
    assert model_text(mm, fact_recipe(3), None).sequences == before


def test_no_statements_asked_none_sampled(tiny_memory_model):
    mm = tiny_memory_model
    assert model_text(mm, fact_recipe(0), None).sequences == []


def test_retain_set_watches_at_most_the_asked_tokens(tiny_memory_model):
    mm = tiny_memory_model
    facts = model_text(mm, fact_recipe(4), None).sequences
    retain = RetainSet.collect(mm.model, mm.memories, facts, 20)
    assert retain.n_tokens == min(20, sum(len(s) for s in facts))


def test_retain_text_takes_the_statements_first_then_the_general_text():
    facts, general = [[5, 6, 7], [8, 9]], [[10, 11, 12, 13]]
    assert retain_text(facts, general) == [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    assert retain_text([], general) == general


def test_retain_text_without_any_text_is_an_error():
    with pytest.raises(SmfdError, match="no statements of fact and no general text"):
        retain_text([], [])


def test_sampling_keeps_the_inputs_a_second_pass_over_the_text_would_give(tiny_memory_model):
    """A new state heals and counts from what sampling fed the memory: it must be what the finished text feeds it."""
    mm = tiny_memory_model
    sampled = model_text(mm, fact_recipe(6), None)
    again = memory_inputs(mm.model, mm.memories, sampled.sequences)
    for memory in mm.memories:
        kept, rerun = sampled.inputs[memory.layer_index], again[memory.layer_index]
        assert len(kept) == len(sampled.sequences)
        for sequence, hidden, full in zip(sampled.sequences, kept, rerun):
            assert len(sequence) - 1 <= hidden.shape[0] <= len(sequence), (
                "every fed token, at most the last one missing"
            )
            torch.testing.assert_close(hidden, full[: hidden.shape[0]], rtol=1e-4, atol=1e-5)


def test_retain_set_from_sampled_inputs_matches_running_the_text(tiny_memory_model):
    mm = tiny_memory_model
    sampled = model_text(mm, fact_recipe(4), None)
    n = sum(len(h) for h in sampled.inputs[mm.memories[0].layer_index]) - 3
    kept = RetainSet.from_inputs(mm.model, mm.memories, sampled.inputs, n)
    again = memory_inputs(mm.model, mm.memories, sampled.sequences)
    fed = {  # the same tokens: sampling never feeds a sequence's last sampled token
        layer: [full[: len(hidden)] for full, hidden in zip(again[layer], sampled.inputs[layer])] for layer in again
    }
    rerun = RetainSet.from_inputs(mm.model, mm.memories, fed, n)
    assert kept.n_tokens == rerun.n_tokens == n
    for layer, ours in kept.layers.items():
        theirs = rerun.layers[layer]
        assert torch.equal(ours.indices, theirs.indices) or _same_reads(ours, theirs)
        torch.testing.assert_close(ours.gate, theirs.gate, rtol=1e-4, atol=1e-5)
        assert ours.scale == pytest.approx(theirs.scale, rel=1e-4)


def test_retain_set_needs_each_memory_layers_inputs(tiny_memory_model):
    mm = tiny_memory_model
    with pytest.raises(SmfdError, match=f"inputs of memory layer {mm.memories[0].layer_index}"):
        RetainSet.from_inputs(mm.model, mm.memories, {}, 10)


def _same_reads(ours, theirs) -> bool:
    """Rounding may swap two slots of near-equal score: the read weights must still agree where slots agree."""
    agree = ours.indices == theirs.indices
    return bool(agree.float().mean() > 0.99) and torch.allclose(ours.weights[agree], theirs.weights[agree], atol=1e-4)


def test_retain_set_read_chunk_by_chunk_is_the_whole_texts_view(tiny_memory_model, background_sequences, monkeypatch):
    """The retain set's reads and gate, filled a few tokens at a time from the inputs' pool, are what the
    memory computes on all the tokens at once (to the rounding of other matrix shapes)."""
    import smfd.learn.interference as interference

    mm = tiny_memory_model
    monkeypatch.setattr(interference, "RETAIN_CHUNK", 7)  # chunks that end inside sequences
    n = sum(len(s) for s in background_sequences) - 5
    retain = RetainSet.collect(mm.model, mm.memories, background_sequences, n)
    memory = mm.memories[0]
    hidden = torch.cat(memory_inputs(mm.model, mm.memories, background_sequences)[memory.layer_index])[:n]
    with torch.no_grad():
        found = memory.lookup(hidden[None])
        gate = torch.nn.functional.silu(memory.gate(hidden))
    layer = retain.layers[memory.layer_index]
    assert retain.n_tokens == n
    assert torch.equal(layer.indices, found.indices.reshape(n, -1))
    torch.testing.assert_close(layer.weights, found.weights.reshape(n, -1), rtol=1e-5, atol=1e-6)  # chunk rounding
    torch.testing.assert_close(layer.gate, gate, rtol=1e-5, atol=1e-6)
