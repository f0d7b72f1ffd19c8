"""The guard and the memory budget: a harmful update is reverted exactly; impossible budgets are refused."""

from __future__ import annotations

import pytest
import torch
from test_learner import SETTINGS, make_learner, submit_all

from smfd.config import GuardSection, ProbesSection
from smfd.errors import SmfdError
from smfd.guard.retention import RetentionProbes
from smfd.guard.verdict import Guard, RollbackReason, judge
from smfd.learn.budget import MemoryBudget
from smfd.learn.learner import Learner
from smfd.model.scoring import drift_kl_sum, next_token_logprobs

GEN = torch.Generator().manual_seed(7)


def guard_for(probes: RetentionProbes, section: GuardSection):
    return Guard(probes, section).check


def test_guard_reverts_a_harmful_update_bit_exactly(
    tmp_path, tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    probes.establish_baseline()
    before = snapshot_values(tiny_memory_model)
    harmful = SETTINGS.with_train(top_t=64, lr=500.0, passes=4)
    doc_ids = submit_all(journal, tmp_path)

    outcome = make_learner(tiny_memory_model, background, store, journal, harmful).update(
        # The random tiny model's next-token distributions are nearly flat, so drift stays small in
        # absolute terms (about 0.013 here, against 0 for the gentle update below): the threshold is scaled to it.
        guard=guard_for(probes, GuardSection(max_nll_increase_ratio=0.02, max_drift_kl=0.005))
    )

    assert not outcome.accepted and outcome.reason in ("nll", "drift", "accuracy")
    assert bit_identical(snapshot_values(tiny_memory_model), before)
    assert store.version == 0
    last = journal.last_update()
    assert last is not None and not last.accepted and "after" in last.measures
    assert {c.state for d in doc_ids for c in journal.chunks_for(d)} == {"rejected"}
    assert sorted(outcome.documents_settled) == [("watch", "rejected")] * len(doc_ids)  # counted as rejected, not done


def test_guard_accepts_a_gentle_update(tmp_path, tiny_memory_model, background, store, journal):
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    probes.establish_baseline()
    gentle = SETTINGS.with_train(top_t=4, lr=1e-4, passes=1)
    submit_all(journal, tmp_path)

    outcome = make_learner(tiny_memory_model, background, store, journal, gentle).update(
        guard=guard_for(probes, GuardSection())
    )

    assert outcome.accepted and store.version == 1


def test_judge_names_the_measure_that_failed():
    before = {"facts": {"accuracy": 0.9, "nll": 2.0}, "drift": {"kl": 0.01}}
    section = GuardSection(max_accuracy_drop=0.02, max_nll_increase_ratio=0.02, max_drift_kl=0.05)
    assert judge(before, {"facts": {"accuracy": 0.85, "nll": 2.0}}, section) is RollbackReason.ACCURACY
    assert judge({"heldout": {"nll": 2.0}}, {"heldout": {"nll": 2.1}}, section) is RollbackReason.NLL
    assert judge(before, {"drift": {"kl": 0.07}}, section) is RollbackReason.DRIFT
    assert judge(before, {"facts": {"accuracy": 0.89, "nll": 2.03}, "drift": {"kl": 0.05}}, section) is None


def test_judge_takes_a_fact_suites_accuracy_over_its_answer_nll():
    section = GuardSection(max_accuracy_drop=0.02, max_nll_increase_ratio=0.02)
    before = {"facts": {"accuracy": 1.0, "nll": 0.60}}
    # A 15% rise of a small answer NLL with every answer still right is not a loss of the facts.
    assert judge(before, {"facts": {"accuracy": 1.0, "nll": 0.69}}, section) is None
    assert judge(before, {"facts": {"accuracy": 0.875, "nll": 0.61}}, section) is RollbackReason.ACCURACY


def test_a_budget_that_cannot_fit_one_sequence_is_a_clear_error(tiny_memory_model, background, store, journal):
    learner = Learner(
        tiny_memory_model,
        background,
        store,
        journal,
        SETTINGS,
        MemoryBudget(torch.device("cpu"), ram_mb=1, vram_mb=None),
    )
    with pytest.raises(SmfdError, match="budget of 1 MiB"):
        learner.plan_batch_size()


def test_a_generous_budget_keeps_the_configured_batch_and_leaves_memory_untouched(
    tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    before = snapshot_values(tiny_memory_model)
    learner = Learner(
        tiny_memory_model,
        background,
        store,
        journal,
        SETTINGS,
        MemoryBudget(torch.device("cpu"), ram_mb=64 * 1024, vram_mb=None),
    )
    assert learner.plan_batch_size() == SETTINGS.train.batch_size
    assert bit_identical(snapshot_values(tiny_memory_model), before)  # the measured step is undone


def test_the_budget_keeps_room_for_the_prefix_cache():
    """Memory an update holds beside its steps is taken off the budget before any batch is planned."""
    from smfd.learn.budget import MIB, resident_bytes

    budget = MemoryBudget(torch.device("cpu"), ram_mb=resident_bytes() // MIB + 100, vram_mb=None)
    assert budget.plan_batch_size(4, lambda n: None, reserved_bytes=0) == 4
    with pytest.raises(SmfdError, match="reserved for the prefix cache"):
        budget.plan_batch_size(4, lambda n: None, reserved_bytes=200 * MIB)


def test_a_reload_that_raises_the_batch_size_plans_it_again(tiny_memory_model, background, store, journal):
    learner = Learner(
        tiny_memory_model,
        background,
        store,
        journal,
        SETTINGS,
        MemoryBudget(torch.device("cpu"), ram_mb=64 * 1024, vram_mb=None),
    )
    learner.plan_batch_size()
    learner.reconfigure(SETTINGS.with_train(batch_size=SETTINGS.train.batch_size + 4))
    assert learner.batch_size == SETTINGS.train.batch_size + 4


def test_a_reload_whose_prefix_cache_does_not_fit_the_budget_keeps_the_old_settings(
    tiny_memory_model, background, store, journal
):
    from smfd.learn.budget import MIB, resident_bytes

    without_cache = SETTINGS.with_train(prefix_cache_mb=0)
    learner = Learner(
        tiny_memory_model,
        background,
        store,
        journal,
        without_cache,
        MemoryBudget(torch.device("cpu"), ram_mb=resident_bytes() // MIB + 100, vram_mb=None),
    )
    planned, updater = learner.plan_batch_size(), learner.updater
    huge_cache = SETTINGS.with_train(prefix_cache_mb=4096)
    with pytest.raises(SmfdError, match="reserved for the prefix cache"):
        learner.reconfigure(huge_cache)
    assert (learner.settings, learner.updater, learner.batch_size) == (without_cache, updater, planned)


def test_batch_planning_works_with_the_surprise_weighted_rule(
    tiny_memory_model, background, store, journal, snapshot_values, bit_identical
):
    settings = SETTINGS.with_train(selection="surprise-kl")
    before = snapshot_values(tiny_memory_model)
    learner = Learner(
        tiny_memory_model,
        background,
        store,
        journal,
        settings,
        MemoryBudget(torch.device("cpu"), ram_mb=64 * 1024, vram_mb=None),
    )
    assert learner.plan_batch_size() == settings.train.batch_size
    assert bit_identical(snapshot_values(tiny_memory_model), before)  # the measured step is undone


def test_fast_probes_score_the_known_answers_like_the_full_run(tmp_path, tiny_memory_model):
    """The post-update check is cheap (one pass per item, no greedy decoding, no wrong endings),
    yet measures the same thing as the full run: the known answer's NLL per token."""
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=1000), tmp_path / "state")
    probes.establish_baseline()
    fast, full = probes.measure(fast=True), probes.measure(fast=False)
    tracked = [s.name for s in probes.suites if s.kind != "heldout" and s.tracked]
    assert tracked, "the tiny model should get some shipped items right by chance"
    for name in tracked:
        assert set(fast[name]) <= {"nll", "accuracy"}
        assert fast[name]["nll"] == pytest.approx(full[name]["nll"], rel=1e-4)


def test_recall_is_reported_overall_and_by_probe_kind(tmp_path, tiny_memory_model):
    """A user compares verbatim with reworded recall on the dashboard: each kind is scored on its own."""
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    items = [
        {"prompt": "The harbour bridge was painted", "target": "orange", "kind": "verbatim"},
        {"prompt": "The colour of the bridge is", "target": "orange", "kind": "reworded"},
        {"prompt": "The paint came from a", "target": "factory", "kind": "reworded"},
    ]
    assert probes.add_recall(items) == 3
    measured = probes.measure_recall()
    assert measured is not None and measured["items"] == 3
    assert set(measured) >= {"accuracy", "accuracy.verbatim", "accuracy.reworded"}
    hits = {kind: measured[f"accuracy.{kind}"] for kind in ("verbatim", "reworded")}
    assert measured["accuracy"] == (hits["verbatim"] + 2 * hits["reworded"]) / 3


def test_damaged_probe_files_are_rebuilt_or_skipped_not_raised(tmp_path, tiny_memory_model):
    """The base results are derived from the frozen base: a damaged cache is scored again. A damaged
    recall line is skipped; the intact ones are still measured."""
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    base = probes.establish_baseline()
    probes.state_file.write_bytes(b'{"tracked": {"commonsense": [\x00\xff garbage')
    again = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    assert again.establish_baseline() == base, "the same frozen base scores the same"

    probes.add_recall([{"prompt": "The harbour bridge was painted", "target": "orange", "kind": "verbatim"}])
    with open(probes.recall_file, "a") as recall:
        recall.write('{"prompt": "cut sh\n')
    measured = probes.measure_recall()
    assert measured is not None and measured["items"] == 1


def test_drift_is_the_kl_from_the_base_on_the_drift_prompts(tmp_path, tiny_memory_model):
    """Zero while the memory is empty; after a row is written, the mean per-position KL(base || now) over every
    drift prompt (the base's distributions are computed beside the current ones, not kept)."""
    probes = RetentionProbes(tiny_memory_model, ProbesSection(fast_subset=8), tmp_path / "state")
    probes.establish_baseline()
    assert probes.measure(fast=False)["drift"]["kl"] == pytest.approx(0.0, abs=1e-9)

    memory = tiny_memory_model.memories[0]
    everywhere = torch.arange(memory.config.n_slots)
    memory.values.write(everywhere, torch.randn(memory.config.n_slots, memory.values.width, generator=GEN) * 5)
    model, windows = tiny_memory_model.model, probes.drift_windows
    with tiny_memory_model.base():
        base = next_token_logprobs(model, windows)
    total, positions = drift_kl_sum(base, next_token_logprobs(model, windows))
    expected = total / positions
    assert expected > 1e-4
    assert probes.measure(fast=False)["drift"]["kl"] == pytest.approx(expected, rel=1e-6)
