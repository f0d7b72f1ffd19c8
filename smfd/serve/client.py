"""`smfd ask` through a running daemon's API, so a question does not load the whole model again."""

from __future__ import annotations

import httpx

from smfd.config import ServeSection
from smfd.errors import SmfdError
from smfd.serve.server import read_api_key

CONNECT_TIMEOUT_SECONDS = 2.0
ANSWER_TIMEOUT_SECONDS = 600.0  # the daemon may be mid-update ("wait" policy) before it answers


def api_url(section: ServeSection) -> str:
    """Where a local client reaches the API (a wildcard bind is reached on loopback)."""
    host = "127.0.0.1" if section.host in ("0.0.0.0", "::", "") else section.host
    host = f"[{host}]" if ":" in host else host
    return f"http://{host}:{section.port}/v1"


def ask_daemon(section: ServeSection, prompt: str, max_tokens: int) -> tuple[str, int] | None:
    """The running daemon's greedy completion of `prompt` and the memory version that answered it.

    None when serving is off or nothing listens; an error from a daemon that does answer is raised.
    """
    if not section.enabled:
        return None
    key = read_api_key(section.api_key_file)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": section.model_name, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    timeout = httpx.Timeout(ANSWER_TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS)
    url = f"{api_url(section)}/completions"
    try:
        response = httpx.post(url, json=body, headers=headers, timeout=timeout)
    except (httpx.ConnectError, httpx.ConnectTimeout):
        return None
    if response.status_code != 200:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:200]
        raise SmfdError(f"the daemon at {url} answered {response.status_code}: {message}")
    answer = response.json()
    return answer["choices"][0]["text"], int(response.headers.get("x-smfd-memory-version", "-1"))
