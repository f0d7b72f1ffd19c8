"""The state on disk holds what was learned, not the memory's slot count; a state of the dense format
an earlier smfd wrote is converted once, exactly; stored rows that disagree with their slot index
are never loaded wrongly."""

from __future__ import annotations

import json

import pytest
import torch
from engine_settings import changed, train_section
from safetensors.torch import load_file, save_file
from test_checkpoint import commit_versions

from smfd.errors import SmfdError
from smfd.learn.heal import compute_background
from smfd.learn.updater import SparseUpdater
from smfd.store import upgrade
from smfd.store.checkpoint import CheckpointStore
from smfd.store.integrity import file_digest
from smfd.store.patches import load_patches


def folder_bytes(folder) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = torch.tensor([tokenizer.encode("The harbour bridge was painted bright orange by Zelda Quint.")])
    with torch.no_grad():
        return model.model(input_ids=ids).logits


@pytest.fixture
def learned_state(tmp_path, tiny_memory_model, background, text_batches, snapshot_values):
    """A state with three committed updates (two patches kept, one folded into the base), and the values
    at each version."""
    store = CheckpointStore(tmp_path / "checkpoint", keep=2)
    store.initialise(tiny_memory_model, background)
    updater = SparseUpdater(
        tiny_memory_model.model, tiny_memory_model.memories, background, train_section(selection="kl", top_t=12)
    )
    saved = commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 3)
    return store, saved


def test_state_size_follows_rows_trained_not_the_slot_count(
    tmp_path, make_memory_model, memory_config, background_sequences, text_batches, snapshot_values
):
    sizes = {}
    for n_keys in (16, 64):
        model = make_memory_model(changed(memory_config, n_keys=n_keys))
        background = compute_background(model.model, model.memories, background_sequences)
        store = CheckpointStore(tmp_path / f"keys{n_keys}", keep=5)
        store.initialise(model, background)
        empty = folder_bytes(store.folder)
        updater = SparseUpdater(model.model, model.memories, background, train_section(selection="kl", top_t=12))
        commit_versions(store, model, updater, text_batches, snapshot_values, 2)
        patch_rows = sum(p.n_rows for f in store.patch_dir.iterdir() for p in load_patches(f)[0])
        held = sum(m.values.n_rows for m in model.memories)
        grown = folder_bytes(store.folder) - empty
        row_bytes = 32 * 4 + 8  # float32 values and the slot id
        # the cache holds each row once; every patch holds its rows before and after the update
        assert held * 32 * 4 <= grown <= (held + 2 * patch_rows) * row_bytes + 16_384, (n_keys, held, grown)
        sizes[n_keys] = empty

    dense_table = {n_keys: n_keys**2 * 32 * 4 for n_keys in sizes}
    assert sizes[64] < dense_table[64] / 3, "no dense snapshot of zero rows"
    assert sizes[64] - sizes[16] < (dense_table[64] - dense_table[16]) / 4, "more slots cost only their statistics"


def densify(store: CheckpointStore, model) -> None:
    """Rewrite a state as the dense format 2 wrote it: every value row of every slot, zero or not, in the
    base and in a value cache of the current version (`model`'s values)."""
    base = load_file(str(store.folder / "base.safetensors"))
    for key in [k for k in base if k.endswith(".values.slot_ids")]:
        layer = key.split(".")[0]
        ids, rows = base.pop(key), base.pop(f"{layer}.values.rows")
        base[f"{layer}.values"] = torch.zeros(16 * 16, rows.shape[1]).index_copy_(0, ids, rows)
    save_file(base, str(store.folder / "base.safetensors"))
    cache = {f"{layer}.values": table.dense() for layer, table in model.values().items()}
    save_file(cache, str(store.folder / "current.safetensors"), metadata={"version": str(store.version)})
    manifest = json.loads(store.manifest_path.read_text())
    manifest["format"] = 2
    for name in ("base.safetensors", "current.safetensors"):
        manifest["files"][name] = file_digest(store.folder / name)
    store.manifest_path.write_text(json.dumps(manifest))


def test_a_dense_state_is_refused_by_readers_and_converted_once_exactly_by_its_owner(
    learned_state, make_memory_model, tokenizer, monkeypatch
):
    store, _ = learned_state
    reference = make_memory_model()
    store.load_into(reference)
    expected = logits_of(reference, tokenizer)
    densify(store, reference)
    with pytest.raises(SmfdError, match="dense value tables .* converts the state"):
        store.load_into(make_memory_model(), repair=False)

    real_write = upgrade.atomic_write_json

    def crash_at_the_manifest(path, data):
        if path.name == "manifest.json":
            raise OSError("power cut")
        real_write(path, data)

    monkeypatch.setattr(upgrade, "atomic_write_json", crash_at_the_manifest)
    with pytest.raises(OSError, match="power cut"):  # the sparse base is in place, the manifest still says 2
        upgrade.upgrade_dense_state(store.folder)
    monkeypatch.setattr(upgrade, "atomic_write_json", real_write)

    assert upgrade.upgrade_dense_state(store.folder) is True
    assert upgrade.upgrade_dense_state(store.folder) is False, "converted once"
    converted = make_memory_model()
    assert store.load_into(converted)[0] == 3
    assert torch.equal(logits_of(converted, tokenizer), expected)
    assert not (store.folder / upgrade.PENDING).exists()
    assert not (store.folder / "current.safetensors").exists(), "the dense value cache is gone"


def test_a_patch_whose_rows_disagree_with_its_slot_ids_is_not_used_and_the_version_before_it_loads(
    learned_state, make_memory_model, snapshot_values, bit_identical
):
    store, saved = learned_state
    patch = store.patch_dir / "00000003.safetensors"
    tensors = load_file(str(patch))
    tensors["1.after"] = tensors["1.after"][:-1].contiguous()  # one row short of its slot ids
    save_file(tensors, str(patch), metadata={"smfd": json.dumps({"version": 3})})
    manifest = store.manifest()
    manifest["files"]["patches/00000003.safetensors"] = file_digest(patch)  # the digest agrees: only the rows are wrong
    store.manifest_path.write_text(json.dumps(manifest))

    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 2
    assert bit_identical(snapshot_values(fresh), saved[2])
    assert store.version == 2, "the owner's manifest falls back with it"


def test_a_base_whose_rows_disagree_with_its_index_is_refused_naming_the_file(learned_state, make_memory_model):
    store, _ = learned_state
    base = store.folder / "base.safetensors"
    tensors = load_file(str(base))
    tensors["1.values.slot_ids"] = tensors["1.values.slot_ids"] + 10_000  # slots the memory does not have
    save_file(tensors, str(base))
    manifest = store.manifest()
    manifest["files"]["base.safetensors"] = file_digest(base)
    store.manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(SmfdError, match=r"base\.safetensors: memory rows and their slot index disagree"):
        store.load_into(make_memory_model())
