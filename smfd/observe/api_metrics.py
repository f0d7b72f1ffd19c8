"""Prometheus metrics of the OpenAI-compatible API (smfd.serve), in the daemon's registry.

Routes and statuses are fixed sets, so a client sending odd paths cannot grow the series count.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

API_ROUTES = ("models", "completions", "chat_completions", "other")
# 499: the client closed the connection before its answer was complete (nginx's convention).
API_STATUSES = ("200", "400", "401", "404", "405", "413", "429", "499", "500", "503")
# First token: tens of milliseconds idle on a small model, seconds behind an optimizer step or a queue.
FIRST_TOKEN_BUCKETS_SECONDS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS_SECONDS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ApiMetrics:
    """Request counts by route and status, time to first token, request latency, generated tokens."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "smfd_api_requests_total",
            "API requests answered, by route and HTTP status.",
            ["route", "status"],
            registry=registry,
        )
        self.first_token = Histogram(
            "smfd_api_time_to_first_token_seconds",
            "From a generation request's arrival to its first generated token (waiting for the model included).",
            ["route"],
            buckets=FIRST_TOKEN_BUCKETS_SECONDS,
            registry=registry,
        )
        self.duration = Histogram(
            "smfd_api_request_duration_seconds",
            "From a request's arrival to the end of its answer (a stream: its last event).",
            ["route"],
            buckets=REQUEST_BUCKETS_SECONDS,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "smfd_api_generated_tokens_total", "Tokens generated for API requests.", ["route"], registry=registry
        )
        self.in_flight = Gauge(
            "smfd_api_requests_in_flight", "Generation requests waiting for the model or running.", registry=registry
        )
        for route in API_ROUTES:
            for status in ("200", "400", "429", "500"):
                self.requests.labels(route, status)

    def request(self, route: str, status: int, seconds: float) -> None:
        route = route if route in API_ROUTES else "other"
        label = str(status) if str(status) in API_STATUSES else "500" if status >= 500 else "400"
        self.requests.labels(route, label).inc()
        self.duration.labels(route).observe(seconds)

    def first_token_after(self, route: str, seconds: float) -> None:
        self.first_token.labels(route).observe(seconds)

    def generated(self, route: str, tokens: int) -> None:
        self.generated_tokens.labels(route).inc(tokens)
