"""Compare the settings a state was created with (recorded in its manifest) with a config's.

Memory shape, read temperature, healing and the background text are baked into version 0; a
config that changes them cannot be applied to an existing state (CheckpointStore.check_settings).
"""

from __future__ import annotations

from smfd.config import MemorySection
from smfd.errors import SmfdError


def changed_settings(recorded: dict, settings: dict, n_layers: int | None = None) -> list[str]:
    """'section.key: state has X, config says Y' for every recorded setting the config changes."""
    changed = []
    for section, values in settings.items():
        old = recorded.get(section)
        if not isinstance(old, dict):
            continue
        for key, value in values.items():
            if key in old and not _same_setting(section, key, old[key], value, n_layers):
                changed.append(
                    f"{section}.{key}: state has {_normalised(old[key])!r}, config says {_normalised(value)!r}"
                )
    return changed


def _same_setting(section: str, key: str, old: object, new: object, n_layers: int | None) -> bool:
    if section == "memory" and key == "layers" and n_layers is not None:
        return _blocks(old, n_layers) == _blocks(new, n_layers)
    return _normalised(old) == _normalised(new)


def _blocks(layers: object, n_layers: int) -> object:
    """Layer numbers as the block indices the memory attaches to; values that name no blocks as they are."""
    try:
        return MemorySection(layers=tuple(layers)).layer_indices(n_layers)  # type: ignore[arg-type]
    except (SmfdError, TypeError, ValueError):
        return _normalised(layers)


def _normalised(value: object) -> object:
    """Compare JSON-read settings with fresh ones: tuples and lists alike."""
    return list(value) if isinstance(value, tuple) else value
