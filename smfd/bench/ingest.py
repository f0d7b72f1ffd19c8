"""Daemon ingestion benchmark: time from a file dropped into a running daemon's watch folder to
learned (journal done, checkpoint written), and resident memory while a flood of files is learned.

    python -m smfd.bench.ingest latency --config config/edge.yaml --text FILE [--state-dir DIR]
    python -m smfd.bench.ingest flood --config config/edge.yaml --files 1000 [--state-dir DIR]
    python -m smfd.bench.ingest docs --config config/edge.yaml --docs fictional_knowledge.json [--limit-docs N]

`docs` drops fictional-knowledge documents (each with a NAME.qa.jsonl sidecar of its memorization
and paraphrase probes) into the watch folder, waits until all are learned and one full probe run
has followed, then reads back what the dashboard shows: retention per suite against the base
reference, drift, recall, rollbacks.

The daemon runs as a real subprocess (`smfd --config ...`) with its own state folder; READY=1 is
read from a notify socket, progress from the journal, memory from /proc/PID/status.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from smfd.ingest.journal import Journal
from smfd.paths import StatePaths
from smfd.text.sentences import split_sentences


def _memory_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


class RunningDaemon:
    def __init__(self, config: Path, state_dir: Path, extra_env: dict[str, str]) -> None:
        self.state_dir = state_dir
        self.sock_path = Path(tempfile.mkdtemp()) / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.sock_path))
        self.sock.settimeout(1.0)
        env = {**os.environ, "NOTIFY_SOCKET": str(self.sock_path), "SMFD_STATE_DIR": str(state_dir), **extra_env}
        self.log = open(state_dir.parent / f"{state_dir.name}-daemon.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "smfd", "--config", str(config)], env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def wait_ready(self, timeout: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"daemon exited with {self.process.returncode}; see {self.log.name}")
            try:
                if b"READY=1" in self.sock.recv(4096):
                    threading.Thread(target=self._drain, daemon=True).start()  # keep reading, as systemd does
                    return time.monotonic() - started
            except TimeoutError:
                continue
        raise SystemExit(f"daemon not ready after {timeout} s")

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=120)
        self.sock.close()
        self.log.close()
        return code


def _journal_counts(state_dir: Path) -> dict[str, int]:
    journal = Journal(StatePaths(state_dir).journal, readonly=True)
    try:
        return journal.counts()
    finally:
        journal.close()


def latency(args: argparse.Namespace) -> dict:
    text = Path(args.text).read_text(encoding="utf-8")[: args.bytes]
    text = text[: text.rfind(".") + 1] or text
    daemon = RunningDaemon(args.config, args.state_dir, {})
    ready_s = daemon.wait_ready(args.ready_timeout)
    inbox = Path(args.inbox)
    time.sleep(2)  # let the first (empty) update pass
    done_before = _journal_counts(args.state_dir)["done"]
    requests = _api_requests(args)
    dropped = time.monotonic()
    (inbox / "one-kilobyte.txt").write_text(text)
    learned_s = None
    with requests or contextlib.nullcontext():
        while time.monotonic() - dropped < args.timeout:
            if _journal_counts(args.state_dir)["done"] > done_before:
                learned_s = time.monotonic() - dropped
                break
            time.sleep(0.5)
    code = daemon.stop()
    probes = args.state_dir.parent / "latency-probes.jsonl"
    with open(probes, "w") as handle:
        for n, sentence in enumerate(split_sentences(text)):
            words = sentence.rstrip(" .").split()
            if len(words) >= 6:
                handle.write(
                    json.dumps({"id": f"s{n}", "prompt": " ".join(words[:-2]), "target": " ".join(words[-2:])}) + "\n"
                )
    probe = subprocess.run(
        [sys.executable, "-m", "smfd", "probe", "--config", str(args.config), str(probes), "--json"],
        env={**os.environ, "SMFD_STATE_DIR": str(args.state_dir)},
        capture_output=True,
        text=True,
    )
    summary = json.loads(probe.stdout.splitlines()[-1])["summary"] if probe.returncode == 0 else probe.stderr
    last = Journal(StatePaths(args.state_dir).journal, readonly=True)
    update = last.last_update()
    last.close()
    return {
        "bytes": len(text.encode()),
        "api_requests": None if requests is None else requests.summary(),
        "ready_seconds": round(ready_s, 1),
        "learned_seconds": None if learned_s is None else round(learned_s, 1),
        "exit_code": code,
        "probe_summary": summary,
        "last_update": None
        if update is None
        else {
            "accepted": update.accepted,
            "seconds": round(update.seconds, 1),
            "probe_seconds": update.measures.get("probe_seconds"),
        },
    }


def _api_requests(args: argparse.Namespace):
    """With --requests-per-second: streamed chat requests to the daemon's API while the file is learned."""
    if not args.requests_per_second:
        return None
    from smfd.bench.serving import Requests
    from smfd.config import load_config
    from smfd.serve.client import api_url

    serve = load_config(args.config, {**os.environ, "SMFD_STATE_DIR": str(args.state_dir)}).serve
    if not serve.enabled:
        raise SystemExit("--requests-per-second needs serve.enabled in the config")
    return Requests(f"{api_url(serve)}/chat/completions", serve.model_name, 1.0 / args.requests_per_second)


def _scrape(port: int) -> dict[str, float]:
    """The daemon's exposition as {'name{labels}': value} (comments and created-timestamps left out)."""
    import httpx

    samples = {}
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#") and "_created" not in line:
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def docs(args: argparse.Namespace) -> dict:
    from smfd.bench.data import load_documents
    from smfd.config import load_config

    documents = load_documents(args.docs, args.limit_docs)
    port = load_config(args.config).metrics.port
    # One full probe run shortly after learning, so the retention panels have a point to show.
    daemon = RunningDaemon(
        args.config, args.state_dir, {"SMFD_SCHEDULE__PROBE_INTERVAL_SECONDS": str(args.probe_interval)}
    )
    ready_s = daemon.wait_ready(args.ready_timeout)
    inbox = Path(args.inbox)
    started = time.monotonic()
    for n, document in enumerate(documents):
        pairs = [
            {"prompt": p.prompt, "target": p.target, "kind": label}
            for kind, label in (("mem", "verbatim"), ("gen", "reworded"))
            for p in document.probes.get(kind, ())
        ]
        (inbox / f"doc-{n:03d}.qa.jsonl").write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        (inbox / f"doc-{n:03d}.txt").write_text(document.text)
    done_s = None
    while time.monotonic() - started < args.timeout:
        counts = _journal_counts(args.state_dir)
        if counts["done"] + counts["quarantined"] + counts["duplicate"] >= len(documents):
            done_s = time.monotonic() - started
            break
        time.sleep(2.0)
    probe_runs = _scrape(port).get("smfd_probe_duration_seconds_count", 0.0)
    deadline = time.monotonic() + args.probe_interval * 2 + 600
    while time.monotonic() < deadline and _scrape(port).get("smfd_probe_duration_seconds_count", 0.0) <= probe_runs + 1:
        time.sleep(5.0)  # the guard's fast run counts too: wait for one more, the scheduled full run
    metrics = _scrape(port)
    memory = _memory_kib(daemon.process.pid)  # VmHWM: the peak of the daemon's whole life, first start included
    code = daemon.stop()
    panels = {
        key: value
        for key, value in metrics.items()
        if key.startswith(
            (
                "smfd_probe_accuracy",
                "smfd_probe_base",
                "smfd_probe_nll",
                "smfd_drift_kl",
                "smfd_recall",
                "smfd_rollbacks_total",
                "smfd_updates_total",
                "smfd_checkpoint_version",
            )
        )
    }
    last = Journal(StatePaths(args.state_dir).journal, readonly=True)
    update = last.last_update()
    last.close()
    return {
        "documents": len(documents),
        "ready_seconds": round(ready_s, 1),
        "learned_seconds": done_s and round(done_s, 1),
        "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "state_mib": round(_state_bytes(args.state_dir) / 2**20, 1),
        "counts": _journal_counts(args.state_dir),
        "dashboard": panels,
        "exit_code": code,
        "last_update": None
        if update is None
        else {"accepted": update.accepted, "seconds": round(update.seconds, 1), "measures": update.measures},
    }


def _state_bytes(state_dir: Path) -> int:
    """Bytes of a state folder, its model cache left out (the converted base weights, shared by any state)."""
    cache = StatePaths(state_dir).model_cache
    return sum(f.stat().st_size for f in state_dir.rglob("*") if f.is_file() and cache not in f.parents)


def flood(args: argparse.Namespace) -> dict:
    daemon = RunningDaemon(args.config, args.state_dir, {})
    daemon.wait_ready(args.ready_timeout)
    inbox = Path(args.inbox)
    staging = Path(tempfile.mkdtemp(dir=inbox.parent))
    for i in range(args.files):
        (staging / f"note-{i:05d}.txt").write_text(
            f"Note {i}: the storage locker number {i} at the north depot holds crate {i * 7 % 1000} of blue tiles."
        )
    started = time.monotonic()
    for path in staging.iterdir():
        path.rename(inbox / path.name)
    staging.rmdir()
    samples, journaled_s, done_s = [], None, None
    while time.monotonic() - started < args.timeout:
        counts = _journal_counts(args.state_dir)
        samples.append(_memory_kib(daemon.process.pid))
        if journaled_s is None and sum(counts.values()) >= args.files:
            journaled_s = time.monotonic() - started
        if counts["done"] + counts["duplicate"] + counts["quarantined"] >= args.files:
            done_s = time.monotonic() - started
            break
        time.sleep(1.0)
    peak = max(s.get("VmHWM", 0) for s in samples)
    code = daemon.stop()
    return {
        "files": args.files,
        "journaled_seconds": journaled_s and round(journaled_s, 1),
        "learned_seconds": done_s and round(done_s, 1),
        "counts": _journal_counts(args.state_dir),
        "peak_rss_mib": round(peak / 1024, 1),
        "rss_mib_samples": [round(s["VmRSS"] / 1024) for s in samples[:: max(1, len(samples) // 20)]],
        "exit_code": code,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m smfd.bench.ingest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=("latency", "flood", "docs"))
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--state-dir", type=Path, default=None, help="fresh state folder (default: a temporary one)")
    parser.add_argument(
        "--inbox", type=Path, default=None, help="the config's watch folder (default: <config dir>/inbox)"
    )
    parser.add_argument("--text", type=Path, help="latency: text to drop (its first --bytes bytes)")
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument(
        "--requests-per-second", type=float, default=0, help="latency: API chat requests sent meanwhile (0: none)"
    )
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--docs", type=Path, help="docs: fictional-knowledge JSON to learn")
    parser.add_argument("--limit-docs", type=int, default=None)
    parser.add_argument("--probe-interval", type=float, default=60, help="docs: full probe run interval (s)")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--ready-timeout", type=float, default=900)
    args = parser.parse_args(argv)
    args.config = args.config.resolve()
    args.inbox = (args.inbox or args.config.parent / "inbox").resolve()
    args.inbox.mkdir(parents=True, exist_ok=True)
    args.state_dir = (args.state_dir or Path(tempfile.mkdtemp()) / "state").resolve()
    if args.mode == "docs" and args.docs is None:
        parser.error("docs needs --docs FILE")
    result = {"latency": latency, "flood": flood, "docs": docs}[args.mode](args)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
