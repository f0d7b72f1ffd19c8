"""Settings for engine tests, built from the config schema (the only place defaults live)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, TypeVar

from pydantic import BaseModel

from smfd.config import ChunkingSection, SurpriseSection, TrainSection
from smfd.learn.lesson import LearnSettings

Section = TypeVar("Section", bound=BaseModel)


def changed(section: Section, **changes: Any) -> Section:
    """`section` with some keys changed, validated by the schema like a config file would be."""
    return type(section).model_validate({**section.model_dump(), **changes})


def train_section(**keys: Any) -> TrainSection:
    """A train section for a test; the retain penalty is off unless asked (it needs a retain set)."""
    return TrainSection(**{"retain_weight": 0.0, **keys})


def learn_settings(
    train: TrainSection | None = None,
    *,
    chunk_tokens: int | None = None,
    skip_below_nats: float | None = None,
    **train_keys: Any,
) -> LearnSettings:
    """Learn settings for a test: `train` (or train_section()) with `train_keys` changed, chunking and surprise."""
    settings = LearnSettings(train=changed(train or train_section(), **train_keys))
    if chunk_tokens is not None:
        settings = replace(settings, chunking=ChunkingSection(max_tokens=chunk_tokens))
    if skip_below_nats is not None:
        settings = replace(settings, surprise=SurpriseSection(skip_below_nats=skip_below_nats))
    return settings
