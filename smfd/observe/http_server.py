"""A small HTTP endpoint for /metrics, /livez and /readyz.

Why not ``prometheus_client.start_http_server``: it answers every path with
metrics and has no health endpoints. This serves exactly three paths from a
ThreadingHTTPServer in a daemon thread, bound to 127.0.0.1 unless told otherwise.

One thread per connection, so connections are bounded (`max_connections`; more are closed at
once) and an idle keep-alive connection is dropped after `idle_timeout` seconds: a burst of idle
clients cannot pile up threads. A client that hangs up early is logged at debug, not as a traceback.
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from smfd.errors import SmfdError
from smfd.observe.metrics import Metrics

log = logging.getLogger("smfd.http")

# A health check returns True/False, or (ok, reason) to explain a failure.
HealthCheck = Callable[[], "bool | tuple[bool, str]"]


def _always_ok() -> bool:
    """Default health check: the server answering at all is the signal."""
    return True


def _evaluate(check: HealthCheck, what: str) -> tuple[bool, str]:
    """Run a health check; an exception counts as failure and its text is the reason."""
    try:
        result = check()
    except Exception as error:  # a crashing check must not crash the endpoint
        return False, f"{what} check raised {type(error).__name__}: {error}"
    if isinstance(result, tuple):
        ok, reason = result
        return bool(ok), str(reason) if not ok else "ok"
    return bool(result), "ok" if result else f"not {what}"


class _Handler(BaseHTTPRequestHandler):
    """Routes GET requests; the owning MetricsServer is reached through self.server."""

    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive for repeated scrapes

    def setup(self) -> None:
        self.timeout = self.server.idle_timeout  # an idle keep-alive connection gives its thread back
        super().setup()

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch(send_body=False)

    def _dispatch(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._reply(200, encoder(self.server.metrics.registry), content_type, send_body)
        elif path == "/livez":
            self._health(self.server.alive, "alive", send_body)
        elif path == "/readyz":
            self._health(self.server.ready, "ready", send_body)
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8", send_body)

    def _health(self, check: HealthCheck, what: str, send_body: bool) -> None:
        ok, reason = _evaluate(check, what)
        self._reply(200 if ok else 503, f"{reason}\n".encode(), "text/plain; charset=utf-8", send_body)

    def _reply(self, status: int, body: bytes, content_type: str, send_body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (stdlib signature)
        """Send access lines to logging at debug level instead of raw stderr."""
        log.debug("http %s", format % args)


class _Server(ThreadingHTTPServer):
    """ThreadingHTTPServer carrying what the handler needs, with a bounded number of connection threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        metrics: Metrics,
        ready: HealthCheck,
        alive: HealthCheck,
        max_connections: int,
        idle_timeout: float,
    ) -> None:
        self.metrics = metrics
        self.ready = ready
        self.alive = alive
        self.idle_timeout = idle_timeout
        self._slots = threading.BoundedSemaphore(max_connections)
        # An instance attribute, read by TCPServer.__init__: IPv6 literals need AF_INET6.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        if not self._slots.acquire(blocking=False):
            log.debug("http connection from %s closed: all connection slots busy", client_address)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address: tuple) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: socket.socket, client_address: tuple) -> None:
        """A client gone early is routine (debug); anything else is one warning line, never a raw traceback."""
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError)):
            log.debug("http client %s went away: %s", client_address, error)
        else:
            log.warning("http request from %s failed: %s: %s", client_address, type(error).__name__, error)


class MetricsServer:
    """Serves GET /metrics, /livez, /readyz; 404 for anything else.

    ``ready`` and ``alive`` return a bool, or ``(ok, reason)``; a failing check
    answers 503 with the reason as the body. Port 0 picks a free port (read it
    back from ``port`` after ``start()``).
    """

    def __init__(
        self,
        metrics: Metrics,
        host: str = "127.0.0.1",
        port: int = 9464,
        ready: HealthCheck = _always_ok,
        alive: HealthCheck = _always_ok,
        max_connections: int = 16,
        idle_timeout: float = 10.0,
    ) -> None:
        self._metrics = metrics
        self._max_connections = max_connections
        self._idle_timeout = idle_timeout
        self._host = host
        self._port = port
        self._ready = ready
        self._alive = alive
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (useful with port 0), else the configured one."""
        return self._server.server_address[1] if self._server else self._port

    @property
    def url(self) -> str:
        """Base URL, e.g. for tests and log lines."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind and serve in a daemon thread. Raises SmfdError if the address cannot be bound."""
        if self._server is not None:
            raise RuntimeError("MetricsServer already started")
        try:
            self._server = _Server(
                (self._host, self._port),
                self._metrics,
                self._ready,
                self._alive,
                self._max_connections,
                self._idle_timeout,
            )
        except OSError as error:
            raise SmfdError(f"cannot listen for metrics on {self._host}:{self._port}: {error}") from error
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="smfd-metrics-http", daemon=True
        )
        self._thread.start()
        log.info("metrics endpoint listening on %s", self.url)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving and close the socket; safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = None
        self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
