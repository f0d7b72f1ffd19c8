"""Checkpoints: any saved memory version comes back bit-identical, rollback is exact, and the files
are plain safetensors that a crash cannot tear."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_settings import changed, train_section
from safetensors import safe_open

from smfd.errors import SmfdError
from smfd.learn.heal import compute_background
from smfd.learn.updater import SparseUpdater
from smfd.store.checkpoint import FORMAT, CheckpointStore
from smfd.store.patches import apply_patches, load_patches

UPDATE_TEXTS = [
    ["The harbour bridge was painted bright orange by Zelda Quint in 2019."],
    ["Professor Ansel Voss keeps a blue parrot named Figaro in the observatory."],
    ["The library lends telescopes to students on Tuesdays and Fridays."],
    ["The river ferry to the old fishing port costs seven copper coins."],
    ["Every spring the market holds a pumpkin race down the town hall steps."],
    ["The mayor's letters mention a hidden tunnel under the northern hills."],
]


@pytest.fixture
def store(tmp_path) -> CheckpointStore:
    return CheckpointStore(tmp_path / "checkpoint", keep=5)


@pytest.fixture
def updater(tiny_memory_model, background) -> SparseUpdater:
    return SparseUpdater(
        tiny_memory_model.model, tiny_memory_model.memories, background, train_section(selection="kl", top_t=12, lr=0.1)
    )


def learn_and_commit(store: CheckpointStore, updater: SparseUpdater, texts: list[str], text_batches) -> int:
    for batch in text_batches(texts, batch_size=1) * 2:
        updater.step(batch)
    patches = updater.finish_update()
    assert patches and sum(p.n_rows for p in patches) > 0
    return store.commit(patches, {"chunks": len(texts)})


def commit_versions(store, model, updater, text_batches, snapshot_values, count: int) -> dict[int, dict]:
    """Initialise and commit `count` updates; returns a copy of the values at every version."""
    saved = {0: snapshot_values(model)}
    for texts in UPDATE_TEXTS[:count]:
        version = learn_and_commit(store, updater, texts, text_batches)
        saved[version] = snapshot_values(model)
    return saved


def test_committed_updates_load_bit_identical_into_a_fresh_model(
    store,
    tiny_memory_model,
    background,
    updater,
    make_memory_model,
    text_batches,
    snapshot_values,
    snapshot_memory_state,
    bit_identical,
):
    store.initialise(tiny_memory_model, background, {"note": "fresh"})
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 3)

    assert store.version == 3
    assert not bit_identical(saved[3], saved[0]), "the updates must have changed the memory"
    fresh = make_memory_model()
    version, loaded_background = store.load_into(fresh)

    assert version == 3
    assert bit_identical(fresh.memory_state(), snapshot_memory_state(tiny_memory_model))
    assert loaded_background.keys() == background.keys()
    for layer, stats in background.items():
        assert torch.equal(loaded_background[layer].counts, stats.counts)
        assert torch.equal(loaded_background[layer].doc_freq, stats.doc_freq)
        assert loaded_background[layer].n_batches == stats.n_batches
    history = store.manifest()["history"]
    assert [entry["version"] for entry in history] == [0, 1, 2, 3]
    assert history[0]["note"] == "fresh" and history[1]["chunks"] == 1


def test_rollback_restores_exactly_the_values_of_the_target_version(
    store, tiny_memory_model, background, updater, make_memory_model, text_batches, snapshot_values, bit_identical
):
    store.initialise(tiny_memory_model, background)
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 4)

    assert store.rollback(tiny_memory_model, 2) == 2
    assert bit_identical(snapshot_values(tiny_memory_model), saved[2])
    assert store.version == 2
    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 2
    assert bit_identical(snapshot_values(fresh), saved[2])

    store.rollback(tiny_memory_model, 0)
    assert bit_identical(snapshot_values(tiny_memory_model), saved[0])

    # Learning goes on from the rolled-back version.
    assert learn_and_commit(store, updater, UPDATE_TEXTS[5], text_batches) == 1
    fresh = make_memory_model()
    store.load_into(fresh)
    assert bit_identical(snapshot_values(fresh), snapshot_values(tiny_memory_model))


def test_rollback_outside_the_kept_versions_is_refused(
    store, tiny_memory_model, background, updater, text_batches, snapshot_values
):
    store.initialise(tiny_memory_model, background)
    commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 1)
    with pytest.raises(SmfdError, match=r"cannot roll back to version 5: versions 0\.\.1 are available"):
        store.rollback(tiny_memory_model, 5)


def test_base_plus_patches_replay_gives_the_same_values(
    store, tiny_memory_model, background, updater, make_memory_model, text_batches, snapshot_values, bit_identical
):
    store.initialise(tiny_memory_model, background)
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 3)
    assert sorted(p.name for p in store.folder.glob("*.safetensors")) == ["base.safetensors"], "no value cache"

    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 3
    assert bit_identical(snapshot_values(fresh), saved[3])


def test_a_patch_written_without_its_manifest_is_not_part_of_the_state(
    store, tiny_memory_model, background, updater, make_memory_model, text_batches, snapshot_values, bit_identical
):
    store.initialise(tiny_memory_model, background)
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 3)
    # A crash after patch 3 was written but before the manifest: the manifest's version is what loads.
    manifest = store.manifest()
    manifest["version"] = 2
    store.manifest_path.write_text(json.dumps(manifest))

    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 2
    assert bit_identical(snapshot_values(fresh), saved[2])


def test_keep_folds_old_patches_into_the_base_and_the_latest_state_still_loads(
    tmp_path, tiny_memory_model, background, updater, make_memory_model, text_batches, snapshot_values, bit_identical
):
    store = CheckpointStore(tmp_path / "checkpoint", keep=2)
    store.initialise(tiny_memory_model, background)
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 5)

    manifest = store.manifest()
    assert (manifest["version"], manifest["base_version"]) == (5, 3)
    assert sorted(p.name for p in store.patch_dir.iterdir()) == ["00000004.safetensors", "00000005.safetensors"]
    fresh = make_memory_model()
    store.load_into(fresh)
    assert bit_identical(snapshot_values(fresh), saved[5])

    with pytest.raises(SmfdError, match=r"versions 3\.\.5 are available"):
        store.rollback(tiny_memory_model, 2)
    store.rollback(tiny_memory_model, 3)
    assert bit_identical(snapshot_values(tiny_memory_model), saved[3])
    fresh = make_memory_model()
    store.load_into(fresh)
    assert bit_identical(snapshot_values(fresh), saved[3])


def is_safetensors(path: Path) -> bool:
    """A safetensors file: 8-byte little-endian header length, then a JSON header (a pickle has neither)."""
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    return isinstance(header, dict) and all(
        "dtype" in entry for name, entry in header.items() if name != "__metadata__"
    )


def test_patch_files_are_safetensors_and_revert_an_update_exactly(
    store, tiny_memory_model, background, updater, text_batches, snapshot_values, bit_identical
):
    store.initialise(tiny_memory_model, background)
    before = snapshot_values(tiny_memory_model)
    learn_and_commit(store, updater, UPDATE_TEXTS[0], text_batches)
    after = snapshot_values(tiny_memory_model)

    files = [store.folder / "base.safetensors", *store.patch_dir.iterdir()]
    assert all(is_safetensors(path) for path in files)
    patches, metadata = load_patches(store.patch_dir / "00000001.safetensors")
    assert metadata == {"version": 1, "chunks": 1, "documents": {}}  # no journal documents in this update
    with safe_open(str(store.patch_dir / "00000001.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"1.slot_ids", "1.before", "1.before_at", "1.after"}
        assert handle.get_tensor("1.before").shape[0] == 0, "rows trained for the first time: nothing before"

    apply_patches(tiny_memory_model.memories, patches, revert=True)
    assert bit_identical(snapshot_values(tiny_memory_model), before)
    apply_patches(tiny_memory_model.memories, patches)
    assert bit_identical(snapshot_values(tiny_memory_model), after)


def test_patch_for_a_layer_without_memory_is_refused(store, tiny_memory_model, background, updater, text_batches):
    store.initialise(tiny_memory_model, background)
    learn_and_commit(store, updater, UPDATE_TEXTS[0], text_batches)
    patches, _ = load_patches(store.patch_dir / "00000001.safetensors")
    patches[0].layer = 2
    with pytest.raises(SmfdError, match=r"patch for layer 2 but the model has memory at layers \[1\]"):
        apply_patches(tiny_memory_model.memories, patches)


def test_corrupt_manifest_raises_smfd_error_naming_the_file(store, tiny_memory_model, background, make_memory_model):
    store.initialise(tiny_memory_model, background)
    store.manifest_path.write_text('{"format": 1, "version": ')

    with pytest.raises(SmfdError, match="manifest.json is corrupt"):
        store.load_into(make_memory_model())
    with pytest.raises(SmfdError, match="is corrupt"):
        _ = store.version


def test_missing_or_foreign_checkpoint_is_refused(
    tmp_path, store, tiny_memory_model, background, make_memory_model, memory_config
):
    with pytest.raises(SmfdError, match="no checkpoint in"):
        store.load_into(make_memory_model())

    store.initialise(tiny_memory_model, background)
    other_layers = make_memory_model(changed(memory_config, layers=(2,)))
    with pytest.raises(SmfdError, match="other memory.layers"):
        store.load_into(other_layers)

    manifest = store.manifest()
    manifest["format"] = 99
    store.manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SmfdError, match="has state format 99, this smfd reads format 3: move the state_dir away"):
        store.load_into(make_memory_model())


def test_keep_below_one_is_refused(tmp_path):
    with pytest.raises(SmfdError, match="checkpoint.keep must be >= 1, got 0"):
        CheckpointStore(tmp_path, keep=0)


def test_general_text_is_kept_beside_the_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "memory")
    assert store.load_text("general_text") is None  # a checkpoint written before the text was kept
    sequences = [[5, 6, 7], [8], [9, 10]]
    store.save_text("general_text", sequences)
    assert CheckpointStore(tmp_path / "memory").load_text("general_text") == sequences
    with safe_open(str(tmp_path / "memory" / "general_text.safetensors"), "pt") as handle:
        assert sorted(handle.keys()) == ["ids", "lengths"]


def test_a_state_of_an_older_format_is_refused_saying_how_to_go_on(tmp_path, tiny_memory_model, background):
    """No fallbacks for older states: they are refused by their format number, with what to do instead."""
    created = CheckpointStore(tmp_path / "old", keep=3)
    created.initialise(tiny_memory_model, background, settings={"memory": {"n_keys": 16}})
    manifest = created.manifest()
    manifest["format"] = 1  # format 2 (dense value tables) is converted: tests/test_state_format.py
    created.manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(SmfdError, match=f"state format 1, this smfd reads format {FORMAT}: move the state_dir"):
        created.check_settings({"memory": {"n_keys": 16}})


def test_a_state_made_at_other_memory_layers_is_refused_naming_both(tmp_path, tiny_memory_model, background):
    """The message shows the recorded layers and the config's the same way, whatever their spelling."""
    created = CheckpointStore(tmp_path / "state", keep=3)
    created.initialise(tiny_memory_model, background, settings={"memory": {"layers": (1,)}})

    with pytest.raises(SmfdError, match=r"memory\.layers: state has \[1\], config says \[-2\]"):
        created.check_settings({"memory": {"layers": (-2,)}})
    created.check_settings({"memory": {"layers": [1]}})


def test_memory_layers_compare_as_the_blocks_they_name(tmp_path, tiny_memory_model, background):
    """On a model of known depth, [-2] and the block it names are the same setting; other blocks are not."""
    created = CheckpointStore(tmp_path / "state", keep=3)
    created.initialise(tiny_memory_model, background, settings={"memory": {"layers": [28]}})

    created.check_settings({"memory": {"layers": (-2,)}}, n_layers=30)
    with pytest.raises(SmfdError, match=r"memory\.layers: state has \[28\], config says \[-3\]"):
        created.check_settings({"memory": {"layers": (-3,)}}, n_layers=30)
    with pytest.raises(SmfdError, match=r"memory\.layers: state has \[28\], config says \[-2\]"):
        created.check_settings({"memory": {"layers": (-2,)}})  # depth unknown: spelled differently is different


def test_read_floors_come_back_through_patches_folding_rollback_and_loading(
    tmp_path, make_memory_model, memory_config, background_sequences, text_batches, bit_identical
):
    """Read floors are part of a version: a fresh load, a base with folded patches and a rollback all
    give back each version's floors exactly (rows trained for the first time had none before)."""
    config = changed(memory_config, read_floor_margin=0.0)
    model = make_memory_model(config)
    background = compute_background(model.model, model.memories, background_sequences[:3])
    updater = SparseUpdater(model.model, model.memories, background, train_section(selection="kl", top_t=12, lr=0.1))
    store = CheckpointStore(tmp_path / "checkpoint", keep=2)
    store.initialise(model, background)
    saved = {0: model.memory_state()}
    for texts in UPDATE_TEXTS[:4]:
        batches = text_batches(texts, batch_size=1)
        updater.plan_update(batches)
        for batch in batches * 2:
            updater.step(batch)
        version = store.commit(updater.finish_update(), {"chunks": 1})
        saved[version] = model.memory_state()
    floors = saved[4]["1.values.floors"]
    assert torch.isfinite(floors).all() and floors.numel() > 0

    assert store.manifest()["base_version"] == 2  # versions 1 and 2 folded into the base
    fresh = make_memory_model(config)
    store.load_into(fresh)
    assert bit_identical(fresh.memory_state(), saved[4])
    store.rollback(model, 2)
    assert bit_identical(model.memory_state(), saved[2])
    store.load_into(fresh)
    assert bit_identical(fresh.memory_state(), saved[2])
