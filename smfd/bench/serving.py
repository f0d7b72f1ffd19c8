"""What serving costs, and what it costs the learner:
`python -m smfd.bench.serving --config FILE --doc FILE [--state-dir DIR] [--out FILE]`.

In one process, on an existing state (start the daemon once to make it; the run changes its
memory and rolls it back, so give it a copy):
1. idle: time to first token of a 30-token prompt through the API (streamed, first text chunk,
   as a client sees it) against a bare `model.generate` of one token on the same prompt; and
   generated tokens/s of a 128-token answer through the API against bare `generate`;
2. one update learning `--doc` with the daemon's guard, with no requests, then (the memory rolled
   back in between) with a streamed chat request arriving every second, under each
   `serve.during_update` policy: the update's wall time, requests answered of those sent, and
   their time to first token.
Prints the results as JSON (and writes them to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

from smfd.config import load_config
from smfd.daemon.health import Heartbeats
from smfd.daemon.probing import Probing
from smfd.daemon.runtime import open_runtime
from smfd.errors import SmfdError
from smfd.ingest.extract import content_hash
from smfd.ingest.journal import Journal
from smfd.learn.budget import MemoryBudget
from smfd.learn.gate import ModelGate
from smfd.learn.learner import Learner, LearnSettings
from smfd.observe.metrics import Metrics
from smfd.serve.server import ApiServer

PROMPT_SOURCE = (
    "The old lighthouse on the northern cape was built from grey granite in the last years of the century, "
    "and its keepers wrote down every ship, storm and fog bank they saw in a series of leather logbooks."
)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _stream_first_token(url: str, model: str, body: dict) -> float:
    """Seconds from sending a streamed request to its first chunk carrying text (the stream is read to its end)."""
    started = time.perf_counter()
    first = None
    with httpx.stream("POST", url, json={**body, "model": model, "stream": True}, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is not None or not line.startswith("data: {"):
                continue
            choice = (json.loads(line[6:])["choices"] or [{}])[0]
            if choice.get("text") or choice.get("delta", {}).get("content"):
                first = time.perf_counter() - started
    if first is None:
        raise SmfdError("the stream ended without text")
    return first


def idle(learner: Learner, base_url: str, model_name: str, rounds: int) -> dict:
    tokenizer, model = learner.model.tokenizer, learner.model.model
    ids = tokenizer(PROMPT_SOURCE, add_special_tokens=False).input_ids[:30]
    prompt = tokenizer.decode(ids)
    tensor = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
    bare_first, api_first, bare_rate, api_rate = [], [], [], []
    for _ in range(rounds):  # interleaved, so the machine's drift reaches both alike
        started = time.perf_counter()
        learner.gate.run(
            model.generate, tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=1, do_sample=False
        )
        bare_first.append(time.perf_counter() - started)
        api_first.append(
            _stream_first_token(
                f"{base_url}/completions", model_name, {"prompt": prompt, "max_tokens": 1, "temperature": 0}
            )
        )
    for _ in range(max(2, rounds // 4)):
        started = time.perf_counter()
        out = learner.gate.run(
            model.generate, tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=128, do_sample=False
        )
        bare_rate.append((out.shape[1] - tensor.shape[1]) / (time.perf_counter() - started))
        started = time.perf_counter()
        answer = httpx.post(
            f"{base_url}/completions",
            json={"model": model_name, "prompt": prompt, "max_tokens": 128, "temperature": 0},
            timeout=600,
        ).json()
        api_rate.append(answer["usage"]["completion_tokens"] / (time.perf_counter() - started))
    chat = [_stream_first_token(f"{base_url}/chat/completions", model_name, CHAT_BODY) for _ in range(rounds)]
    first = {"bare_generate_s": statistics.median(bare_first), "api_stream_s": statistics.median(api_first)}
    rate = {"bare_generate_tok_s": statistics.median(bare_rate), "api_tok_s": statistics.median(api_rate)}
    return {
        "prompt_tokens": tensor.shape[1],
        "rounds": rounds,
        "first_token": {**first, "ratio": first["api_stream_s"] / first["bare_generate_s"]},
        "tokens_per_second": {**rate, "ratio": rate["api_tok_s"] / rate["bare_generate_tok_s"]},
        "chat_first_token": {"p50_s": _quantile(chat, 0.5), "p95_s": _quantile(chat, 0.95)},  # the request used below
    }


CHAT_BODY = {"messages": [{"role": "user", "content": "Name a colour of the sea."}], "max_tokens": 16, "temperature": 0}


class Requests:
    """A streamed chat request every `interval` seconds, each on its own thread, until stopped."""

    def __init__(self, url: str, model: str, interval: float) -> None:
        self.url, self.model, self.interval = url, model, interval
        self.first_token: list[float] = []
        self.failed: list[str] = []
        self.sent = 0
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.loop = threading.Thread(target=self._send_loop)

    def _one(self) -> None:
        try:
            self.first_token.append(_stream_first_token(self.url, self.model, CHAT_BODY))
        except (httpx.HTTPError, SmfdError) as exc:
            self.failed.append(str(exc))

    def _send_loop(self) -> None:
        while not self.stop.is_set():
            thread = threading.Thread(target=self._one)
            thread.start()
            self.threads.append(thread)
            self.sent += 1
            self.stop.wait(self.interval)

    def __enter__(self) -> Requests:
        self.loop.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.loop.join()
        for thread in self.threads:
            thread.join(timeout=600)

    def summary(self) -> dict:
        return {
            "sent": self.sent,
            "answered": len(self.first_token),
            "failed": self.failed[:3],
            "first_token_p50_s": _quantile(self.first_token, 0.5),
            "first_token_p95_s": _quantile(self.first_token, 0.95),
        }


def updates(learner: Learner, probing: Probing, doc: str, base_url: str, model_name: str, work: Path) -> list[dict]:
    """The same document learned from the same memory: once to warm up, alone, then under each policy."""
    runs = []
    for index, policy in enumerate(("warm-up", None, "pause_learner", "wait")):
        learner.gate.yield_to_requests = policy == "pause_learner"
        start_version = learner.store.version
        text = doc + "\n" * index  # a new document each time (same chunks), not a duplicate
        spool = work / f"doc-{index}.txt"
        spool.write_text(text, encoding="utf-8")
        learner.journal.add_document(content_hash(text), "watch", spool.name, spool, len(text.encode()))
        requests = (
            Requests(f"{base_url}/chat/completions", model_name, 1.0) if policy in ("pause_learner", "wait") else None
        )
        started = time.perf_counter()
        if requests is not None:
            with requests:
                outcome = learner.gate.run(learner.update, guard=probing.check)
        else:
            outcome = learner.gate.run(learner.update, guard=probing.check)
        seconds = time.perf_counter() - started
        if learner.store.version > start_version:
            learner.gate.run(learner.store.rollback, learner.model, start_version)
        run = {
            "policy": policy or "no requests",
            "update_s": seconds,
            "accepted": outcome.accepted,
            "steps": outcome.steps,
        }
        if requests is not None:
            run.update(requests.summary())
        runs.append(run)
        print(json.dumps(run), file=sys.stderr)
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smfd.bench.serving", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--doc", type=Path, required=True, help="a text document to learn (about 1 KB)")
    parser.add_argument("--state-dir", type=Path, help="the state to use (default: the config's); it is changed")
    parser.add_argument("--rounds", type=int, default=12, help="idle measurements of each kind")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    environ = dict(os.environ)
    if args.state_dir is not None:  # as the environment would set it, so the model cache follows it
        environ["SMFD_STATE_DIR"] = str(args.state_dir.resolve())
    cfg = load_config(args.config, environ)
    serve = cfg.serve.model_copy(update={"enabled": True, "port": 0, "api_key_file": None})
    gate = ModelGate()
    runtime = gate.run(open_runtime, cfg, False)
    metrics = Metrics()
    probing = Probing(cfg, metrics, Heartbeats())
    gate.run(probing.start, runtime.model)
    gate.run(probing.establish)
    settings = LearnSettings.from_config(cfg)
    budget = MemoryBudget(runtime.model.device, cfg.budget.ram_mb, cfg.budget.vram_mb)
    work = Path(cfg.state_dir) / "serving-bench"
    work.mkdir(exist_ok=True)
    with Journal(work / f"journal-{int(time.time())}.sqlite") as journal:
        retain = gate.run(runtime.retain_set, settings, cfg)
        learner = Learner(runtime.model, runtime.background, runtime.store, journal, settings, budget, retain, gate)
        learner.gate.run(learner.plan_batch_size)
        server = ApiServer(learner, serve, metrics.api)
        server.start()
        base_url = f"http://127.0.0.1:{server.port}/v1"
        try:
            result = {
                "threads": learner.gate.run(torch.get_num_threads),
                "idle": idle(learner, base_url, serve.model_name, args.rounds),
                "updates": updates(
                    learner, probing, args.doc.read_text(encoding="utf-8"), base_url, serve.model_name, work
                ),
            }
        finally:
            server.stop()
            gate.shutdown()
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except SmfdError as exc:
        print(f"smfd: error: {exc}", file=sys.stderr)
        sys.exit(2)
