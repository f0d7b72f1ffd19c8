"""Damaged state files are never used silently: every file is checked against the digest the
manifest recorded. A damaged or missing patch drops the state back to the version before it, and
a damaged base is refused with one line naming the file. Each case damages a real checkpoint the way a disk or a careless copy would."""

from __future__ import annotations

import pytest
from engine_settings import train_section
from test_checkpoint import commit_versions

from smfd.learn.updater import SparseUpdater
from smfd.store.integrity import DamagedState


def scribble(path, size: int = 4096) -> None:
    """Overwrite up to `size` bytes inside the file's tensor data with garbage; the header stays valid."""
    data = bytearray(path.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    start = data_start + (len(data) - data_start) // 4
    length = min(size, (len(data) - data_start) // 2)
    data[start : start + length] = bytes((i * 37 + 11) % 256 for i in range(length))
    path.write_bytes(bytes(data))


def truncate(path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture
def three_versions(store, tiny_memory_model, background, text_batches, snapshot_values):
    """Versions 0..3 committed (the store keeps 3 patches, none folded yet); the values at each."""
    train = train_section(selection="kl", top_t=12, lr=0.1)
    updater = SparseUpdater(tiny_memory_model.model, tiny_memory_model.memories, background, train)
    return commit_versions(store, tiny_memory_model, updater, text_batches, snapshot_values, 3)


@pytest.mark.parametrize("damage", [scribble, truncate, lambda path: path.unlink()])
def test_a_damaged_newest_patch_falls_back_to_the_version_before_it(
    damage, store, three_versions, make_memory_model, snapshot_values, bit_identical
):
    damage(store.patch_dir / "00000003.safetensors")

    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 2
    assert bit_identical(snapshot_values(fresh), three_versions[2])
    assert store.version == 2 and not (store.patch_dir / "00000003.safetensors").exists()
    assert store.manifest()["history"][-1]["reason"] == "patch 3 damaged"


def test_a_manifest_one_version_ahead_of_its_patches_falls_back(
    store, three_versions, make_memory_model, snapshot_values, bit_identical
):
    (store.patch_dir / "00000002.safetensors").unlink()

    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 1, "versions 2 and 3 need patch 2"
    assert bit_identical(snapshot_values(fresh), three_versions[1])


@pytest.mark.parametrize("damage", [scribble, truncate, lambda path: path.unlink()])
def test_a_damaged_base_with_its_slot_statistics_is_refused_naming_the_file(
    damage, store, three_versions, make_memory_model
):
    base = store.folder / "base.safetensors"
    damage(base)

    with pytest.raises(DamagedState, match="base.safetensors") as raised:
        store.load_into(make_memory_model())
    assert "\n" not in str(raised.value) and "backup" in str(raised.value)


def test_rollback_past_a_damaged_newer_patch_is_exact_and_below_it_is_refused(
    store, three_versions, tiny_memory_model, make_memory_model, snapshot_values, bit_identical
):
    scribble(store.patch_dir / "00000003.safetensors")
    assert store.rollback(tiny_memory_model, 1) == 1  # needs only base and patch 1
    assert bit_identical(snapshot_values(tiny_memory_model), three_versions[1])
    fresh = make_memory_model()
    assert store.load_into(fresh)[0] == 1 and bit_identical(snapshot_values(fresh), three_versions[1])

    scribble(store.patch_dir / "00000001.safetensors")
    with pytest.raises(DamagedState, match="00000001.safetensors"):
        store.rollback(tiny_memory_model, 1)


def test_damaged_statement_text_is_not_used(tmp_path, tiny_memory_model, background):
    from smfd.store.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path / "state", keep=3)
    store.save_text("fact_text", [[1, 2, 3], [4, 5]])  # as the runtime does: the texts, then version 0
    store.initialise(tiny_memory_model, background)
    assert store.load_text("fact_text") == [[1, 2, 3], [4, 5]]

    scribble(store.folder / "fact_text.safetensors", size=4)

    assert store.load_text("fact_text") is None, "damaged statements are left out, never read as other tokens"


def test_the_daemon_refuses_a_damaged_base_in_one_line_and_learns_on_after_a_damaged_patch(
    tmp_path, tiny_model_dir, capsys
):
    import json
    import os
    import time

    from test_daemon import NEW_TEXT, OTHER_TEXT, run_cli, write_config

    config = write_config(tmp_path, tiny_model_dir, train={"max_documents": 1})
    for name, text in (("lighthouse.txt", NEW_TEXT), ("orchard.txt", OTHER_TEXT)):
        (tmp_path / "inbox" / name).write_text(text)
        os.utime(tmp_path / "inbox" / name, (time.time() - 60,) * 2)
    assert run_cli(["--config", str(config), "--once"], capsys)[0] == 0
    memory = tmp_path / "state" / "memory"
    assert json.loads((memory / "manifest.json").read_text())["version"] == 2

    scribble(memory / "patches" / "00000002.safetensors")
    code, _, _ = run_cli(["--config", str(config), "--once"], capsys)
    status = json.loads(run_cli(["status", "--config", str(config), "--json"], capsys)[1])
    assert code == 0 and status["checkpoint_version"] == 1
    assert status["documents"]["done"] == 1 and status["documents"]["rolled_back"] == 1, "the journal follows"

    scribble(memory / "base.safetensors")
    code, out, err = run_cli(["--config", str(config), "--once"], capsys)
    assert code != 0 and "Traceback" not in out + err
    error = err.strip().splitlines()[-1]  # after the JSON log lines: the one line for the operator
    assert error.startswith("smfd: error: state file") and "base.safetensors is damaged" in error


class _CorruptConnection:
    """Stands in for SQLite's connection once a page of the journal file is damaged (the boundary
    this test cannot reach reliably: SQLite may serve a damaged page from its cache for a while)."""

    in_transaction = False

    def execute(self, *args, **kwargs):
        import sqlite3

        raise sqlite3.DatabaseError("database disk image is malformed")

    def close(self) -> None:
        pass


def test_a_journal_damaged_while_running_fails_readyz_and_stops_intake(tmp_path, tiny_model_dir):
    import httpx
    import yaml
    from test_daemon import NEW_TEXT, write_config

    from smfd.daemon.service import Daemon

    config = write_config(tmp_path, tiny_model_dir)
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = Daemon(config)
    daemon.start()
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        daemon.journal._conn = _CorruptConnection()
        (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)

        daemon.poll_sources(settle=False)  # no exception escapes the intake job
        assert daemon.run_update() is None  # nor the learner's

        readyz = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert readyz.status_code == 503 and "journal damaged" in readyz.text
        assert (tmp_path / "inbox" / "lighthouse.txt").exists(), "the file waits in the inbox"
    finally:
        daemon.shutdown()


def test_a_reader_beside_the_daemon_falls_back_in_memory_but_never_writes_the_state(
    store, three_versions, make_memory_model, snapshot_values, bit_identical
):
    scribble(store.patch_dir / "00000003.safetensors")
    manifest_before = store.manifest_path.read_bytes()

    fresh = make_memory_model()
    assert store.load_into(fresh, repair=False)[0] == 2
    assert bit_identical(snapshot_values(fresh), three_versions[2])
    assert store.manifest_path.read_bytes() == manifest_before, "the owner decides; a reader only reads"
    assert (store.patch_dir / "00000003.safetensors").exists()
