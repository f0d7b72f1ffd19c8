"""A new state's prepared memory (calibration, healing, background counts) is kept per model: a second state
of the same model, settings and text loads it instead of computing it, and never loads a wrong one."""

from __future__ import annotations

import pytest
import structlog
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_daemon import write_config

from smfd.config import load_config
from smfd.daemon.runtime import open_runtime
from smfd.learn.prepared import tensors_digest
from smfd.store.checkpoint import CheckpointStore


def _events(logs: list[dict], name: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == name]


def _new_state(tmp_path, tiny_model_dir, name: str, **overrides):
    """A fresh state in `tmp_path/name` sharing one model cache with every other state of the test."""
    folder = tmp_path / name
    folder.mkdir()
    model = {"cache_dir": str(tmp_path / "model-cache")}
    cfg = load_config(write_config(folder, tiny_model_dir, model=model, heal={"steps": 5}, **overrides))
    with structlog.testing.capture_logs() as logs:
        runtime = open_runtime(cfg)
    history = CheckpointStore(cfg.state_dir / "memory").manifest()["history"]
    return runtime, history[0], logs


def _prepared_files(tmp_path) -> list:
    return sorted((tmp_path / "model-cache").glob("prepared-*.safetensors"))


def _same_memory(first, second) -> None:
    for a, b in zip(first.model.memories, second.model.memories, strict=True):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
        assert not b.values.any_trained(), "a prepared memory has no value row: the model is still the base"
    for layer, stats in first.background.items():
        assert torch.equal(stats.counts, second.background[layer].counts)
        assert torch.equal(stats.doc_freq, second.background[layer].doc_freq)
        assert stats.n_batches == second.background[layer].n_batches


def test_a_second_state_loads_the_kept_preparation_and_gets_the_same_memory(tmp_path, tiny_model_dir):
    first, first_meta, _ = _new_state(tmp_path, tiny_model_dir, "a")
    assert first_meta["prepared"] == "computed" and len(_prepared_files(tmp_path)) == 1
    second, second_meta, logs = _new_state(tmp_path, tiny_model_dir, "b")

    assert second_meta["prepared"] == "kept" and _events(logs, "prepared_memory_kept")
    assert second_meta["heal"] == first_meta["heal"], "the healing report travels with the preparation"
    assert second.retain_inputs is None, "the retain set is collected from the text, as on a restart"
    _same_memory(first, second)


@pytest.mark.parametrize(
    "overrides",
    [
        {"heal": {"steps": 6}},
        {"memory": {"read_temperature": 0.5}},
        {"memory": {"background_sequences": 9}},
        {"memory": {"fact_sequences": 5}},
    ],
)
def test_a_preparation_is_not_reused_for_other_settings_or_text(tmp_path, tiny_model_dir, overrides):
    _new_state(tmp_path, tiny_model_dir, "a")
    heal = overrides.pop("heal", {"steps": 5})
    folder = tmp_path / "b"
    folder.mkdir()
    model = {"cache_dir": str(tmp_path / "model-cache")}
    cfg = load_config(write_config(folder, tiny_model_dir, model=model, heal=heal, **overrides))
    open_runtime(cfg)
    assert CheckpointStore(cfg.state_dir / "memory").manifest()["history"][0]["prepared"] == "computed"
    assert len(_prepared_files(tmp_path)) == 2, "each preparation kept under its own key"


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda t, m: (t | {"1.keys": t["1.keys"] + 1e-3}, m), "SHA-256"),
        (lambda t, m: (t, m | {"key": "0" * 24}), "another model, memory or text"),
        (lambda t, m: ({k: v for k, v in t.items() if k != "bg.1.counts"}, m), "no tensor bg.1.counts"),
        (lambda t, m: (t | {"1.query_scale": t["1.query_scale"][:-1].contiguous()}, m), "has shape"),
    ],
)
def test_a_damaged_preparation_is_named_and_computed_again(tmp_path, tiny_model_dir, damage, reason):
    _new_state(tmp_path, tiny_model_dir, "a")
    (path,) = _prepared_files(tmp_path)
    with safe_open(str(path), framework="pt") as kept:
        metadata = kept.metadata()
    tensors, metadata = damage(load_file(str(path)), metadata)
    if reason != "SHA-256":  # every other damage must fail its own check, not the digest's
        metadata = metadata | {"tensors_sha256": tensors_digest(tensors)}
    save_file(tensors, str(path), metadata=metadata)

    second, meta, logs = _new_state(tmp_path, tiny_model_dir, "b")
    rejected = _events(logs, "prepared_memory_rejected")
    assert rejected and rejected[0]["file"] == str(path) and reason in rejected[0]["reason"]
    assert meta["prepared"] == "computed"
    third, meta, _ = _new_state(tmp_path, tiny_model_dir, "c")
    assert meta["prepared"] == "kept", "computed again and kept again, whole"
    _same_memory(second, third)


def test_an_unreadable_preparation_is_computed_again(tmp_path, tiny_model_dir):
    _new_state(tmp_path, tiny_model_dir, "a")
    (path,) = _prepared_files(tmp_path)
    path.write_bytes(b"not a safetensors file")
    _, meta, logs = _new_state(tmp_path, tiny_model_dir, "b")
    assert meta["prepared"] == "computed" and _events(logs, "prepared_memory_rejected")
