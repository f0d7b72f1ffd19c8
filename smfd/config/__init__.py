"""Configuration: the schema (every setting, defined once), loading and the --check summary."""

from smfd.config.loading import load_config, validate_model_path
from smfd.config.schema import (
    EMBEDDED_MODEL,
    BudgetSection,
    CheckpointSection,
    ChunkingSection,
    DistillSection,
    Feed,
    GuardSection,
    HealSection,
    LoggingSection,
    MemorySection,
    MetricsSection,
    ModelSection,
    ProbesSection,
    ProbeSuite,
    ScheduleSection,
    SmfdConfig,
    SourcesSection,
    SurpriseSection,
    TrainSection,
    WatchFolder,
)
from smfd.config.summary import describe

__all__ = [
    "EMBEDDED_MODEL", "BudgetSection", "CheckpointSection", "ChunkingSection", "DistillSection", "Feed",
    "GuardSection", "HealSection", "LoggingSection", "MemorySection", "MetricsSection", "ModelSection",
    "ProbeSuite", "ProbesSection", "ScheduleSection", "SmfdConfig", "SourcesSection", "SurpriseSection",
    "TrainSection", "WatchFolder", "describe", "load_config", "validate_model_path",
]
