"""ASGI middlewares of the HTTP layer: request body size limit and request counters.

Both are plain ASGI callables (not ``BaseHTTPMiddleware``), so streamed responses and client
disconnects pass through them untouched.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from zipvl_ray.api.errors import error_payload


@dataclass
class IngressCounters:
    """What the HTTP layer has seen since start (reported by ``GET /v1/stats``)."""

    started_at: float = field(default_factory=time.time)
    requests: int = 0
    completed: int = 0
    in_flight: int = 0
    disconnected: int = 0
    errors_by_status: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {
            "uptime_s": round(time.time() - self.started_at, 3),
            "requests": self.requests,
            "completed": self.completed,
            "in_flight": self.in_flight,
            "disconnected": self.disconnected,
            "errors_by_status": {str(k): v for k, v in sorted(self.errors_by_status.items())},
        }


class _BodyTooLarge(BaseException):
    """Raised from ``receive`` when the body passes the limit (BaseException: FastAPI must not wrap it)."""


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send) -> None:
        response = JSONResponse(
            status_code=413,
            content=error_payload(
                f"the request body is over the limit of {self.max_bytes} bytes",
                type="invalid_request_error",
                code="request_too_large",
            ),
        )
        await response({"type": "http"}, _no_receive, send)


class CountingMiddleware:
    """Count requests, in-flight requests and error statuses (a plain ASGI middleware: streams pass untouched)."""

    def __init__(self, app, counters: IngressCounters):
        self.app = app
        self.counters = counters

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counters = self.counters

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                counters.errors_by_status[message["status"]] += 1
            await send(message)

        counters.requests += 1
        counters.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            counters.in_flight -= 1


async def _no_receive():  # pragma: no cover - JSONResponse never reads the request
    return {"type": "http.disconnect"}
