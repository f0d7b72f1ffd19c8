"""Convert a GGUF file into a plain safetensors model folder, in a process of its own.

transformers dequantizes a GGUF file through a second full copy of the weights, so the conversion
peaks near twice the model's size. Run in a child process (`python -m smfd.model.convert GGUF
TARGET`), that peak is the child's and ends with it: the daemon then loads the converted folder and
holds one copy of the weights for as long as it runs. Nothing crosses the process boundary but two
paths, an exit status and stderr.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from smfd.errors import SmfdError


def _cache_tensor_name_maps() -> None:
    """Build gguf's tensor-name table once per (architecture, depth) instead of once per module.

    transformers asks `gguf.get_tensor_name_map` afresh for every submodule it walks (397 times for
    the embedded model), and each call rebuilds the same read-only table: cached, loading the
    embedded GGUF took 19.8 s instead of 27.1 s on a quiet 2-core CPU. It changes no weight.
    """
    import gguf

    if hasattr(gguf, "get_tensor_name_map") and not hasattr(gguf.get_tensor_name_map, "cache_info"):
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map)


def load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize a GGUF file into a transformers model (about 15 s for 135M parameters)."""
    _cache_tensor_name_maps()
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (ValueError, KeyError, NotImplementedError) as exc:
        raise SmfdError(f"cannot load GGUF file {path}: {exc}") from exc
    return model, tokenizer


def save_plain_copy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a GGUF-loaded model as a plain safetensors folder (the GGUF config refuses save_pretrained).

    The weights are written straight from the model's state dict: no second model is built. A tied
    output head is left out, as transformers saves it, and tied again on load.
    """
    config_dict = model.config.to_dict()
    config_dict.pop("quantization_config", None)
    plain_config = AutoConfig.for_model(**config_dict)
    state = model.state_dict()
    if getattr(plain_config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    plain_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "smfd-source.json").write_text(json.dumps({"converted_from": target.name}))
    tmp.rename(target)


def convert_in_child(gguf: Path, target: Path) -> None:
    """Convert `gguf` into the folder `target` in a child process; its error, if any, names the file."""
    result = subprocess.run(
        [sys.executable, "-m", "smfd.model.convert", str(gguf), str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 or not target.is_dir():
        reason = next((line for line in reversed(result.stderr.splitlines()) if line.strip()), "no output")
        raise SmfdError(f"converting {gguf} to {target} failed (exit status {result.returncode}): {reason}")


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m smfd.model.convert GGUF_FILE TARGET_FOLDER", file=sys.stderr)
        return 2
    gguf, target = Path(argv[0]), Path(argv[1])
    try:
        model, tokenizer = load_gguf(gguf, torch.float32)
        save_plain_copy(model, tokenizer, target)
    except SmfdError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
