"""What the server needs in production besides the API: an API key and a graceful drain.

Both guard the `/v1/` routes only; `/health` and `/metrics` stay open for load balancers and
scrapers. The drain exists because uvicorn's own graceful shutdown closes the listening socket
first: clients would see connection errors instead of a 503 they can retry elsewhere, and it
has no way to end the streams still running at its deadline with a final chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Iterator
from typing import Any

from starlette.responses import JSONResponse

from infer.protocol import error_body

log = logging.getLogger("llama_jax.infer.server")

# After the drain deadline the remaining jobs are cancelled; their streams then need a moment
# to send their final chunk and `[DONE]`.
CANCEL_GRACE_S = 5.0


def guarded(scope: dict[str, Any]) -> bool:
    return scope["type"] == "http" and scope["path"].startswith("/v1/")


class APIKey:
    """ASGI middleware: `/v1/` routes need `Authorization: Bearer KEY`, compared in constant
    time so response timing does not leak how much of a guess was right."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if guarded(scope):
            problem = self._problem(dict(scope["headers"]).get(b"authorization"))
            if problem:
                body = error_body(problem, "invalid_request_error", code="invalid_api_key")
                response = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _problem(self, header: bytes | None) -> str | None:
        if header is None:
            return "missing API key: send it as 'Authorization: Bearer KEY'"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
            return "incorrect API key"
        return None


class Drain:
    """The `/v1/` requests in flight and whether new ones are refused (503) for shutdown."""

    def __init__(self) -> None:
        self.draining = False
        self._active: dict[int, dict[str, Any]] = {}  # id(scope) -> scope

    @property
    def active(self) -> int:
        return len(self._active)

    @contextlib.contextmanager
    def tracking(self, scope: dict[str, Any]) -> Iterator[None]:
        """Count `scope`'s request as in flight while the block runs."""
        self._active[id(scope)] = scope
        try:
            yield
        finally:
            del self._active[id(scope)]

    async def run(self, timeout: float) -> None:
        """Refuse new requests, wait up to `timeout` seconds for those in flight, then cancel
        the rest: their streams end with finish_reason "cancelled" and `[DONE]`."""
        self.draining = True
        log.warning("draining: %d requests in flight, up to %gs", self.active, timeout)
        if await self._settled(timeout):
            return
        log.warning("drain deadline passed: cancelling %d requests", self.active)
        for job in self._jobs():
            job.cancel()
        await self._settled(CANCEL_GRACE_S)

    async def _settled(self, seconds: float) -> bool:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while self._active and loop.time() < end:
            await asyncio.sleep(0.05)
        return not self._active

    def _jobs(self) -> Iterator[Any]:
        for scope in list(self._active.values()):
            job = scope.get("state", {}).get("job")
            if job is not None:
                yield job


class DrainGate:
    """ASGI middleware keeping `drain`'s count of `/v1/` requests, refusing them once it
    drains (with `Connection: close`, so keep-alive clients reconnect elsewhere)."""

    def __init__(self, app: Any, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if not guarded(scope):
            return await self.app(scope, receive, send)
        if self.drain.draining:
            body = error_body("server is shutting down; retry elsewhere", "server_error")
            response = JSONResponse(body, 503, headers={"Connection": "close"})
            return await response(scope, receive, send)
        with self.drain.tracking(scope):
            await self.app(scope, receive, send)
