"""Loading a config file: YAML (duplicate keys refused), environment overrides, relative paths.

Relative paths are resolved against the config file's folder, so the daemon behaves the same
whatever its working directory is (systemd starts it in ``/``).

Environment variables ``SMFD_<SECTION>__<KEY>=value`` override single values; the double
underscore separates nesting levels (a list item by its index: ``SMFD_SOURCES__WATCH__0__RECURSIVE``),
names are case-insensitive, and values are read as YAML scalars (``SMFD_TRAIN__LR=100`` is a number,
``SMFD_METRICS__ENABLED=false`` a bool). An invalid value's error names the variable it came from.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smfd.config.schema import EMBEDDED_MODEL, SmfdConfig
from smfd.errors import ConfigError
from smfd.paths import StatePaths

ENV_PREFIX = "SMFD_"
ENV_NESTING = "__"


# --------------------------------------------------------------------------- YAML


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys, which PyYAML would silently collapse to the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line_of: dict[Any, int] = {}
        for key_node, _value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` legitimately repeats keys that the mapping then overrides
            key = self.construct_object(key_node, deep=True)
            try:
                first_line = first_line_of.get(key)
            except TypeError:
                continue  # unhashable key: the base class reports it
            line = key_node.start_mark.line + 1
            if first_line is not None:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} on line {line} (first defined on line {first_line})",
                    key_node.start_mark,
                )
            first_line_of[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Read the config file into a dict, turning every way it can fail into a ConfigError."""
    try:
        with path.open("r", encoding="utf-8") as stream:
            data = yaml.load(stream, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty; write '{{}}' to use every default")
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path} must hold a mapping of sections at the top level, got {type(data).__name__}"
        )
    return data


# --------------------------------------------------------------------------- environment overrides


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[str, Any]]:
    """Collect ``SMFD_*`` overrides as {key path: (variable name, parsed value)}.

    Variables with ``__`` are always overrides, so a misspelt section fails validation loudly.
    Single-segment variables apply only when they name a top-level key (``SMFD_STATE_DIR``), so
    other ``SMFD_`` variables the CLI or unit file may use are left alone.
    """
    top_level = set(SmfdConfig.model_fields)
    overrides: dict[tuple[str, ...], tuple[str, Any]] = {}
    for name in sorted(environ):
        if not name.upper().startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :].lower()
        segments = tuple(rest.split(ENV_NESTING))
        if len(segments) == 1 and segments[0] not in top_level:
            continue
        if not all(segments):
            raise ConfigError(f"environment variable {name}: empty key between '{ENV_NESTING}' separators")
        overrides[segments] = (name, _parse_env_value(name, environ[name]))
    return overrides


def _parse_env_value(name: str, raw: str) -> Any:
    """Read an override value as YAML so numbers, booleans and flow lists get their natural types."""
    try:
        return yaml.load(raw, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"environment variable {name} is not a valid YAML value: {exc}") from None


def _apply_override(data: dict[str, Any], key_path: tuple[str, ...], env_name: str, value: Any) -> None:
    """Set one value deep inside the raw config, creating sections and indexing lists as needed."""
    node: Any = data
    for depth, key in enumerate(key_path):
        last = depth == len(key_path) - 1
        where = ".".join(key_path[: depth + 1])
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"environment variable {env_name}: {where} is not an item of a {len(node)}-item list")
            index = int(key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"environment variable {env_name}: {'.'.join(key_path[:depth])} is not a section")
        if last:
            node[key] = value
            continue
        if node.get(key) is None:
            if key_path[depth + 1].isdigit():
                raise ConfigError(
                    f"environment variable {env_name}: {where} is not listed in the config file; "
                    "list items can only be overridden when the file lists them"
                )
            node[key] = {}
        node = node[key]


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Apply every override in place; return {key path: variable name} for error messages."""
    sources: dict[tuple[str, ...], str] = {}
    for key_path, (env_name, value) in _env_overrides(environ).items():
        _apply_override(data, key_path, env_name, value)
        sources[key_path] = env_name
    return sources


# --------------------------------------------------------------------------- paths


def _resolve_against(path: Path, base_dir: Path) -> Path:
    """Make ``path`` absolute, reading relative paths from the config folder rather than the cwd."""
    expanded = path.expanduser()
    return Path(os.path.abspath(expanded if expanded.is_absolute() else base_dir / expanded))


def resolve_paths(cfg: SmfdConfig, base_dir: Path) -> SmfdConfig:
    """Return a copy of ``cfg`` with every filesystem path absolute, and the model cache defaulted."""
    state_dir = _resolve_against(cfg.state_dir, base_dir)
    model_path = cfg.model.path
    if model_path != EMBEDDED_MODEL:
        model_path = str(_resolve_against(Path(model_path), base_dir))
    cache_dir = StatePaths(state_dir).model_cache
    if cfg.model.cache_dir is not None:
        cache_dir = _resolve_against(cfg.model.cache_dir, base_dir)
    watch = [
        folder.model_copy(update={"path": _resolve_against(folder.path, base_dir)}) for folder in cfg.sources.watch
    ]
    suites = [suite.model_copy(update={"path": _resolve_against(suite.path, base_dir)}) for suite in cfg.probes.suites]
    drift = None if cfg.probes.drift_prompts is None else _resolve_against(cfg.probes.drift_prompts, base_dir)
    background = cfg.memory.background_text
    if background is not None:
        background = _resolve_against(background, base_dir)
    key_file = cfg.serve.api_key_file
    if key_file is not None:
        key_file = _resolve_against(key_file, base_dir)
    return cfg.model_copy(
        update={
            "state_dir": state_dir,
            "memory": cfg.memory.model_copy(update={"background_text": background}),
            "model": cfg.model.model_copy(update={"path": model_path, "cache_dir": cache_dir}),
            "sources": cfg.sources.model_copy(update={"watch": watch}),
            "probes": cfg.probes.model_copy(update={"suites": suites, "drift_prompts": drift}),
            "serve": cfg.serve.model_copy(update={"api_key_file": key_file}),
        }
    )


# --------------------------------------------------------------------------- loading


def _format_validation_error(path: Path, exc: ValidationError, env_sources: Mapping[tuple[str, ...], str]) -> str:
    """One line per problem, each starting with the dotted key path, e.g. ``train.lr: Input should be ...``."""
    lines = [f"invalid config {path}:"]
    for error in exc.errors(include_url=False):
        loc = tuple(str(part) for part in error["loc"])
        key = ".".join(loc) or "(top level)"
        line = f"  {key}: {error['msg']}"
        value = error.get("input")
        if isinstance(value, (str, int, float, bool)) and error["type"] != "missing":
            line += f" (got {_short_repr(value)})"
        env_name = next((name for key_path, name in env_sources.items() if loc[: len(key_path)] == key_path), None)
        if env_name is not None:
            line += f" [from environment variable {env_name}]"
        lines.append(line)
    return "\n".join(lines)


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_config(path: Path, environ: Mapping[str, str] | None = None) -> SmfdConfig:
    """Load, override from the environment, validate, and resolve paths; raise ConfigError on any problem.

    ``environ`` defaults to ``os.environ``; pass a dict to make overrides explicit (tests, --check).
    """
    path = Path(path)
    data = _read_yaml_mapping(path)
    env_sources = _apply_env(data, os.environ if environ is None else environ)
    try:
        cfg = SmfdConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(path, exc, env_sources)) from None
    base_dir = Path(os.path.abspath(path.expanduser())).parent
    return resolve_paths(cfg, base_dir)


def validate_model_path(cfg: SmfdConfig) -> None:
    """Check that model.path is "embedded", an existing folder, or an existing .gguf file.

    Kept out of load_config so a config can be loaded and summarised before the model is copied in.
    """
    model_path = cfg.model.path
    if model_path == EMBEDDED_MODEL:
        return
    candidate = Path(model_path)
    if candidate.is_dir():
        return
    if candidate.is_file() and candidate.suffix.lower() == ".gguf":
        return
    expected = f'give a model folder, a .gguf file, or "{EMBEDDED_MODEL}"'
    if candidate.is_file():
        raise ConfigError(f"model.path: {model_path} is a file but not a .gguf file; {expected}")
    raise ConfigError(f"model.path: {model_path} does not exist; {expected}")
