"""The OpenAI API's request and response shapes, as far as smfd serves them.

Requests are validated by pydantic models that ignore fields smfd does not use (clients send
many) but refuse values it cannot honour, naming the field. Errors leave as OpenAI-style JSON:
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from smfd.serve.generation import Generated, Sampling

MAX_STOP_STRINGS = 4


class ApiError(Exception):
    """A request the API refuses: HTTP status and an OpenAI-style error body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    """Fields common to completions and chat completions."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)  # one choice per request

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOP_STRINGS or any(not s for s in stops):
            raise ValueError(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings")
        return stop

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))

    def sampling(self, prompt_tokens: int, context: int, default_max_tokens: int) -> Sampling:
        """The sampling settings, with max_tokens checked against the model's context window."""
        if prompt_tokens >= context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt has {prompt_tokens}.",
                code="context_length_exceeded",
                param="messages" if isinstance(self, ChatRequest) else "prompt",
            )
        wanted = self.requested_max_tokens()
        if wanted is not None and wanted <= 0:
            raise ApiError(400, f"max_tokens must be at least 1, got {wanted}", param="max_tokens")
        if wanted is not None and prompt_tokens + wanted > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens; the prompt ({prompt_tokens}) plus "
                f"max_tokens ({wanted}) is more.",
                code="context_length_exceeded",
                param="max_tokens",
            )
        budget = min(default_max_tokens, context - prompt_tokens) if wanted is None else wanted
        return Sampling(budget, self.temperature, self.top_p, self.stops(), self.seed)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[str]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        if isinstance(prompt, list) and len(prompt) != 1:
            raise ValueError("one prompt per request")
        return prompt

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        """A message for the chat template: developer messages read as system ones, text parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(part.text for part in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(kind: type[_Request], payload: object) -> _Request:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        return kind.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def fingerprint(version: int) -> str:
    """`system_fingerprint`: which memory version answered."""
    return f"smfd-memory-v{version}"


def usage(result: Generated) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def envelope(kind: str, model: str, request_id: str, version: int) -> dict:
    """The fields every response and stream chunk carries."""
    return {
        "id": request_id,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint(version),
    }


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
