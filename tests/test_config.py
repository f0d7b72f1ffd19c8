"""Config loading: the shipped default, key-path errors, YAML pitfalls, env overrides, path resolution."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from smfd.config import SmfdConfig, describe, load_config, validate_model_path
from smfd.errors import ConfigError

EDGE_YAML = Path(__file__).resolve().parent.parent / "config" / "edge.yaml"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "smfd.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path, environ: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={} if environ is None else environ)
    return str(info.value)


def test_edge_yaml_loads_with_paths_resolved_against_its_folder(tmp_path, monkeypatch):
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    copied = Path(shutil.copy(EDGE_YAML, config_dir / "edge.yaml"))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    cfg = load_config(copied, environ={})

    assert cfg.model.path == "embedded"
    assert cfg.state_dir == config_dir / "state"
    assert cfg.model.cache_dir == config_dir / "state" / "model-cache"
    assert [folder.path for folder in cfg.sources.watch] == [config_dir / "inbox"]
    assert (cfg.metrics.enabled, cfg.metrics.host, cfg.metrics.port) == (True, "127.0.0.1", 9464)
    assert cfg.probes.suites == []
    validate_model_path(cfg)


def test_edge_yaml_states_the_schema_defaults():
    """The shipped file documents the defaults; drifting from them would mislead readers."""
    shipped = load_config(EDGE_YAML, environ={})
    expected = SmfdConfig()
    sections = ("memory", "heal", "train", "chunking", "surprise", "schedule", "budget", "metrics", "logging", "guard")
    for section in sections:
        assert getattr(shipped, section) == getattr(expected, section), section
    assert shipped.model.model_copy(update={"cache_dir": None}) == expected.model
    assert shipped.sources.watch[0].model_copy(update={"path": Path("./inbox")}) == expected.sources.watch[0]


def test_daemon_learns_like_the_benchmark_by_default():
    """`smfd bench`'s `smf` is the schema's defaults; the shipped config must not drift from them."""
    from smfd.learn.lesson import LearnSettings

    shipped = load_config(Path(__file__).parents[1] / "config" / "edge.yaml")
    assert LearnSettings.from_config(shipped) == LearnSettings(), (
        "config/edge.yaml must ship the benchmark's `smf` recipe"
    )
    assert (shipped.memory.shape(), shipped.heal) == (SmfdConfig().memory.shape(), SmfdConfig().heal)


def test_relative_paths_resolve_against_config_folder_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "tiny.gguf").write_bytes(b"GGUF")
    path = write_config(
        tmp_path,
        """
model: {path: models/tiny.gguf, cache_dir: cache}
state_dir: var/state
sources: {watch: [{path: drop}]}
probes:
  suites: [{name: facts_1, kind: cloze, path: probes/facts.jsonl}]
  drift_prompts: probes/drift.txt
""",
    )
    monkeypatch.chdir(tmp_path / "models")

    cfg = load_config(path, environ={})

    assert cfg.model.path == str(tmp_path / "models" / "tiny.gguf")
    assert cfg.model.cache_dir == tmp_path / "cache"
    assert cfg.state_dir == tmp_path / "var" / "state"
    assert cfg.sources.watch[0].path == tmp_path / "drop"
    assert cfg.probes.suites[0].path == tmp_path / "probes" / "facts.jsonl"
    assert cfg.probes.drift_prompts == tmp_path / "probes" / "drift.txt"
    validate_model_path(cfg)


def test_unknown_keys_are_reported_with_their_dotted_paths(tmp_path):
    path = write_config(
        tmp_path,
        """
sources:
  watch:
    - path: ./inbox
      recursve: true
metrcs: {port: 1}
""",
    )
    message = config_error(path)
    assert "sources.watch.0.recursve: Extra inputs are not permitted" in message
    assert "metrcs: Extra inputs are not permitted" in message


def test_wrong_types_are_reported_with_their_dotted_paths(tmp_path):
    path = write_config(tmp_path, "train: {lr: fast, passes: 0}\nmetrics: {port: 70000}\n")
    message = config_error(path)
    assert "train.lr: Input should be a valid number" in message
    assert "'fast'" in message
    assert "train.passes: Input should be greater than or equal to 1" in message
    assert "metrics.port: Input should be less than or equal to 65535" in message


def test_duplicate_keys_are_rejected_naming_the_key_and_line(tmp_path):
    path = write_config(tmp_path, "train:\n  lr: 10\n  passes: 2\n  lr: 20\n")
    message = config_error(path)
    assert "duplicate key 'lr'" in message
    assert "line 4" in message


def test_yaml_merge_keys_are_not_mistaken_for_duplicates(tmp_path):
    path = write_config(
        tmp_path,
        """
sources:
  watch:
    - &first {path: a, recursive: true}
    - <<: *first
      path: b
""",
    )
    cfg = load_config(path, environ={})
    assert [folder.path.name for folder in cfg.sources.watch] == ["a", "b"]
    assert cfg.sources.watch[1].recursive is True


def test_exponent_floats_are_accepted(tmp_path):
    """PyYAML reads `1e-4` as a string; float fields must still accept it."""
    path = write_config(tmp_path, "train: {lr: 1e-4}\nguard: {max_drift_kl: 5e-3}\n")
    cfg = load_config(path, environ={})
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.guard.max_drift_kl == pytest.approx(5e-3)


def test_logging_json_key_maps_to_json_format(tmp_path):
    path = write_config(tmp_path, "logging: {level: debug, json: false}\n")
    cfg = load_config(path, environ={})
    assert cfg.logging.json_format is False
    assert cfg.logging.level == "debug"


def test_env_overrides_parse_values_as_yaml_and_nest_on_double_underscore(tmp_path):
    path = write_config(tmp_path, "train: {lr: 5.0}\nsources: {watch: [{path: inbox}]}\n")
    environ = {
        "SMFD_TRAIN__LR": "100",
        "smfd_metrics__port": "9500",
        "SMFD_METRICS__ENABLED": "false",
        "SMFD_LOGGING__JSON": "off",
        "SMFD_SOURCES__WATCH__0__RECURSIVE": "true",
        "SMFD_STATE_DIR": "elsewhere",
        "SMFD_CONFIG": "/not/a/config/key",
    }
    cfg = load_config(path, environ=environ)
    assert cfg.train.lr == 100.0
    assert cfg.metrics.port == 9500
    assert cfg.metrics.enabled is False
    assert cfg.logging.json_format is False
    assert cfg.sources.watch[0].recursive is True
    assert cfg.state_dir == tmp_path / "elsewhere"


def test_bad_env_override_names_the_key_and_the_variable(tmp_path):
    path = write_config(tmp_path, "{}\n")
    message = config_error(path, {"SMFD_TRAIN__LR": "fast", "SMFD_TRAN__LR": "1"})
    assert "train.lr: Input should be a valid number" in message
    assert "SMFD_TRAIN__LR" in message
    assert "tran: Extra inputs are not permitted" in message


def test_env_override_of_unlisted_list_item_is_rejected(tmp_path):
    message = config_error(write_config(tmp_path, "{}\n"), {"SMFD_SOURCES__WATCH__0__RECURSIVE": "true"})
    assert "SMFD_SOURCES__WATCH__0__RECURSIVE" in message
    assert "sources.watch" in message


def test_missing_model_path_is_reported_as_model_path(tmp_path):
    path = write_config(tmp_path, "model: {path: no/such/model}\n")
    cfg = load_config(path, environ={})
    with pytest.raises(ConfigError, match=r"model\.path") as info:
        validate_model_path(cfg)
    assert str(tmp_path / "no" / "such" / "model") in str(info.value)


def test_model_path_file_must_be_gguf(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"x")
    cfg = load_config(write_config(tmp_path, "model: {path: weights.bin}\n"), environ={})
    with pytest.raises(ConfigError, match=r"model\.path"):
        validate_model_path(cfg)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("train: [unclosed\n", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("", "empty"),
        ("sources:\n  feeds: [{url: 'ftp://example.org/feed'}]\n", "sources.feeds.0.url"),
        ("probes:\n  suites: [{name: Bad-Name, kind: cloze, path: p.jsonl}]\n", "probes.suites.0.name"),
        ("memory: {layers: []}\n", "memory.layers"),
    ],
)
def test_invalid_files_raise_config_error(tmp_path, text, expected):
    assert expected in config_error(write_config(tmp_path, text))


def test_missing_file_raises_config_error(tmp_path):
    assert "does not exist" in config_error(tmp_path / "absent.yaml")


def test_config_error_exits_with_ex_config():
    assert ConfigError.exit_code == 78
    assert ConfigError("x").exit_code == 78


def test_describe_mentions_what_would_run(tmp_path):
    path = write_config(
        tmp_path,
        "sources:\n  feeds: [{url: 'https://example.org/feed.xml'}]\nmetrics: {port: 9999}\n",
    )
    summary = describe(load_config(path, environ={}))
    assert "embedded" in summary
    assert str(tmp_path / "inbox") in summary
    assert str(tmp_path / "state") in summary
    assert "https://example.org/feed.xml" in summary
    assert "127.0.0.1:9999" in summary
    assert "healing: 300 addressing steps" in summary
    assert "layers -2 (negative: counted from the top block, -1 being the last)" in summary
    assert (
        "retain penalty: weight 5 on 16384 tokens of 256 statements of fact sampled from the model, then the general text"
        in summary
    )
