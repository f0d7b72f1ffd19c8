"""Each setting is defined once, in the config schema. A component that declares its own default
for a schema key (a dataclass field or a keyword default) can drift from the schema, and then a
user's setting is silently ignored or overridden: this test walks the package and refuses that."""

from __future__ import annotations

import ast
from pathlib import Path

from smfd.config import ChunkingSection, DistillSection, HealSection, MemorySection, SurpriseSection, TrainSection

PACKAGE = Path(__file__).resolve().parents[1] / "smfd"
ENGINE_SECTIONS = (MemorySection, HealSection, TrainSection, DistillSection, ChunkingSection, SurpriseSection)
# Names that are schema keys but mean something else where they appear with a default, and why.
NOT_SETTINGS = {
    ("bench/baselines.py", "lr"): "LoRA's and full finetuning's own AdamW rate (a benchmark baseline, not smfd)",
    ("bench/baselines.py", "passes"): "the baselines' budget comes from the run, like SMF's",
    ("model/scoring.py", "batch_size"): "rows per evaluation forward, not the training batch",
    ("model/batch.py", "seed"): "the shuffle seed of one update's passes",
    ("learn/lesson.py", "seed"): "the query builder's seed for one document",
    ("learn/sampling.py", "batch_size"): "rows per sampling forward when text is drawn from the model",
    ("learn/sampling.py", "seed"): "the sampling seed of that text",
    ("learn/learner.py", "steps"): "an update's count of optimizer steps (UpdateOutcome), not heal.steps",
    ("serve/protocol.py", "max_tokens"): "an API request's own max_tokens (absent: serve.default_max_tokens)",
    ("serve/protocol.py", "seed"): "an API request's sampling seed",
    ("bench/data.py", "background_text"): "the benchmark's background text itself, not the memory.background_text path",
}


def _schema_keys() -> set[str]:
    return {name for section in ENGINE_SECTIONS for name in section.model_fields}


def _own_defaults(path: Path, keys: set[str]) -> list[tuple[str, int]]:
    """(name, line) of every keyword default or class-level default whose name is a schema key."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            arguments = node.args
            positional = arguments.posonlyargs + arguments.args
            with_default = positional[len(positional) - len(arguments.defaults) :]
            with_default += [a for a, d in zip(arguments.kwonlyargs, arguments.kw_defaults) if d is not None]
            found += [(a.arg, a.lineno) for a in with_default if a.arg in keys]
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and item.value is not None and isinstance(item.target, ast.Name):
                    if item.target.id in keys:
                        found.append((item.target.id, item.lineno))
    return found


def test_no_component_declares_its_own_default_for_a_setting():
    keys = _schema_keys()
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("config/"):
            continue
        offenders += [
            f"{relative}:{line} {name}"
            for name, line in _own_defaults(path, keys)
            if (relative, name) not in NOT_SETTINGS
        ]
    assert offenders == [], "defaults for schema keys outside the schema:\n" + "\n".join(offenders)


def test_the_check_sees_a_component_default(tmp_path):
    """The walk is not vacuous: a dataclass field or keyword default named like a setting is found."""
    sample = tmp_path / "component.py"
    sample.write_text("class Settings:\n    top_t: int = 1000\n\ndef update(rows, lr=12.0):\n    return rows\n")
    assert sorted(_own_defaults(sample, _schema_keys())) == [("lr", 4), ("top_t", 2)]
