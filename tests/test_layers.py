"""The package layout reads as the pipeline: imports flow one way, from the daemon down to shared
types, and no module imports itself back through another. A reader (and a change) can rely on
a stage never reaching up into a later one."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "smfd"
MAX_MODULE_LINES = 400
# Lowest first. A module may import its own layer and the layers below it, never a layer above.
LAYERS = [
    ("__init__", "errors", "durable", "heap", "config", "paths"),  # shared ground: no stage knowledge
    ("text",),  # chunking and restatement
    ("model",),  # loading, memory layers, batch types, slot statistics, scoring
    ("store",),  # checkpoints and patches
    ("ingest",),  # sources, intake, journal, sidecars
    ("guard",),  # retention probes and the verdict the learner acts on
    ("learn",),  # surprise, lesson, selection, update, the learner (which asks the guard)
    ("observe",),  # metrics, HTTP, logs, systemd
    ("serve",),  # the OpenAI-compatible API on the learner's model
    ("daemon",),  # start-up and the loop
    ("bench",),  # the benchmark drives the same stages
    ("cli", "__main__"),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for level, names in enumerate(LAYERS):
        if top in names:
            return level
    raise AssertionError(f"module {module} is in no layer: add its package to LAYERS")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """smfd modules that `path` imports (anywhere in the file, type-checking blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("smfd"):
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("smfd"))
    return found & modules


def _graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imports(p, modules) - {_module_name(p)} for p in paths}


def test_every_import_runs_down_the_pipeline():
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in sorted(targets)
        if _layer(target) > _layer(module)
    ]
    assert upward == [], "imports that run back up:\n" + "\n".join(upward)


def test_no_import_circle():
    graph = _graph()
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if target.startswith(module + "."):
                continue  # a package's __init__ importing its own modules is not a circle
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join([*trail, module, target]))
            if target not in state:
                visit(target, [*trail, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_no_module_outgrows_a_readable_size():
    long = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}, f"modules over {MAX_MODULE_LINES} lines: {long}"
