"""ASGI middlewares of the HTTP layer: request body size limit, request counters and the request id.

All are plain ASGI callables (not ``BaseHTTPMiddleware``), so streamed responses and client
disconnects pass through them untouched.

Request ids: :class:`RequestIdMiddleware` gives every request an id (the incoming ``x-request-id``
when it is well-formed, :func:`is_well_formed_request_id`, else a new one), binds it for logging
(:data:`zipvl_ray.telemetry.REQUEST_ID`) and returns it in the ``x-request-id`` response header.
Behind Ray Serve the HTTP proxy already does the header part (it honours any incoming id, creates one
otherwise, and propagates it through handle calls as Serve's request id); :func:`proxy_middlewares`
(for ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``) makes the proxy drop a malformed incoming id so it
creates a fresh one instead.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from zipvl_ray import telemetry
from zipvl_ray.api.errors import error_payload

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID_HEADER_BYTES = REQUEST_ID_HEADER.encode()
#: 1-128 characters: letters, digits and ``._:@/+=-``, starting with a letter or digit (UUIDs, ULIDs,
#: W3C trace ids, ``prefix-1234`` forms). Anything else (spaces, quotes, control or non-ASCII
#: characters, longer values) could corrupt log lines or blow up their size.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,127}")


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


def is_well_formed_request_id(value: str | None) -> bool:
    """True for an ``x-request-id`` worth keeping (:data:`REQUEST_ID_PATTERN`)."""
    return bool(value) and REQUEST_ID_PATTERN.fullmatch(value) is not None


def new_request_id() -> str:
    """A fresh request id (32 hex digits)."""
    return uuid.uuid4().hex


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _with_header(headers, name: bytes, value: str | None) -> list:
    """``headers`` without ``name``, plus ``name: value`` unless value is None."""
    out = [(k, v) for k, v in headers or [] if k.lower() != name]
    if value is not None:
        out.append((name, value.encode("latin-1")))
    return out


RequestObserver = Callable[[str, int, float], None]
"""``(path, status code, seconds)`` of an answered HTTP request."""


class RequestIdMiddleware:
    """Give each HTTP request an id, bind it for logging, echo it in ``x-request-id``, time the request.

    Parameters
    ----------
    app : ASGI app
    set_response_header : bool
        Put ``x-request-id`` in the response (replacing any the app set). Behind Ray Serve's proxy,
        which adds the header itself, pass False.
    observer : callable, optional
        Called once per request with ``(path, status code, seconds)`` after the last response byte
        (or when the client left); the ingress records its metrics there.
    """

    def __init__(self, app, set_response_header: bool = True, observer: RequestObserver | None = None):
        self.app = app
        self.set_response_header = set_response_header
        self.observer = observer

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        incoming = _header(scope, _REQUEST_ID_HEADER_BYTES)
        request_id = incoming if is_well_formed_request_id(incoming) else new_request_id()
        if incoming is not None and incoming != request_id:
            logger.info("x-request-id %r is malformed: the request is %s", incoming[:64], request_id)
        if incoming != request_id:  # what runs inside sees the id that is answered
            scope = {
                **scope,
                "headers": _with_header(scope.get("headers"), _REQUEST_ID_HEADER_BYTES, request_id),
            }
        status = 500

        async def send_with_request_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if self.set_response_header:
                    message = {
                        **message,
                        "headers": _with_header(message.get("headers"), _REQUEST_ID_HEADER_BYTES, request_id),
                    }
            await send(message)

        try:
            with telemetry.bind_request_id(request_id):
                await self.app(scope, receive, send_with_request_id)
        finally:
            if self.observer is not None:
                try:
                    self.observer(scope.get("path", ""), status, time.perf_counter() - started)
                except Exception:  # metrics must never break a request
                    logger.exception("request observer failed")


class RequestIdSanitizerMiddleware:
    """Drop a malformed incoming ``x-request-id`` so the server behind creates a fresh one (Serve's proxy)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            incoming = _header(scope, _REQUEST_ID_HEADER_BYTES)
            if incoming is not None and not is_well_formed_request_id(incoming):
                scope = {
                    **scope,
                    "headers": _with_header(scope.get("headers"), _REQUEST_ID_HEADER_BYTES, None),
                }
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """Middlewares of Ray Serve's HTTP proxy: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=<this function>``.

    Serve's own request-id middleware runs inside these, so it sees only well-formed ids (or none,
    and creates one). Set the variable in the environment of every node running a proxy.
    """
    from starlette.middleware import Middleware

    return [Middleware(RequestIdSanitizerMiddleware)]


PROXY_CALLBACK_IMPORT_PATH = "zipvl_ray.api.middleware:proxy_middlewares"
"""The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs :func:`proxy_middlewares`."""
