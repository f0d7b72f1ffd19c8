"""Sampled text kept per model: a new state reads it instead of sampling again, and never reads a wrong file."""

from __future__ import annotations

import shutil

import pytest
import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from smfd.learn.interference import fact_recipe
from smfd.learn.kept_text import SampleRecipe, SampleStore, model_sequences, model_text
from smfd.model.loading import ModelSource

DIGEST = "tiny-model-for-tests"


def _events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


@pytest.mark.parametrize("ends_early", [False, True])
def test_a_second_state_reads_the_kept_text_and_gets_the_same_text_and_inputs(tiny_memory_model, tmp_path, ends_early):
    """Kept text gives the rows sampling gave (same tokens, values up to rounding), over several batches and
    with rows that end early (every other token id made an end-of-sequence token)."""
    mm = tiny_memory_model
    if ends_early:
        mm.model.generation_config.eos_token_id = list(range(0, len(mm.tokenizer), 2))
    store = SampleStore(DIGEST, tmp_path / "cache", shipped=tmp_path / "none")
    recipe = SampleRecipe(fact_recipe(1).prompts, 40, 6)
    sampled = model_text(mm, recipe, store)
    assert len(list((tmp_path / "cache").iterdir())) == 1, "sampling keeps its ids in the model cache"

    with structlog.testing.capture_logs() as logs:
        kept = model_text(mm, recipe, store)
    assert _events(logs, "sampled_text_kept"), "the kept ids must be read, not sampled again"
    assert kept.sequences == sampled.sequences
    lengths = {
        len(sequence) - len(mm.tokenizer(recipe.prompts[i], add_special_tokens=False).input_ids)
        for i, sequence in enumerate(kept.sequences)
    }
    assert len(lengths) > 1 and max(lengths) == recipe.max_new_tokens, "both kinds of row must be in the test"
    for layer, hidden in sampled.inputs.items():
        for fed, rerun in zip(hidden, kept.inputs[layer]):
            assert rerun.shape == fed.shape, "the same tokens as sampling fed, so healing draws the same ones"
            torch.testing.assert_close(rerun, fed, rtol=1e-4, atol=1e-5)


def test_kept_text_is_per_model_and_per_recipe(tiny_memory_model, tmp_path):
    mm = tiny_memory_model
    folder = tmp_path / "cache"
    model_sequences(mm, fact_recipe(3), SampleStore(DIGEST, folder, shipped=tmp_path / "none"))
    for store, recipe in [
        (SampleStore("another-model", folder, shipped=tmp_path / "none"), fact_recipe(3)),
        (SampleStore(DIGEST, folder, shipped=tmp_path / "none"), fact_recipe(4)),
        (SampleStore(DIGEST, folder, shipped=tmp_path / "none"), SampleRecipe(fact_recipe(3).prompts, 3, 7)),
    ]:
        assert store.sequences(recipe, len(mm.tokenizer)) is None


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda t, m: (t | {"ids": t["ids"].flip(0).contiguous()}, m), "SHA-256"),
        (lambda t, m: (t | {"lengths": t["lengths"] + 1}, m), "do not split"),
        (lambda t, m: (t, m | {"key": "0" * 24}), "another model or recipe"),
        (lambda t, m: ({"ids": t["ids"]}, m), "one-dimensional"),
        (lambda t, m: (t | {"lengths": t["lengths"][1:].contiguous()}, m), "holds 2 sequences, the recipe 3"),
    ],
)
def test_a_damaged_kept_file_is_named_and_the_text_sampled_again(tiny_memory_model, tmp_path, damage, reason):
    mm = tiny_memory_model
    store = SampleStore(DIGEST, tmp_path, shipped=tmp_path / "none")
    recipe = fact_recipe(3)
    sampled = model_sequences(mm, recipe, store)
    path = store.path(recipe, tmp_path)
    with safe_open(str(path), framework="pt") as kept:
        metadata = kept.metadata()
    tensors, metadata = damage(load_file(str(path)), metadata)
    save_file(tensors, str(path), metadata=metadata)

    with structlog.testing.capture_logs() as logs:
        again = model_sequences(mm, recipe, store)
    rejected = _events(logs, "sampled_text_rejected")
    assert rejected and rejected[0]["file"] == str(path) and reason in rejected[0]["reason"]
    assert again == sampled, "sampled again, deterministically"
    assert store.sequences(recipe, len(mm.tokenizer)) == sampled, "and kept again, whole"


def test_an_unreadable_kept_file_is_sampled_again(tiny_memory_model, tmp_path):
    mm = tiny_memory_model
    store = SampleStore(DIGEST, tmp_path, shipped=tmp_path / "none")
    recipe = fact_recipe(2)
    store.path(recipe, tmp_path).write_bytes(b"not a safetensors file")
    with structlog.testing.capture_logs() as logs:
        sequences = model_sequences(mm, recipe, store)
    assert len(sequences) == 2 and _events(logs, "sampled_text_rejected")


def test_shipped_text_is_read_but_never_written(tiny_memory_model, tmp_path):
    mm = tiny_memory_model
    recipe = fact_recipe(2)
    SampleStore(DIGEST, tmp_path / "release", shipped=tmp_path / "none").keep(recipe, [[1, 2, 3], [4, 5]])
    store = SampleStore(DIGEST, None, shipped=tmp_path / "release")
    assert model_sequences(mm, recipe, store) == [[1, 2, 3], [4, 5]]
    store.keep(recipe, [[9]])
    assert model_sequences(mm, recipe, store) == [[1, 2, 3], [4, 5]]


def test_a_model_is_named_by_its_content_not_its_path(tmp_path):
    first = tmp_path / "a" / "model.gguf"
    first.parent.mkdir()
    first.write_bytes(b"GGUF" + bytes(range(200)))
    moved = tmp_path / "b.gguf"
    shutil.copy(first, moved)
    assert ModelSource("gguf", first).digest == ModelSource("gguf", moved).digest
    moved.write_bytes(b"GGUF" + bytes(range(199)) + b"\x00")
    assert ModelSource("gguf", first).digest != ModelSource("gguf", moved).digest
