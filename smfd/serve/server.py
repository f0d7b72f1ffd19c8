"""The API server: uvicorn on its own thread, started once the learner is ready, stopped with the daemon."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import structlog
import uvicorn

from smfd.config import ServeSection
from smfd.errors import SmfdError
from smfd.learn.learner import Learner
from smfd.observe.api_metrics import ApiMetrics
from smfd.serve.app import ApiApp

log = structlog.get_logger("smfd.serve")
START_TIMEOUT_SECONDS = 30.0


def read_api_key(path: Path | None) -> str | None:
    """The bearer token from `serve.api_key_file` (first line, stripped); None when no file is set."""
    if path is None:
        return None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise SmfdError(f"serve.api_key_file: cannot read {path}: {exc}") from exc
    if not key:
        raise SmfdError(f"serve.api_key_file {path} is empty: write the key into it, or unset the setting")
    return key


class ApiServer:
    """Runs the OpenAI-compatible API for one learner until `stop()`."""

    def __init__(self, learner: Learner, section: ServeSection, metrics: ApiMetrics) -> None:
        self.section = section
        app = ApiApp(learner, section, metrics, read_api_key(section.api_key_file)).asgi()
        config = uvicorn.Config(
            app,
            host=section.host,
            port=section.port,
            log_config=None,  # the daemon's logging; uvicorn's own access log is off (requests are logged once)
            access_log=False,
            lifespan="off",
            timeout_keep_alive=10,
            timeout_graceful_shutdown=5,  # a stream still running at stop is cut after this
            limit_concurrency=section.max_concurrent + 16,  # connections beyond the queue get 503 at once
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self._socket: socket.socket | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        return self._socket.getsockname()[1] if self._socket is not None else self.section.port

    def start(self) -> None:
        """Bind here, so a busy or forbidden address is an error naming it, then serve on a thread."""
        host, port = self.section.host, self.section.port
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError as exc:
            listener.close()
            raise SmfdError(f"serve: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._socket = listener
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [listener]}, name="smfd-api", daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SmfdError(f"serve: the API server on {host}:{port} did not start (see the log above)")
            time.sleep(0.02)
        log.info("api_serving", url=f"http://{host}:{self.port}/v1", model=self.section.model_name)

    def stop(self) -> None:
        if self.thread is None:
            return
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.thread = None
        if self._socket is not None:
            self._socket.close()
