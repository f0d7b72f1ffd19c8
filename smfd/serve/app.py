"""The OpenAI-compatible HTTP API (Starlette): models, completions and chat completions.

Each generation is a job the learner runs on the model's one thread (`Learner.serve`: between two
optimizer steps, or once the learner is free; on the last accepted memory). The event loop only parses,
admits and relays: past `serve.max_concurrent` requests waiting or running, a request gets 429.
A client that goes away mid-answer cancels its generation at the next token. Nothing here
writes to the state.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections.abc import AsyncIterator

import structlog
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from smfd.config import ServeSection
from smfd.learn.learner import Learner
from smfd.model.memory_model import MemoryModel
from smfd.observe.api_metrics import ApiMetrics
from smfd.serve.generation import Generated, Sampling, chat_prompt, generate
from smfd.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    envelope,
    new_id,
    parse_request,
    usage,
)

log = structlog.get_logger("smfd.serve")
VERSION_HEADER = "X-Smfd-Memory-Version"
RETRY_AFTER_SECONDS = 2
CLIENT_CLOSED = 499  # counted for a client that went away before its answer was complete


class _Run:
    """One generation on a worker thread; its events come back through an asyncio queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[tuple[str, object]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.finished = False

    def _put(self, kind: str, value: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop closed (server stopping): nobody is listening
            self.cancelled.set()

    def work(self, model: MemoryModel, version: int, prompt_ids: list[int], sampling: Sampling) -> None:
        """The generation itself, on the model's thread (a job `Learner.serve` runs)."""
        self._put("start", version)
        try:
            result = generate(
                model,
                version,
                prompt_ids,
                sampling,
                emit=lambda piece: self._put("piece", piece),
                cancelled=self.cancelled,
            )
            self._put("done", result)
        except Exception as exc:  # noqa: BLE001 - reported to the client as a 500; the daemon goes on
            log.exception("generation_failed", reason=str(exc))
            self._put("error", exc)

    async def next(self) -> tuple[str, object]:
        kind, value = await self.events.get()
        if kind == "error":
            self.finished = True
            raise ApiError(500, f"generation failed: {value}", kind="server_error")
        if kind == "done":
            self.finished = True
        return kind, value


class ApiApp:
    """The API for one daemon: its learner's model, its serve settings and metrics."""

    def __init__(self, learner: Learner, section: ServeSection, metrics: ApiMetrics, api_key: str | None) -> None:
        self.learner = learner
        self.section = section
        self.metrics = metrics
        self.api_key = api_key
        self.active = 0  # generation requests waiting or running (event-loop thread only)
        tokenizer = learner.model.tokenizer
        self.tokenizer = tokenizer
        self.context = int(getattr(learner.model.model.config, "max_position_embeddings", 2048))

    def asgi(self) -> Starlette:
        routes = [
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{name:path}", self.get_model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ]
        handlers = {HTTPException: self._http_error, Exception: self._server_error}
        return Starlette(routes=routes, exception_handlers=handlers)

    # ---- routes -------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        return await self._answer("models", request, lambda arrived: self._count(self._models(), "models", arrived))

    async def get_model(self, request: Request) -> Response:
        name = request.path_params["name"]

        async def one(arrived: float) -> Response:
            self._check_model(name)
            return self._count(JSONResponse(self._model_card()), "models", arrived)

        return await self._answer("models", request, one)

    async def completions(self, request: Request) -> Response:
        async def handle(arrived: float) -> Response:
            body = parse_request(CompletionRequest, await self._json_body(request))
            self._check_model(body.model)
            prompt_ids = self.tokenizer(body.text(), add_special_tokens=False).input_ids
            if not prompt_ids:
                raise ApiError(400, "prompt is empty", param="prompt")
            return await self._generate("completions", body, prompt_ids, arrived)

        return await self._answer("completions", request, handle)

    async def chat_completions(self, request: Request) -> Response:
        async def handle(arrived: float) -> Response:
            body = parse_request(ChatRequest, await self._json_body(request))
            self._check_model(body.model)
            try:
                prompt_ids = chat_prompt(self.tokenizer, [m.as_template_message() for m in body.messages])
            except Exception as exc:  # noqa: BLE001 - a template may refuse an order of roles
                raise ApiError(400, f"messages: the chat template refused them ({exc})", param="messages") from None
            return await self._generate("chat_completions", body, prompt_ids, arrived)

        return await self._answer("chat_completions", request, handle)

    # ---- request handling -----------------------------------------------------------------
    async def _answer(self, route: str, request: Request, handle) -> Response:
        """Authorise, run `handle`, and turn an ApiError into its OpenAI-style JSON answer."""
        arrived = time.monotonic()
        try:
            self._authorize(request)
            result = handle(arrived)
            return await result if asyncio.iscoroutine(result) else result
        except ApiError as exc:
            self.metrics.request(route, exc.status, time.monotonic() - arrived)
            if exc.status >= 500:
                log.error("api_error", route=route, status=exc.status, reason=exc.message)
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")

    async def _json_body(self, request: Request) -> object:
        limit = self.section.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes", code="request_too_large")
        try:
            return json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(400, "the request body is not UTF-8") from None
        except json.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}") from None

    def _check_model(self, name: str) -> None:
        if name != self.section.model_name:
            raise ApiError(
                404,
                f"The model {name!r} does not exist; this server serves {self.section.model_name!r}.",
                code="model_not_found",
                param="model",
            )

    def _model_card(self) -> dict:
        return {"id": self.section.model_name, "object": "model", "created": 0, "owned_by": "smfd"}

    def _models(self) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    def _count(self, response: Response, route: str, arrived: float) -> Response:
        self.metrics.request(route, response.status_code, time.monotonic() - arrived)
        return response

    async def _generate(self, route: str, body, prompt_ids: list[int], arrived: float) -> Response:
        sampling = body.sampling(len(prompt_ids), self.context, self.section.default_max_tokens)
        if self.active >= self.section.max_concurrent:
            raise ApiError(
                429,
                f"{self.active} requests are waiting for the model (serve.max_concurrent); try again shortly",
                kind="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            )
        run = self._start(prompt_ids, sampling)
        handed_over = False  # a stream's generator owns the run once the response is returned
        try:
            kind, version = await run.next()  # "start": the model is ours, and which version it is
            headers = {VERSION_HEADER: str(version)}
            request_id = new_id("chatcmpl" if route == "chat_completions" else "cmpl")
            if body.stream:
                handed_over = True
                return StreamingResponse(
                    self._events(route, body, run, request_id, int(version), arrived),
                    media_type="text/event-stream",
                    headers={**headers, "Cache-Control": "no-cache"},
                )
            while kind != "done":
                kind, value = await run.next()
            answer = self._full_answer(route, body, value, request_id)
            self._finished(route, value, arrived)
            return JSONResponse(answer, headers=headers)
        finally:
            if not run.finished and not handed_over:
                run.cancelled.set()  # the client went away before the answer was complete
                self.metrics.request(route, CLIENT_CLOSED, time.monotonic() - arrived)

    def _start(self, prompt_ids: list[int], sampling: Sampling) -> _Run:
        loop = asyncio.get_running_loop()
        run = _Run(loop)
        self.active += 1
        self.metrics.in_flight.set(self.active)

        def job(model: MemoryModel, version: int) -> None:
            try:
                run.work(model, version, prompt_ids, sampling)
            finally:
                try:
                    loop.call_soon_threadsafe(self._release)
                except RuntimeError:  # the loop closed (server stopping)
                    pass

        self.learner.serve(job)
        return run

    def _release(self) -> None:
        self.active -= 1
        self.metrics.in_flight.set(self.active)

    def _finished(self, route: str, result: Generated, arrived: float) -> None:
        if result.first_token_at is not None:
            self.metrics.first_token_after(route, result.first_token_at - arrived)
        self.metrics.generated(route, result.completion_tokens)
        self.metrics.request(route, 200, time.monotonic() - arrived)
        log.info(
            "api_request",
            route=route,
            version=result.version,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason,
            seconds=round(time.monotonic() - arrived, 3),
        )

    def _full_answer(self, route: str, body, result: Generated, request_id: str) -> dict:
        if route == "chat_completions":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None}
            kind = "text_completion"
        choice["finish_reason"] = result.finish_reason
        return {
            **envelope(kind, body.model, request_id, result.version),
            "choices": [choice],
            "usage": usage(result),
        }

    async def _events(
        self, route: str, body, run: _Run, request_id: str, version: int, arrived: float
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text, the finish reason, usage if asked, [DONE]."""
        chat = route == "chat_completions"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else {} if text is None else {"content": text}
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _sse({**envelope(kind, body.model, request_id, version), "choices": [choice]})

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                try:
                    event, value = await run.next()
                except ApiError as exc:
                    yield _sse(exc.body())
                    self.metrics.request(route, exc.status, time.monotonic() - arrived)
                    return
                if event == "piece":
                    yield chunk(value, None)
                elif event == "done":
                    yield chunk(None, value.finish_reason)
                    if body.include_usage():
                        yield _sse(
                            {**envelope(kind, body.model, request_id, version), "choices": [], "usage": usage(value)}
                        )
                    yield "data: [DONE]\n\n"
                    self._finished(route, value, arrived)
                    return
        finally:
            if not run.finished:
                run.cancelled.set()  # the client disconnected mid-stream: stop generating
                self.metrics.request(route, CLIENT_CLOSED, time.monotonic() - arrived)
                log.info("api_request_abandoned", route=route, version=version)

    # ---- errors outside the routes ---------------------------------------------------------
    async def _http_error(self, request: Request, exc: HTTPException) -> Response:
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        self.metrics.request("other", exc.status_code, 0.0)
        return JSONResponse(error.body(), status_code=exc.status_code)

    async def _server_error(self, request: Request, exc: Exception) -> Response:
        log.error("api_internal_error", path=request.url.path, reason=str(exc))
        self.metrics.request("other", 500, 0.0)
        return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), status_code=500)


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
