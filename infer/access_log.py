"""One access-log line per HTTP request: method, route, status, tokens and latency.

An ASGI middleware rather than uvicorn's access log, because the line is written when the
response has ended (a streamed completion ends with its last chunk, not with its headers) and
carries the token counts of the generation behind it, which uvicorn cannot see. Routes that
generate put their `infer.server.Job` on the request's state (`http.state.job`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


class ResponseEnd:
    """ASGI middleware calling `ended(scope, status, seconds)` once per finished HTTP request
    (the access log and the metrics both count requests this way)."""

    def __init__(self, app: Any, ended: Callable[[dict, int, float], None]) -> None:
        self.app, self.ended = app, ended

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # what the client gets if the app fails before answering

        async def watched_send(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        finally:
            self.ended(scope, status, time.perf_counter() - start)


class AccessLog(ResponseEnd):
    """ASGI middleware calling `write(line)` once per finished HTTP request."""

    def __init__(self, app: Any, write: Callable[[str], None]) -> None:
        super().__init__(app, lambda scope, status, s: write(access_line(scope, status, s)))


def access_line(scope: dict, status: int, seconds: float) -> str:
    """E.g. `POST /v1/chat/completions 200 tokens 12+34 0.532s` (prompt + completion tokens,
    shown for the routes that generate)."""
    parts = [scope["method"], scope["path"], str(status)]
    job = scope.get("state", {}).get("job")
    if job is not None and job.requests:
        counts = job.usage()
        parts.append(f"tokens {counts['prompt_tokens']}+{counts['completion_tokens']}")
    parts.append(f"{seconds:.3f}s")
    return " ".join(parts)
