"""Method specs (`NAME[:key=value;key=value]`): which methods a benchmark run compares, and how.

A spec names a method and overrides some of its settings, so one run can hold a sweep:
`smf,smf:lr=8;top_t=500,lora:lr=1e-3`. An SMF option is a key of the config schema (the table
below says which); its value is checked by the schema itself, and anything a spec does not set
is the schema's default, so `smf` is exactly what the daemon runs by default. LoRA and full
finetuning options are the baseline trainers' own arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from smfd.config import DistillSection, HealSection, MemorySection, TrainSection
from smfd.errors import SmfdError
from smfd.learn.lesson import LearnSettings

SPEC_SEPARATOR = ","  # between specs
OPTION_SEPARATOR = ";"  # between key=value options inside one spec
# `smf` is the daemon's recipe as configured by default; the others pin a slot-ranking rule.
SMF_RULES = {"smf": None, "smf-kl": "kl", "smf-tfidf": "tfidf", "smf-surprise-kl": "surprise-kl"}
IN_CONTEXT = "in-context"  # no training: each probe is asked with its document in the prompt (the ceiling)
METHOD_NAMES = (*SMF_RULES, "lora", "full", IN_CONTEXT)

# SMF option -> (config section, key). The section validates the value.
SMF_OPTIONS: dict[str, tuple[str, str]] = {
    **{
        key: ("train", key)
        for key in (
            "lr",
            "top_t",
            "passes",
            "restate",
            "normalize",
            "normalize_once",
            "scope",
            "retain_weight",
            "retain_tokens",
            "avoid_retain_rows",
            "prefix_cache_mb",
            "micro_batch_size",
            "query_noise",
            "query_noise_draws",
        )
    },
    **{
        key: ("memory", key)
        for key in (
            "layers",
            "n_keys",
            "k",
            "heads",
            "key_dim",
            "read_temperature",
            "min_read_weight",
            "read_floor_margin",
            "fact_sequences",
        )
    },
    "heal_steps": ("heal", "steps"),
    "heal_lr": ("heal", "lr"),
    "distill": ("distill", "enabled"),
    "distill_top_k": ("distill", "top_k"),
    **{
        key: ("distill", key)
        for key in ("dropped_variants", "drop_rate", "shuffled_variants", "tail_variants", "ce_weight", "min_shift")
    },
}
SECTIONS: dict[str, type[BaseModel]] = {
    "train": TrainSection,
    "memory": MemorySection,
    "heal": HealSection,
    "distill": DistillSection,
}


def _parsed(key: str, raw: str, cast: Callable[[str], Any]) -> Any:
    try:
        value = cast(raw)
    except ValueError:
        raise SmfdError(f"option {key}={raw!r} must be a {'whole number' if cast is int else 'number'}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SmfdError(f"option {key}={raw!r} must be a finite number")
    return value


def _positive_float(key: str, raw: str) -> float:
    value = _parsed(key, raw, float)
    if not value > 0:
        raise SmfdError(f"option {key}={raw!r} must be > 0")
    return value


def _non_negative_float(key: str, raw: str) -> float:
    value = _parsed(key, raw, float)
    if value < 0:
        raise SmfdError(f"option {key}={raw!r} must be >= 0")
    return value


def _positive_int(key: str, raw: str) -> int:
    value = _parsed(key, raw, int)
    if value < 1:
        raise SmfdError(f"option {key}={raw!r} must be >= 1")
    return value


def _flag(key: str, raw: str) -> bool:
    if raw not in ("0", "1"):
        raise SmfdError(f"option {key}={raw!r} must be 0 or 1")
    return raw == "1"


# The baselines' own trainer arguments (smfd.bench.baselines); passes and restate are the run's budget.
BASELINE_OPTIONS: dict[str, Callable[[str, str], Any]] = {
    "lr": _positive_float,
    "rank": _positive_int,
    "alpha": _positive_float,
    "passes": _positive_int,
    "restate": _flag,
    "weight_decay": _non_negative_float,
}
LORA_OPTIONS = tuple(BASELINE_OPTIONS)
FULL_OPTIONS = ("lr", "passes", "restate", "weight_decay")


def options_for(name: str) -> tuple[str, ...]:
    if name == IN_CONTEXT:
        return ()
    if name in SMF_RULES:
        return tuple(SMF_OPTIONS)
    return LORA_OPTIONS if name == "lora" else FULL_OPTIONS


def _smf_value(key: str, raw: str) -> Any:
    """Turn an option's text into what the schema validates: `layers` as numbers joined by '+', flags 0/1."""
    section, field_name = SMF_OPTIONS[key]
    if key == "layers":
        if not all(part.strip().removeprefix("-").isdigit() for part in raw.split("+")):
            raise SmfdError(f"option {key}={raw!r} must be decoder layer numbers joined by '+', e.g. 12+20 or -2")
        return tuple(int(part) for part in raw.split("+"))
    if SECTIONS[section].model_fields[field_name].annotation in (bool, "bool"):
        return _flag(key, raw)
    return raw


def _checked(section: str, overrides: dict[str, Any], named: str = "") -> BaseModel:
    """The schema's `section` with `overrides` applied and validated; an error names `named` (the option)."""
    try:
        return SECTIONS[section].model_validate({**SECTIONS[section]().model_dump(), **overrides})
    except ValidationError as exc:
        problems = "; ".join(f"{section}.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        what = named or ", ".join(f"{key}={value!r}" for key, value in overrides.items())
        raise SmfdError(f"option {what} is not a valid setting ({problems})") from None


@dataclass(frozen=True)
class MethodSpec:
    """One method to benchmark. `label` is the spec as typed (whitespace removed): the results key."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return "smf" if self.name in SMF_RULES else self.name

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "name": self.name, "options": self.options}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> MethodSpec:
        return cls(data["label"], data["name"], dict(data["options"]))


def _parse_option(name: str, key: str, raw: str) -> Any:
    if name not in SMF_RULES:
        return BASELINE_OPTIONS[key](key, raw)
    section, field_name = SMF_OPTIONS[key]
    value = _smf_value(key, raw)
    checked = _checked(section, {field_name: value}, f"{key}={raw!r}")
    return getattr(checked, field_name)


def parse_method_spec(text: str) -> MethodSpec:
    """`NAME` or `NAME:key=value;key=value` -> MethodSpec, checking the name, every key and every value."""
    label = "".join(text.split())
    name, _, option_text = label.partition(":")
    if name not in METHOD_NAMES:
        raise SmfdError(f"unknown method {name!r} in spec {text!r}; choose from {', '.join(METHOD_NAMES)}")
    allowed = options_for(name)
    options: dict[str, Any] = {}
    for item in filter(None, option_text.split(OPTION_SEPARATOR)):
        key, eq, raw = item.partition("=")
        if not eq or not raw:
            raise SmfdError(f"method spec {text!r}: option {item!r} is not key=value")
        if key not in allowed:
            raise SmfdError(f"method spec {text!r}: unknown option {key!r} for {name}; allowed: {', '.join(allowed)}")
        if key in options:
            raise SmfdError(f"method spec {text!r}: option {key!r} given twice")
        try:
            options[key] = _parse_option(name, key, raw)
        except SmfdError as exc:
            raise SmfdError(f"method spec {text!r}: {exc}") from None
    return MethodSpec(label, name, options)


def parse_method_specs(values: list[str]) -> list[MethodSpec]:
    """Every spec from one or more comma-separated lists, in order; duplicates are an error."""
    specs: list[MethodSpec] = []
    for value in values:
        for part in value.split(SPEC_SEPARATOR):
            if not part.strip():
                raise SmfdError(f"--methods {value!r} has an empty entry (two commas in a row or a trailing comma)")
            specs.append(parse_method_spec(part))
    labels = [s.label for s in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise SmfdError(f"--methods names {', '.join(duplicates)} more than once")
    if not specs:
        raise SmfdError("--methods is empty: name at least one method")
    return specs


def smf_configs(spec: MethodSpec, defaults: LearnSettings) -> tuple[LearnSettings, MemorySection, HealSection]:
    """An SMF spec's learn settings, memory and healing: the schema's defaults (and the run's budget in
    `defaults`), then the spec's options."""
    grouped: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for key, value in spec.options.items():
        section, field_name = SMF_OPTIONS[key]
        grouped[section][field_name] = value
    train = dict(grouped["train"])
    rule = SMF_RULES[spec.name]
    if rule is not None:
        train["selection"] = rule
    if grouped["distill"]:
        train["distill"] = grouped["distill"]
    settings = defaults.with_train(**train) if train else defaults
    memory = _checked("memory", grouped["memory"])
    heal = _checked("heal", grouped["heal"])
    return settings, memory, heal  # type: ignore[return-value]
