"""End to end: the daemon on temporary folders with a tiny model — good and bad files, journal,
quarantine, checkpoint, status, probe, rollback, and a foreground run stopped by SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from conftest import CORPUS

from smfd.cli import main
from smfd.errors import SmfdError
from smfd.ingest.journal import Journal
from smfd.observe.startup import STAGES
from smfd.store.checkpoint import CheckpointStore

NEW_TEXT = (
    "The lighthouse keeper Marta Olsen painted the tower red in 1971. She kept a logbook of every ship that "
    "passed the cape, and her logbook is now kept in the harbour museum beside the old anchor."
)
OTHER_TEXT = (
    "# Orchard notes\n\nThe orchard behind the mill grows seven kinds of plum. The oldest tree was planted by "
    "the miller's daughter, and its fruit is pressed into a dark cider every October."
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, model_dir: Path, **overrides) -> Path:
    (folder / "corpus.txt").write_text(" ".join(CORPUS * 12))
    config = {
        "model": {"path": str(model_dir), "threads": 1},
        "memory": {
            "layers": [1],
            "n_keys": 16,
            "heads": 2,
            "k": 4,
            "key_dim": 16,
            "background_text": "corpus.txt",
            "background_sequences": 8,
            "fact_sequences": 6,
        },
        "train": {"top_t": 8, "passes": 2, "batch_size": 4, "seq_len": 32, "lr": 1.0},
        "chunking": {"max_tokens": 32},
        "surprise": {"skip_below_nats": 0.0},
        "sources": {"watch": [{"path": "./inbox"}], "settle_seconds": 0.2, "rescan_seconds": 1, "max_file_bytes": 4000},
        "schedule": {"interval_seconds": 1, "pending_chunks_trigger": 1},
        "state_dir": "./state",
        "metrics": {"enabled": True, "port": free_port()},
        "serve": {"enabled": False, "port": free_port(), "model_name": "smfd"},
        "budget": {"ram_mb": None},
        "probes": {"builtin": True, "fast_subset": 4},
        "guard": {"max_nll_increase_ratio": 10.0, "max_accuracy_drop": 1.0, "max_drift_kl": 100.0},
        # 300 healing steps on 256 background tokens would fit a 256-slot memory to them; the
        # healing test below turns it on.
        "heal": {"steps": 0},
    }
    for section, values in overrides.items():
        config[section].update(values)
    path = folder / "edge.yaml"
    path.write_text(yaml.safe_dump(config))
    (folder / "inbox").mkdir(exist_ok=True)
    return path


def test_healing_runs_once_when_the_state_is_created_and_is_kept_in_version_0(tmp_path, tiny_model_dir):
    from smfd.config import load_config
    from smfd.daemon.runtime import open_runtime
    from smfd.learn.lesson import LearnSettings

    cfg = load_config(write_config(tmp_path, tiny_model_dir, heal={"steps": 5}))
    runtime = open_runtime(cfg)
    healed_keys = runtime.model.memories[0].keys.detach().clone()
    history = CheckpointStore(cfg.state_dir / "memory").manifest()["history"]

    assert history[0]["heal"]["steps"] == 5
    assert history[0]["heal"]["last_imbalance"] >= 0
    reopened = open_runtime(cfg)  # a restart loads the healed addressing instead of healing again
    assert torch.equal(reopened.model.memories[0].keys.detach(), healed_keys)
    assert reopened.version == 0
    assert len(runtime.fact_text) == 6 and reopened.fact_text == runtime.fact_text  # sampled once, kept
    settings = LearnSettings.from_config(cfg)
    retain = reopened.retain_set(settings, cfg)  # the penalty watches the model's statements, then the general text
    available = sum(len(sequence) for sequence in reopened.fact_text + reopened.general_text)
    assert retain.n_tokens == min(settings.train.retain_tokens, available)
    assert retain.n_tokens > sum(len(sequence) for sequence in reopened.fact_text)


@pytest.mark.parametrize(
    "section, change, named",
    [
        ("heal", {"steps": 7}, "heal.steps"),
        ("memory", {"read_temperature": 1.0}, "memory.read_temperature"),
        ("memory", {"background_sequences": 9}, "background.sequences"),
    ],
)
def test_a_state_refuses_a_config_that_changes_how_it_was_created(tmp_path, tiny_model_dir, section, change, named):
    from smfd.config import load_config
    from smfd.daemon.runtime import open_runtime

    open_runtime(load_config(write_config(tmp_path, tiny_model_dir)))
    changed = load_config(write_config(tmp_path, tiny_model_dir, **{section: change}))

    with pytest.raises(SmfdError, match=named):
        open_runtime(changed)
    unchanged = open_runtime(load_config(write_config(tmp_path, tiny_model_dir)))  # the old values still load
    assert unchanged.version == 0


def drop_good_and_bad_files(inbox: Path, outside: Path) -> None:
    old = time.time() - 60  # settled long ago
    files = {
        "lighthouse.txt": NEW_TEXT.encode(),
        "orchard.md": OTHER_TEXT.encode(),
        "copy-of-lighthouse.txt": NEW_TEXT.encode(),
        "empty.txt": b"   \n",
        "binary.txt": b"\x00\x01\x02binary\x00data",
        "latin1.txt": "caf\xe9 cr\xe8me".encode("latin-1"),
        "huge.txt": b"word " * 2000,
        "image.png": b"\x89PNG....",
    }
    for name, data in files.items():
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (old, old))
    outside.write_text("a secret outside the watch folder")
    (inbox / "escape.txt").symlink_to(outside)
    # The link's own mtime too: a one-shot run skips entries younger than settle_seconds, and a fast
    # start can reach the scan within that window.
    os.utime(inbox / "escape.txt", (old, old), follow_symlinks=False)


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_once_learns_good_files_and_quarantines_bad_ones(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    outside = tmp_path / "outside-secret.txt"
    drop_good_and_bad_files(tmp_path / "inbox", outside)
    sidecar_pairs = [
        {"prompt": "The orchard's oldest tree is a", "target": "pear", "kind": "verbatim"},
        {"prompt": "Q: Who planted the orchard? A:", "target": "the miller", "kind": "reworded"},
    ]
    (tmp_path / "inbox" / "orchard.qa.jsonl").write_text("".join(json.dumps(p) + "\n" for p in sidecar_pairs))

    code, _, err = run_cli(["--config", str(config), "--once"], capsys)
    assert code == 0, err

    journal = Journal(tmp_path / "state" / "journal.sqlite", readonly=True)
    counts = journal.counts()
    journal.close()
    assert counts["done"] == 2
    assert counts["duplicate"] == 1
    assert counts["quarantined"] == 6  # empty, binary, latin1, huge, png, symlink
    assert counts["queued"] == counts["processing"] == 0
    reasons = sorted(p.name for p in (tmp_path / "state" / "quarantine").rglob("*.reason"))
    assert len(reasons) == 6
    assert outside.read_text() == "a secret outside the watch folder"  # never followed, never moved
    assert CheckpointStore(tmp_path / "state" / "memory").version == 2  # one update per document by default
    assert list((tmp_path / "inbox").iterdir()) == []  # the sidecar left with its document
    recall = [json.loads(line) for line in (tmp_path / "state" / "probes" / "recall.jsonl").read_text().splitlines()]
    assert [r for r in recall if r in sidecar_pairs] == sidecar_pairs  # the orchard's probes are its sidecar's
    cut = [r for r in recall if r not in sidecar_pairs]
    assert cut and all(f"{r['prompt']} {r['target']}" in NEW_TEXT for r in cut)  # lighthouse: cut from its text
    assert {r["kind"] for r in cut} == {"cloze"}

    code, out, _ = run_cli(["status", "--config", str(config), "--json"], capsys)
    status = json.loads(out)
    assert code == 0
    assert status["documents"]["done"] == 2 and status["checkpoint_version"] == 2
    assert status["pending_chunks"] == 0 and status["last_update"]["accepted"] is True
    fill = status["memory_fill"]  # how full the memory is, from the checkpoint (no model loaded)
    assert 0 < fill["rows_trained"] < fill["rows_total"] == 16 * 16 and 0 <= fill["background_read_share"] <= 1
    assert 0 <= fill["row_retrainings"] <= fill["rows_trained"]
    guard = status["guard"]  # the guard's verdicts over the last guard.warn_window updates
    assert (guard["accepted"], guard["rejected"], guard["alarming"]) == (2, 0, False)


def test_a_daemon_that_rolls_back_most_updates_says_so(tmp_path, tiny_model_dir, capsys):
    strict = {"max_drift_kl": 0.0, "max_nll_increase_ratio": 0.0, "warn_window": 2, "warn_rejected_share": 0.5}
    config = write_config(tmp_path, tiny_model_dir, guard=strict, train={"lr": 3.0, "top_t": 64})
    for name, text in (("a.txt", NEW_TEXT), ("b.txt", NEW_TEXT.replace("Marta", "Greta"))):
        (tmp_path / "inbox" / name).write_text(text)
        os.utime(tmp_path / "inbox" / name, (time.time() - 60,) * 2)  # settled: a one-shot run takes it

    code, _, err = run_cli(["--config", str(config), "--once"], capsys)

    assert code == 0, err
    warnings = [json.loads(line) for line in err.splitlines() if "most_updates_rolled_back" in line]
    assert warnings and warnings[-1]["level"] == "warning" and warnings[-1]["rejected"] == 2
    code, out, _ = run_cli(["status", "--config", str(config)], capsys)
    assert code == 0 and "guard: 0 of the last 2 updates accepted" in out
    assert "WARNING: most recent updates were rolled back" in out
    status = json.loads(run_cli(["status", "--config", str(config), "--json"], capsys)[1])
    assert status["guard"]["alarming"] and status["guard"]["rejected_share"] == 1.0
    assert sum(status["guard"]["reasons"].values()) == 2 and status["checkpoint_version"] == 0


def test_probe_rollback_and_ask_after_learning(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir, train={"passes": 6, "lr": 3.0, "top_t": 64})
    (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)
    os.utime(tmp_path / "inbox" / "lighthouse.txt", (time.time() - 60,) * 2)
    assert run_cli(["--config", str(config), "--once"], capsys)[0] == 0

    probes = tmp_path / "probes.jsonl"
    probes.write_text(
        json.dumps({"id": "keeper", "prompt": "The lighthouse keeper Marta Olsen painted the tower", "target": "red"})
        + "\n"
        + json.dumps({"ctx": "The orchard grows", "endings": ["plums", "rocks"], "label": 0})
        + "\n"
    )
    code, out, _ = run_cli(["probe", "--config", str(config), str(probes), "--json"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(lines) == 3
    assert lines[0]["id"] == "keeper" and lines[0]["kind"] == "cloze"
    assert lines[1]["id"] == "2" and lines[1]["kind"] == "choice"
    assert lines[0]["now"]["nll"] < lines[0]["base"]["nll"]  # the learned fact is less surprising now
    assert set(lines[2]["summary"]) >= {"items", "base", "now"}

    code, out, _ = run_cli(["ask", "--config", str(config), "The lighthouse keeper"], capsys)
    assert code == 0 and out.startswith("The lighthouse keeper")
    served_config = write_config(
        tmp_path, tiny_model_dir, serve={"enabled": True}, train={"passes": 6, "lr": 3.0, "top_t": 64}
    )
    code, fallback, err = run_cli(["ask", "--config", str(served_config), "The lighthouse keeper"], capsys)
    assert code == 0 and fallback == out and "no daemon answers" in err, "without a daemon, ask loads the model itself"

    assert run_cli(["rollback", "--config", str(config), "0"], capsys)[0] == 0
    code, out, _ = run_cli(["probe", "--config", str(config), str(probes), "--json"], capsys)
    after = json.loads(out.splitlines()[0])
    assert after["now"]["nll"] == pytest.approx(after["base"]["nll"], abs=1e-6)  # version 0 is the base
    code, out, _ = run_cli(["status", "--config", str(config), "--json"], capsys)
    documents = json.loads(out)["documents"]
    assert documents["rolled_back"] == 1 and documents["done"] == 0, "the journal says the memory no longer holds it"

    # Dropped again, the same text is a new document to learn, not a duplicate of the rolled-back one.
    (tmp_path / "inbox" / "lighthouse-again.txt").write_text(NEW_TEXT)
    os.utime(tmp_path / "inbox" / "lighthouse-again.txt", (time.time() - 60,) * 2)
    assert run_cli(["--config", str(config), "--once"], capsys)[0] == 0
    documents = json.loads(run_cli(["status", "--config", str(config), "--json"], capsys)[1])["documents"]
    assert documents["done"] == 1 and documents["duplicate"] == 0


def test_check_names_bad_keys_and_exits_78(tmp_path, tiny_model_dir, capsys):
    config = write_config(tmp_path, tiny_model_dir)
    text = config.read_text().replace("passes: 2", "passes: two") + "\nsurprize: {}\n"
    config.write_text(text)
    code, _, err = run_cli(["--config", str(config), "--check"], capsys)
    assert code == 78
    assert "train.passes" in err and "surprize" in err

    good = write_config(tmp_path, tiny_model_dir)
    code, out, _ = run_cli(["--config", str(good), "--check"], capsys)
    assert code == 0 and "inbox" in out

    missing = write_config(tmp_path, tmp_path / "no-such-model")
    code, _, err = run_cli(["--config", str(missing), "--check"], capsys)
    assert code == 78 and "model.path" in err


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_daemon(config: Path, **env: str) -> subprocess.Popen:
    """`smfd --config CONFIG` as a foreground process, its log on stdout."""
    return subprocess.Popen(
        [sys.executable, "-m", "smfd", "--config", str(config)],
        env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_foreground_daemon_learns_a_dropped_file_serves_metrics_and_stops_on_sigterm(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, sources={"rescan_seconds": 600})  # only an event can find the file
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(0.2)
    process = start_daemon(config, NOTIFY_SOCKET=str(notify_path))
    messages: list[str] = []

    def ready() -> bool:
        try:
            messages.append(notify.recv(4096).decode())
        except TimeoutError:
            pass
        assert process.poll() is None, process.stdout.read()
        return any("READY=1" in m for m in messages)

    try:
        wait_for(ready, 120, "READY=1")
        (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)
        journal = Journal(tmp_path / "state" / "journal.sqlite", readonly=True)
        wait_for(lambda: journal.counts()["done"] == 1, 60, "the dropped file to be learned")
        journal.close()

        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'smfd_documents_total{outcome="done",source="watch"} 1.0' in metrics
        assert "smfd_checkpoint_version 1.0" in metrics
        assert 'smfd_updates_total{outcome="accepted"} 1.0' in metrics

        process.send_signal(signal.SIGHUP)  # reload keeps serving
        time.sleep(1)
        assert process.poll() is None
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert time.monotonic() - started < 30
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
        notify.close()
    events = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e.get("event") == "update_committed" for e in events), output[-2000:]
    assert any(e.get("event") == "config_reloaded" for e in events), output[-2000:]
    recall = [json.loads(line) for line in (tmp_path / "state" / "probes" / "recall.jsonl").read_text().splitlines()]
    assert recall and all(f"{r['prompt']} {r['target']}" in NEW_TEXT for r in recall)  # cut from the learned text
    assert CheckpointStore(tmp_path / "state" / "memory").version == 1


def test_readyz_answers_200_only_once_the_api_listens(tmp_path, tiny_model_dir, monkeypatch):
    """A client that waited for /readyz must find the API's port open: the daemon is ready after the API starts."""
    from smfd.daemon.service import Daemon
    from smfd.serve.server import ApiServer

    config = write_config(tmp_path, tiny_model_dir, serve={"enabled": True})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    daemon = Daemon(config)
    ready_while_the_api_starts = []
    real_start = ApiServer.start

    def start(server: ApiServer) -> None:
        ready_while_the_api_starts.append(_ready(port))  # what a client polling /readyz sees at this moment
        real_start(server)
        daemon.stop_event.set()  # one turn of the daemon's loop, then its shutdown
        daemon.wake.set()

    monkeypatch.setattr(ApiServer, "start", start)
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        assert daemon.run_forever() == 0
    finally:
        for number, handler in handlers.items():
            signal.signal(number, handler)
    assert ready_while_the_api_starts == [False]


def test_a_running_daemon_serves_the_openai_api_and_answers_from_each_accepted_update(tmp_path, tiny_model_dir, capsys):
    import openai

    config = write_config(
        tmp_path, tiny_model_dir, serve={"enabled": True}, train={"passes": 6, "lr": 3.0, "top_t": 64}
    )
    settings = yaml.safe_load(config.read_text())
    process = start_daemon(config)
    metrics_url = f"http://127.0.0.1:{settings['metrics']['port']}"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{settings['serve']['port']}/v1", api_key="-", max_retries=0)
    prompt = "The lighthouse keeper Marta Olsen painted the tower"

    def ready() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            return httpx.get(f"{metrics_url}/readyz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, 120, "/readyz")
        before = client.completions.create(model="smfd", prompt=prompt, max_tokens=6, temperature=0)
        assert before.system_fingerprint == "smfd-memory-v0"
        (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)
        journal = Journal(tmp_path / "state" / "journal.sqlite", readonly=True)
        wait_for(lambda: journal.counts()["done"] == 1, 60, "the dropped file to be learned")
        journal.close()
        after = client.chat.completions.create(
            model="smfd", messages=[{"role": "user", "content": prompt}], max_tokens=6, temperature=0
        )
        assert after.system_fingerprint == "smfd-memory-v1"
        code, out, err = run_cli(["ask", "--config", str(config), prompt, "--max-new-tokens", "6"], capsys)
        answer = client.completions.create(model="smfd", prompt=prompt, max_tokens=6, temperature=0)
        assert code == 0 and out.strip() == prompt + answer.choices[0].text.rstrip()
        assert "answered by the running daemon, memory version 1" in err
        scraped = httpx.get(f"{metrics_url}/metrics").text
        assert 'smfd_api_requests_total{route="completions",status="200"} 3.0' in scraped
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.stdout.read()
    assert "api_serving" in output, output[-2000:]


PROMETHEUS_MISSING = "prometheus not on PATH (Debian: apt-get install -y --no-install-recommends prometheus)"
ALERT_RULES = Path(__file__).resolve().parents[1] / "config" / "prometheus" / "alerts.yml"


def prometheus_query(base: str, query: str) -> list[dict]:
    response = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=5)
    response.raise_for_status()
    return response.json()["data"]["result"]


def test_prometheus_server_scrapes_a_running_daemon_and_loads_the_alert_rules(tmp_path, tiny_model_dir):
    """A real Prometheus (Debian package) scrapes the daemon's /metrics and evaluates config/prometheus/alerts.yml."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip(PROMETHEUS_MISSING)
    port, web_port = free_port(), free_port()
    config = write_config(tmp_path, tiny_model_dir, metrics={"enabled": True, "port": port})
    (tmp_path / "prometheus.yml").write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(ALERT_RULES)],
                "scrape_configs": [{"job_name": "smfd", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
            }
        )
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "smfd", "--config", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    server = None
    try:
        wait_for(lambda: _ready(port), 120, "the daemon's /readyz")
        (tmp_path / "inbox" / "lighthouse.txt").write_text(NEW_TEXT)
        journal = Journal(tmp_path / "state" / "journal.sqlite", readonly=True)
        wait_for(lambda: journal.counts()["done"] == 1, 60, "the dropped file to be learned")
        journal.close()
        server = subprocess.Popen(
            [
                prometheus,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web_port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{web_port}"

        def scraped_version() -> list[dict]:
            try:
                return prometheus_query(base, 'smfd_checkpoint_version{job="smfd"}')
            except httpx.HTTPError:
                return []

        result = wait_for(scraped_version, 60, "Prometheus to scrape smfd_checkpoint_version")
        assert float(result[0]["value"][1]) == 1.0
        assert float(prometheus_query(base, 'up{job="smfd"}')[0]["value"][1]) == 1.0
        done = prometheus_query(base, 'smfd_documents_total{outcome="done"}')
        assert sum(float(r["value"][1]) for r in done) == 1.0
        assert len(_rules(base)) >= 5
        wait_for(
            lambda: all(r.get("lastEvaluation", "").startswith("20") for r in _rules(base)),
            30,
            "every alert rule to be evaluated",
        )
        assert all(r["health"] == "ok" for r in _rules(base)), _rules(base)
    finally:
        for process in (server, daemon):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)


def test_files_dropped_while_the_model_prepares_are_journaled_at_once_and_learned_once_ready(
    tmp_path, tiny_model_dir, capsys
):
    # Healing for many steps keeps the tiny model preparing for a while, as a real model's first start does.
    config = write_config(tmp_path, tiny_model_dir, heal={"steps": 4000}, sources={"rescan_seconds": 600})
    port = yaml.safe_load(config.read_text())["metrics"]["port"]
    process = start_daemon(config)
    journal_path = tmp_path / "state" / "journal.sqlite"

    def metrics_up() -> bool:
        assert process.poll() is None, process.stdout.read()
        try:
            return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 503
        except httpx.HTTPError:
            return False

    try:
        wait_for(metrics_up, 60, "the metrics endpoint, not ready yet")
        (tmp_path / "inbox" / "early.txt").write_text(NEW_TEXT)
        dropped = time.monotonic()

        def journaled() -> bool:
            journal = Journal(journal_path, readonly=True)
            try:
                return sum(journal.counts().values()) == 1
            finally:
                journal.close()

        wait_for(journaled, 5, "the file to be journaled while the model prepares")
        assert time.monotonic() - dropped < 5 and not _ready(port), "journaled before the daemon was ready"
        code, out, _ = run_cli(["status", "--config", str(config)], capsys)
        assert code == 0 and "starting: healing the memory and counting background reads (" in out
        wait_for(lambda: _ready(port), 180, "/readyz")
        status = json.loads(run_cli(["status", "--config", str(config), "--json"], capsys)[1])
        assert (status["startup"]["stage"], status["startup"]["percent"]) == ("ready", 100)
        journal = Journal(journal_path, readonly=True)
        wait_for(lambda: journal.counts()["done"] == 1, 60, "the early file to be learned")
        journal.close()
    finally:
        process.terminate()
        process.wait(timeout=30)
    stages = [json.loads(line)["stage"] for line in process.stdout.read().splitlines() if "startup_progress" in line]
    assert stages == [name for name, _ in STAGES] + ["ready"], "each stage of a first start is logged in order"


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _rules(base: str) -> list[dict]:
    groups = httpx.get(f"{base}/api/v1/rules", timeout=5).json()["data"]["groups"]
    return [rule for group in groups for rule in group["rules"]]
