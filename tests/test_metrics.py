"""Metrics exposition over real HTTP, health endpoints, and the dashboard/alerts that depend on them."""

from __future__ import annotations

import json
import logging
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from smfd.errors import SmfdError
from smfd.observe.http_server import MetricsServer
from smfd.observe.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "config" / "grafana" / "smfd.json"
ALERTS = REPO / "config" / "prometheus" / "alerts.yml"
PROMETHEUS_CONFIG = REPO / "config" / "prometheus" / "prometheus.yml"

FAMILIES = {
    "smfd_documents_total": "counter",
    "smfd_queue_chunks": "gauge",
    "smfd_queue_tokens": "gauge",
    "smfd_chunks_skipped_known_total": "counter",
    "smfd_token_surprise_nats": "histogram",
    "smfd_updates_total": "counter",
    "smfd_update_duration_seconds": "histogram",
    "smfd_memory_rows_updated_total": "counter",
    "smfd_slots_selected_last": "gauge",
    "smfd_checkpoint_version": "gauge",
    "smfd_checkpoint_timestamp_seconds": "gauge",
    "smfd_last_update_timestamp_seconds": "gauge",
    "smfd_probe_accuracy_ratio": "gauge",
    "smfd_probe_nll_nats": "gauge",
    "smfd_probe_base_accuracy_ratio": "gauge",
    "smfd_probe_base_nll_nats": "gauge",
    "smfd_recall_accuracy_ratio": "gauge",
    "smfd_recall_kind_accuracy_ratio": "gauge",
    "smfd_drift_kl_nats": "gauge",
    "smfd_rollbacks_total": "counter",
    "smfd_peak_memory_bytes": "gauge",
    "smfd_memory_budget_bytes": "gauge",
    "smfd_feed_fetch_errors_total": "counter",
    "smfd_watcher_rescans_total": "counter",
    "smfd_probe_duration_seconds": "histogram",
    "smfd_learner_up": "gauge",
    "smfd_build_info": "gauge",
    "smfd_api_requests_total": "counter",
    "smfd_api_time_to_first_token_seconds": "histogram",
    "smfd_api_request_duration_seconds": "histogram",
    "smfd_api_generated_tokens_total": "counter",
    "smfd_api_requests_in_flight": "gauge",
}
METRIC_NAME = re.compile(r"\bsmfd_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMTOOL_MISSING = "promtool not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)"


def _populate(metrics: Metrics) -> None:
    """Drive every helper once, as a day of daemon work would."""
    metrics.document("watch", "queued")
    metrics.document("feed", "duplicate")
    metrics.set_queue(chunks=12, tokens=4096)
    metrics.skipped_known(3)
    metrics.observe_token_surprise([0.2, 1.7, 4.5, 20.0])
    metrics.record_update("accepted", duration_seconds=42.0, rows_updated=500, slots_selected=64, finished_at=1.7e9)
    metrics.record_update("rolled_back", duration_seconds=40.0, rows_updated=300, slots_selected=32)
    metrics.rollback("drift")
    metrics.set_checkpoint(version=7, written_at=1.7e9)
    metrics.set_probe("general", accuracy=0.81, nll_nats=2.3)
    metrics.set_probe_base("general", accuracy=0.82, nll_nats=2.2)
    metrics.set_recall_accuracy(0.4, {"verbatim": 0.6, "reworded": 0.2})
    metrics.set_drift_kl(0.01)
    metrics.observe_probe_duration(3.2)
    metrics.set_memory("cpu", peak_bytes=2_000_000_000, budget_bytes=4_000_000_000)
    metrics.set_memory("cuda", peak_bytes=1_000_000_000, budget_bytes=8_000_000_000)
    metrics.feed_fetch_error("timeout")
    metrics.watcher_rescan()
    metrics.set_learner_up(True)
    metrics.api.request("chat_completions", 200, 1.5)
    metrics.api.request("completions", 500, 0.1)
    metrics.api.first_token_after("chat_completions", 0.2)
    metrics.api.generated("chat_completions", 40)
    metrics.api.in_flight.set(1)


@pytest.fixture()
def served():
    """A Metrics instance behind a live MetricsServer on an ephemeral port; readiness via an Event."""
    metrics = Metrics(version="9.9.9")
    is_ready = threading.Event()
    server = MetricsServer(metrics, port=0, ready=is_ready.is_set)
    server.start()
    client = httpx.Client(base_url=server.url, timeout=5.0, trust_env=False)
    try:
        yield metrics, server, is_ready, client
    finally:
        client.close()
        server.stop()


def _declared_types(exposition: str) -> dict[str, str]:
    """Metric name -> type from the '# TYPE' lines of a text exposition."""
    declared = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            declared[name] = kind
    return declared


def _samples(exposition: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed with the client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }


def _missing_names(referenced: set[str], declared: dict[str, str]) -> set[str]:
    """Referenced names that the exposition does not provide (histogram suffixes resolved)."""
    missing = set()
    for name in referenced:
        if name in declared:
            continue
        base = next((name[: -len(s)] for s in HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if base is None or declared.get(base) != "histogram":
            missing.add(name)
    return missing


def _dashboard_panels(dashboard: dict) -> list[dict]:
    """All panels including those nested in collapsed rows."""
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _dashboard_exprs(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _dashboard_panels(dashboard) for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            exprs.append(query["query"] if isinstance(query, dict) else query)
    return exprs


def _alert_exprs() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def test_metrics_endpoint_exposes_every_family(served):
    metrics, _, _, client = served
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    declared = _declared_types(response.text)
    for name, kind in FAMILIES.items():
        assert declared.get(name) == kind, f"{name} missing or not a {kind}"
    samples = _samples(response.text)
    # Bounded counter children exist at zero from the first scrape, so rate() works at once.
    assert samples[("smfd_documents_total", (("outcome", "rejected"), ("source", "feed")))] == 0.0
    assert samples[("smfd_rollbacks_total", (("reason", "nll"),))] == 0.0
    assert samples[("smfd_build_info", (("version", "9.9.9"),))] == 1.0
    assert samples[("smfd_learner_up", ())] == 0.0


def test_openmetrics_is_served_when_asked(served):
    _, _, _, client = served
    response = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


def test_recorded_values_reach_the_scrape(served):
    metrics, _, _, client = served
    _populate(metrics)
    samples = _samples(client.get("/metrics").text)
    assert samples[("smfd_updates_total", (("outcome", "accepted"),))] == 1.0
    assert samples[("smfd_updates_total", (("outcome", "rolled_back"),))] == 1.0
    # Only the accepted update changed memory rows and the last-update time.
    assert samples[("smfd_memory_rows_updated_total", ())] == 500.0
    assert samples[("smfd_last_update_timestamp_seconds", ())] == 1.7e9
    assert samples[("smfd_slots_selected_last", ())] == 32.0
    assert samples[("smfd_update_duration_seconds_count", ())] == 2.0
    assert samples[("smfd_token_surprise_nats_bucket", (("le", "16.0"),))] == 3.0
    assert samples[("smfd_token_surprise_nats_bucket", (("le", "+Inf"),))] == 4.0
    assert samples[("smfd_probe_base_accuracy_ratio", (("suite", "general"),))] == 0.82
    assert samples[("smfd_memory_budget_bytes", (("device", "cuda"),))] == 8e9
    assert samples[("smfd_queue_tokens", ())] == 4096.0
    assert samples[("smfd_learner_up", ())] == 1.0


def test_readyz_is_503_until_ready(served):
    _, _, is_ready, client = served
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "not ready" in response.text
    is_ready.set()
    response = client.get("/readyz")
    assert (response.status_code, response.text) == (200, "ok\n")
    assert client.get("/livez").status_code == 200


def test_health_check_reason_and_exception_are_reported():
    def broken() -> bool:
        raise RuntimeError("learner thread vanished")

    server = MetricsServer(Metrics(), port=0, ready=lambda: (False, "model still loading"), alive=broken)
    with server, httpx.Client(base_url=server.url, timeout=5.0, trust_env=False) as client:
        ready = client.get("/readyz")
        alive = client.get("/livez")
    assert (ready.status_code, ready.text) == (503, "model still loading\n")
    assert alive.status_code == 503
    assert "learner thread vanished" in alive.text


@pytest.mark.parametrize("path", ["/", "/metrics/extra", "/health", "/favicon.ico"])
def test_unknown_paths_are_404(served, path):
    _, _, _, client = served
    assert client.get(path).status_code == 404


def test_instances_do_not_share_state():
    first, second = Metrics(), Metrics()
    first.document("watch", "done")
    first_samples = _samples(first.render().decode())
    second_samples = _samples(second.render().decode())
    key = ("smfd_documents_total", (("outcome", "done"), ("source", "watch")))
    assert (first_samples[key], second_samples[key]) == (1.0, 0.0)


def test_unbounded_label_values_are_rejected():
    metrics = Metrics(process_metrics=False)
    with pytest.raises(ValueError, match="'ftp'"):
        metrics.document("ftp", "queued")
    with pytest.raises(ValueError, match="outcome"):
        metrics.record_update("exploded", duration_seconds=1.0)
    with pytest.raises(ValueError, match="probe suite name"):
        metrics.set_probe("/etc/passwd", accuracy=0.5, nll_nats=1.0)
    for index in range(16):
        metrics.set_probe(f"suite{index}", accuracy=0.5, nll_nats=1.0)
    with pytest.raises(ValueError, match="too many probe suites"):
        metrics.set_probe("one_more", accuracy=0.5, nll_nats=1.0)
    metrics.set_probe("suite3", accuracy=0.6, nll_nats=1.0)  # existing suites still update


def test_busy_port_is_a_user_error():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        busy_port = holder.getsockname()[1]
        with pytest.raises(SmfdError, match=f"127.0.0.1:{busy_port}"):
            MetricsServer(Metrics(process_metrics=False), port=busy_port).start()


def test_dashboard_is_provisionable():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "smfd-main"
    assert dashboard["id"] is None
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Health", "Ingestion", "Learning", "Retention", "Resources", "Serving"]
    ids = [p["id"] for p in _dashboard_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _dashboard_panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    assert "${DS_" not in DASHBOARD.read_text()


def test_dashboard_and_alert_metrics_exist_in_live_exposition(served):
    metrics, _, _, client = served
    _populate(metrics)
    declared = _declared_types(client.get("/metrics").text)
    dashboard_names = {n for e in _dashboard_exprs(json.loads(DASHBOARD.read_text())) for n in METRIC_NAME.findall(e)}
    alert_names = {n for e in _alert_exprs() for n in METRIC_NAME.findall(e)}
    assert len(dashboard_names) >= 20 and len(alert_names) >= 5  # the regex really found the references
    assert _missing_names(dashboard_names, declared) == set()
    assert _missing_names(alert_names, declared) == set()


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(PROMTOOL_MISSING)
    return path


def _run(args: list[str], stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=60, cwd=cwd)


def test_promtool_lints_the_exposition(served):
    promtool = _promtool()
    metrics, _, _, client = served
    _populate(metrics)
    result = _run([promtool, "check", "metrics"], stdin=client.get("/metrics").text)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_promtool_accepts_alerts_and_example_config():
    promtool = _promtool()
    rules = _run([promtool, "check", "rules", str(ALERTS)])
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = _run([promtool, "check", "config", "--syntax-only", PROMETHEUS_CONFIG.name], cwd=PROMETHEUS_CONFIG.parent)
    assert config.returncode == 0, config.stdout + config.stderr


def test_dashboard_queries_are_valid_promql(tmp_path):
    """Every dashboard query, with Grafana variables filled in, parses as a recording rule."""
    promtool = _promtool()
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    concrete = [
        e.replace("$__rate_interval", "5m").replace("$instance", ".*")
        for e in exprs
        if not e.startswith("label_values")
    ]
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [{"record": f"dashboard:query_{i}:check", "expr": expr} for i, expr in enumerate(concrete)],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = _run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


ALERT_UNIT_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'smfd_probe_accuracy_ratio{{job="smfd",instance="forgetting",suite="general"}}'
        values: '0.78x40'
      - series: 'smfd_probe_base_accuracy_ratio{{job="smfd",instance="forgetting",suite="general"}}'
        values: '0.81x40'
      - series: 'smfd_probe_accuracy_ratio{{job="smfd",instance="fine",suite="general"}}'
        values: '0.80x40'
      - series: 'smfd_probe_base_accuracy_ratio{{job="smfd",instance="fine",suite="general"}}'
        values: '0.81x40'
      - series: 'smfd_rollbacks_total{{job="smfd",instance="flapping",reason="drift"}}'
        values: '0+1x40'
      - series: 'smfd_rollbacks_total{{job="smfd",instance="fine",reason="drift"}}'
        values: '0x40'
      - series: 'up{{job="smfd",instance="gone"}}'
        values: '0x40'
    alert_rule_test:
      - eval_time: 10m
        alertname: SmfdRetentionDrop
        exp_alerts: []
      - eval_time: 20m
        alertname: SmfdRetentionDrop
        exp_alerts:
          - exp_labels: {{severity: warning, job: smfd, instance: forgetting, suite: general}}
            exp_annotations:
              summary: "smfd retention suite general on forgetting is more than 2 points below the base model"
              description: "Probe accuracy on suite general has been 3% below the untouched base model for 15 minutes: the model is forgetting."
      - eval_time: 20m
        alertname: SmfdRepeatedRollbacks
        exp_alerts:
          - exp_labels: {{severity: warning, job: smfd, instance: flapping}}
            exp_annotations:
              summary: "smfd on flapping rolled back 20 updates in the last hour"
              description: "Updates keep failing their probes. Look at smfd_rollbacks_total by reason and the recent input text."
      - eval_time: 10m
        alertname: SmfdDown
        exp_alerts:
          - exp_labels: {{severity: critical, job: smfd, instance: gone}}
            exp_annotations:
              summary: "smfd on gone cannot be scraped"
              description: "Prometheus has failed to scrape the smfd metrics endpoint for 5 minutes. Check `systemctl status smfd` and `journalctl -u smfd`."
  - interval: 1m
    input_series:
      - series: 'smfd_last_update_timestamp_seconds{{job="smfd",instance="stuck"}}'
        values: '0x480'
      - series: 'smfd_queue_chunks{{job="smfd",instance="stuck"}}'
        values: '5x480'
      - series: 'smfd_last_update_timestamp_seconds{{job="smfd",instance="idle"}}'
        values: '0x480'
      - series: 'smfd_queue_chunks{{job="smfd",instance="idle"}}'
        values: '0x480'
      - series: 'smfd_queue_chunks{{job="smfd",instance="fresh"}}'
        values: '9x480'
    alert_rule_test:
      - eval_time: 5h
        alertname: SmfdUpdatesStalled
        exp_alerts: []
      - eval_time: 7h
        alertname: SmfdUpdatesStalled
        exp_alerts:
          - exp_labels: {{severity: warning, job: smfd, instance: stuck}}
            exp_annotations:
              summary: "smfd on stuck has not completed an update for over 6 hours while text is queued"
              description: "The last accepted memory update was 7h 0m 0s ago and the queue is not empty."
      - eval_time: 5h
        alertname: SmfdNeverUpdated
        exp_alerts: []
      - eval_time: 7h
        alertname: SmfdNeverUpdated
        exp_alerts:
          - exp_labels: {{severity: warning, job: smfd, instance: fresh}}
            exp_annotations:
              summary: "smfd on fresh has queued text but no accepted update in 6 hours"
              description: "9 chunks are queued and no memory update has been accepted since the daemon started."
"""


def test_alerts_fire_when_they_should(tmp_path):
    """promtool unit tests: each alert fires on the bad case and stays quiet on the neighbouring good one."""
    promtool = _promtool()
    path = tmp_path / "alerts-test.yml"
    path.write_text(ALERT_UNIT_TESTS.format(alerts=json.dumps(str(ALERTS))))
    result = _run([promtool, "test", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_idle_connections_cannot_pile_up_threads_and_early_hangups_leave_no_traceback(caplog):
    server = MetricsServer(Metrics(), port=0, max_connections=4, idle_timeout=0.5)
    with server, caplog.at_level(logging.DEBUG, logger="smfd.http"):
        threads_before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
        time.sleep(0.3)
        assert threading.active_count() <= threads_before + 4, "one thread per allowed connection, no more"

        time.sleep(1.0)  # the idle ones time out and give their slots back
        assert httpx.get(f"{server.url}/livez", timeout=5.0, trust_env=False).status_code == 200

        for _ in range(20):  # ask for the metrics and hang up before reading the answer
            with socket.create_connection(("127.0.0.1", server.port)) as hangup:
                hangup.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                hangup.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        for sock in idle:
            sock.close()

    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING], [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING
    ]
