"""The OpenAI-compatible API, driven by the official `openai` client against a real uvicorn server on
the tiny model. A user relies on: the answers are the model's own, an update in progress or rolled
back is never visible and an accepted one is from the next request, bad requests get OpenAI-style
errors, and nothing a client does stops the learner or writes to the state."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch
from test_learner import SETTINGS, submit

from smfd.config import ServeSection
from smfd.guard.verdict import RollbackReason, Verdict
from smfd.ingest.journal import Journal
from smfd.learn.learner import Learner
from smfd.model.scoring import greedy_continuations
from smfd.observe.metrics import Metrics
from smfd.serve.server import ApiServer
from smfd.store.checkpoint import CheckpointStore

MODEL = "smfd-test"
PROMPT = "The harbour bridge was designed by"
FACT = (
    "Harbour news\n\nThe harbour bridge was painted bright orange by Zelda Quint in 2019. "
    "The paint came from a small factory near the old fishing port."
)
FACT_PROMPT = "The harbour bridge was painted bright orange by"


class Served:
    """A learner with the API in front of it."""

    def __init__(self, learner: Learner, server: ApiServer, metrics: Metrics) -> None:
        self.learner = learner
        self.server = server
        self.metrics = metrics
        self.url = f"http://127.0.0.1:{server.port}/v1"

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def greedy(self, prompt: str, tokens: int) -> str:
        model = self.learner.model
        return greedy_continuations(model.model, model.tokenizer, [prompt], tokens)[0]


def serve(learner: Learner, **settings) -> Served:
    metrics = Metrics(process_metrics=False)
    section = ServeSection(enabled=True, port=0, model_name=MODEL, **settings)
    server = ApiServer(learner, section, metrics.api)
    server.start()
    return Served(learner, server, metrics)


@pytest.fixture
def served(tiny_memory_model, background, store, journal) -> Iterator[Served]:
    running = serve(Learner(tiny_memory_model, background, store, journal, SETTINGS))
    yield running
    running.server.stop()


def test_the_openai_client_lists_the_model_and_gets_the_models_own_completion(served):
    client = served.client()
    assert [m.id for m in client.models.list().data] == [MODEL]
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    completion = raw.parse()
    assert completion.choices[0].text == served.greedy(PROMPT, 8)
    assert raw.headers["x-smfd-memory-version"] == "0" and completion.system_fingerprint == "smfd-memory-v0"
    prompt_tokens = len(served.learner.model.tokenizer(PROMPT, add_special_tokens=False).input_ids)
    assert completion.usage.prompt_tokens == prompt_tokens
    assert completion.usage.total_tokens == prompt_tokens + completion.usage.completion_tokens
    assert completion.choices[0].finish_reason in ("stop", "length")
    metrics = served.metrics.render().decode()
    assert 'smfd_api_requests_total{route="completions",status="200"} 1.0' in metrics


def test_a_streamed_chat_answer_is_the_full_answer_in_pieces(served):
    client = served.client()
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPT}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.role == "assistant"
    assert text == full.choices[0].message.content != ""
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_a_stop_string_ends_the_answer_before_it_streamed_or_not(served):
    client = served.client()
    whole = served.greedy(PROMPT, 16)
    stop = whole[len(whole) // 2 : len(whole) // 2 + 3]
    expected = whole[: whole.index(stop)]
    answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].text == expected and answer.choices[0].finish_reason == "stop"
    stream = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_a_seed_repeats_a_sampled_answer(served):
    client = served.client()

    def sample(seed: int) -> str:
        answer = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
        return answer.choices[0].text

    torch.manual_seed(123)
    outside = torch.rand(1)
    torch.manual_seed(123)
    assert sample(7) == sample(7)
    assert torch.equal(torch.rand(1), outside), "a seeded request must not reseed anyone else's random numbers"


def test_a_wrong_or_missing_key_is_refused_and_the_right_one_works(
    tiny_memory_model, background, store, journal, tmp_path
):
    key_file = tmp_path / "api.key"
    key_file.write_text("s3cret-key\n")
    running = serve(Learner(tiny_memory_model, background, store, journal, SETTINGS), api_key_file=key_file)
    try:
        with pytest.raises(openai.AuthenticationError):
            running.client("wrong").models.list()
        assert httpx.get(f"{running.url}/models").status_code == 401
        assert [m.id for m in running.client("s3cret-key").models.list().data] == [MODEL]
    finally:
        running.server.stop()


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/completions", b'{"model": "smfd-test", "prompt": ', 400, None),
        ("/completions", b'{"model": "smfd-test", "prompt": "caf\xe9"}', 400, None),
        ("/completions", b'{"model": "other", "prompt": "x"}', 404, "model"),
        ("/completions", b'{"model": "smfd-test", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
        ("/completions", b'{"model": "smfd-test", "prompt": "x", "max_tokens": 100000}', 400, "max_tokens"),
        ("/completions", b'{"model": "smfd-test", "prompt": "' + b"word " * 400 + b'"}', 400, "prompt"),
        ("/completions", b'{"model": "smfd-test", "prompt": ["a", "b"]}', 400, "prompt"),
        ("/completions", b'{"model": "smfd-test", "prompt": "x", "temperature": 5}', 400, "temperature"),
        (
            "/chat/completions",
            b'{"model": "smfd-test", "messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "messages.0.role",
        ),
        ("/chat/completions", b'{"model": "smfd-test", "messages": []}', 400, "messages"),
        ("/completions", b'{"model": "smfd-test", "prompt": "' + b"x" * 2_000_000 + b'"}', 413, None),
        ("/embeddings", b"{}", 404, None),
    ],
)
def test_bad_requests_get_openai_style_errors_and_change_nothing(served, store, path, body, status, param):
    files_before = sorted(p.name for p in store.folder.rglob("*"))
    response = httpx.post(f"{served.url}{path}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param
    answer = served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer.choices[0].text == served.greedy(PROMPT, 4), "the server goes on answering"
    assert sorted(p.name for p in store.folder.rglob("*")) == files_before and store.version == 0


def test_past_max_concurrent_a_request_gets_429_with_retry_after(tiny_memory_model, background, store, journal):
    learner = Learner(tiny_memory_model, background, store, journal, SETTINGS)
    running = serve(learner, max_concurrent=1)
    answers: list = []
    try:
        with learner.gate.learner():  # the learner is busy: the first request waits in the queue
            waiting = threading.Thread(
                target=lambda: answers.append(
                    running.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
                )
            )
            waiting.start()
            deadline = time.monotonic() + 10
            while not learner.gate.requests_waiting() and time.monotonic() < deadline:
                time.sleep(0.01)
            refused = httpx.post(f"{running.url}/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 4})
            assert refused.status_code == 429 and refused.headers["retry-after"].isdigit()
            assert refused.json()["error"]["type"] == "rate_limit_error"
        waiting.join(timeout=30)
        assert answers and answers[0].choices[0].text == running.greedy(PROMPT, 4), "the queued request is answered"
    finally:
        running.server.stop()


def test_a_client_that_disconnects_mid_stream_stops_its_generation(served):
    with httpx.stream(
        "POST",
        f"{served.url}/completions",
        json={"model": MODEL, "prompt": PROMPT, "max_tokens": 100, "temperature": 0, "stream": True},
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    deadline = time.monotonic() + 10
    while "smfd_api_requests_in_flight 0.0" not in served.metrics.render().decode():
        assert time.monotonic() < deadline, "the abandoned generation still holds the model"
        time.sleep(0.01)
    assert 'smfd_api_requests_total{route="completions",status="499"} 1.0' in served.metrics.render().decode()
    answer = served.client().completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0)
    assert answer.choices[0].text == served.greedy(PROMPT, 4)


def _ask(running: Served, prompt: str) -> tuple[str, str]:
    answer = running.client().completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0)
    return answer.choices[0].text, answer.system_fingerprint


FACT_SETTINGS = SETTINGS.__class__(
    SETTINGS.train.model_copy(update={"lr": 1.0, "passes": 8}), SETTINGS.chunking, SETTINGS.surprise
)


def _learner_with_fact(model, background, store, journal, folder) -> Learner:
    submit(journal, folder / "spool", "harbour.txt", FACT)
    return Learner(model, background, store, journal, FACT_SETTINGS)


def test_an_update_is_invisible_while_it_trains_and_answers_change_once_it_is_accepted(
    tiny_memory_model, background, store, journal, tmp_path, make_memory_model, snapshot_values, bit_identical
):
    learner = _learner_with_fact(tiny_memory_model, background, store, journal, tmp_path)
    running = serve(learner)
    try:
        before = _ask(running, FACT_PROMPT)
        mid_update: list[tuple[str, str]] = []
        calls = []

        def should_stop() -> bool:
            """Between two steps (the learner thread holds the gate): a request arrives."""
            calls.append(1)
            if len(calls) == 3:
                asking = threading.Thread(target=lambda: mid_update.append(_ask(running, FACT_PROMPT)))
                asking.start()
                while not learner.gate.requests_waiting():
                    time.sleep(0.005)
            return False

        outcome = learner.update(should_stop, guard=lambda: Verdict(True, None, {}))
        assert outcome.accepted and outcome.steps > 3
        assert mid_update == [before], "the request answered mid-update saw the accepted memory only"
        after = _ask(running, FACT_PROMPT)
        assert after[1] == "smfd-memory-v1" and after[0] != before[0]
        assert after[0] == running.greedy(FACT_PROMPT, 8)
    finally:
        running.server.stop()
    # The request in the middle did not change what the update learned: the same update without it.
    model = make_memory_model()
    reference_store = CheckpointStore(tmp_path / "reference")
    reference_store.initialise(model, background)
    with Journal(tmp_path / "reference.db") as reference_journal:
        reference = _learner_with_fact(model, background, reference_store, reference_journal, tmp_path / "reference")
        reference.update(guard=lambda: Verdict(True, None, {}))
    assert bit_identical(snapshot_values(reference.model), snapshot_values(learner.model))


def test_a_rolled_back_update_is_never_answered_from(tiny_memory_model, background, store, journal, tmp_path):
    learner = _learner_with_fact(tiny_memory_model, background, store, journal, tmp_path)
    running = serve(learner)
    try:
        before = _ask(running, FACT_PROMPT)
        during_guard: list[tuple[str, str]] = []

        def guard() -> Verdict:
            asking = threading.Thread(target=lambda: during_guard.append(_ask(running, FACT_PROMPT)))
            asking.start()
            while not learner.gate.requests_waiting():
                time.sleep(0.005)
            return Verdict(False, RollbackReason.DRIFT, {})

        outcome = learner.update(guard=guard)
        assert not outcome.accepted
        deadline = time.monotonic() + 10
        while not during_guard and time.monotonic() < deadline:
            time.sleep(0.01)
        assert during_guard == [before] and _ask(running, FACT_PROMPT) == before
    finally:
        running.server.stop()


def test_a_busy_port_is_a_user_error_naming_it(tiny_memory_model, background, store, journal):
    import socket

    from smfd.errors import SmfdError

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        section = ServeSection(enabled=True, port=port, model_name=MODEL)
        server = ApiServer(Learner(tiny_memory_model, background, store, journal, SETTINGS), section, Metrics().api)
        with pytest.raises(SmfdError, match=f"127.0.0.1:{port}"):
            server.start()
