"""Loading the base model: bad paths fail with a message naming the path, and a Hugging Face
folder loads frozen, in eval mode, with the weights it was saved with."""

from __future__ import annotations

import re

import pytest
import torch

from smfd.config import MemorySection
from smfd.errors import SmfdError
from smfd.model.loading import load_base_model, resolve_model_source
from smfd.model.memory_model import MemoryModel


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SmfdError, match=re.escape(f"model path {missing} does not exist")):
        resolve_model_source(missing)


def test_folder_without_config_json_is_named(tmp_path):
    folder = tmp_path / "empty-folder"
    folder.mkdir()
    with pytest.raises(SmfdError, match=re.escape(f"model folder {folder} has no config.json")):
        resolve_model_source(folder)


def test_file_that_is_not_gguf_is_named(tmp_path):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\x80\x04not a model")
    with pytest.raises(
        SmfdError, match=re.escape(f"model path {weights} is neither a .gguf file nor a Hugging Face model folder")
    ):
        resolve_model_source(weights)
    with pytest.raises(SmfdError, match="model.bin"):
        load_base_model(weights)


def test_gguf_suffix_and_hf_folder_are_recognised(tmp_path):
    gguf = tmp_path / "Model.Q4.GGUF"
    gguf.write_bytes(b"GGUF")
    source = resolve_model_source(gguf)
    assert (source.kind, source.path, source.display_name) == ("gguf", gguf.resolve(), "Model.Q4.GGUF")

    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert resolve_model_source(str(folder)).kind == "hf"


def test_unreadable_hf_folder_raises_smfd_error_naming_it(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SmfdError, match=re.escape(f"cannot load model folder {folder}")):
        load_base_model(folder)


@pytest.fixture
def saved_model(tmp_path, base_model, tokenizer):
    folder = tmp_path / "tiny-llama"
    base_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, base_model


def test_hf_folder_loads_frozen_in_eval_mode_with_the_saved_weights(saved_model, tokenizer):
    folder, original = saved_model

    model, loaded_tokenizer, source = load_base_model(folder)

    assert (source.kind, source.path, source.display_name) == ("hf", folder.resolve(), "tiny-llama")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32
    original_state = original.state_dict()
    assert all(torch.equal(t, original_state[name]) for name, t in model.state_dict().items())
    text = "The harbour bridge spans the bay."
    assert loaded_tokenizer(text).input_ids == tokenizer(text).input_ids
    assert loaded_tokenizer.pad_token_id is not None


def test_memory_model_load_attaches_memory_to_a_saved_folder(saved_model, tokenizer):
    folder, original = saved_model
    ids = torch.tensor([tokenizer("The river rises in the hills.", add_special_tokens=False).input_ids])

    loaded = MemoryModel.load(folder, MemorySection(layers=(2,), n_keys=16, heads=2, k=4, key_dim=16), device="cpu")

    assert [m.layer_index for m in loaded.memories] == [2]
    assert loaded.device == torch.device("cpu")
    assert loaded.describe()["model"] == "tiny-llama"
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)


def test_requesting_cuda_without_a_device_is_refused(saved_model):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SmfdError, match="no CUDA device is available"):
        MemoryModel.load(saved_model[0], MemorySection(layers=(0,), n_keys=16, heads=2, k=4, key_dim=16), device="cuda")
