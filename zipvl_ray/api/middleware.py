"""ASGI middlewares of the HTTP layer: request body size limit, request counters, the request id, and the
OpenAI-format errors of Serve's HTTP proxy.

All are plain ASGI callables (not ``BaseHTTPMiddleware``), so streamed responses and client
disconnects pass through them untouched.

Request ids: :class:`RequestIdMiddleware` gives every request an id (the incoming ``x-request-id``
when it is well-formed, :func:`is_well_formed_request_id`, else a new one), binds it for logging
(:data:`zipvl_ray.telemetry.REQUEST_ID`) and returns it in the ``x-request-id`` response header.
Behind Ray Serve the HTTP proxy already does the header part (it honours any incoming id, creates one
otherwise, and propagates it through handle calls as Serve's request id); :func:`proxy_middlewares`
(for ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``) makes the proxy drop a malformed incoming id so it
creates a fresh one instead, and answer its own errors (backpressure, timeouts, a dead ingress) in
OpenAI's format (:class:`OpenAIErrorMiddleware`).
"""

from __future__ import annotations

import asyncio
import json
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


class _TooManyContainers(BaseException):
    """Raised from ``receive`` when the body holds too many JSON objects and arrays (as above)."""


#: Where :class:`BodySizeLimitMiddleware` leaves the count of ``{`` / ``[`` of the body read so far.
BODY_CONTAINERS_SCOPE_KEY = "zipvl.body_containers"


class BodySizeLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, whether or not Content-Length is sent, and bodies
    with more than ``max_containers`` ``{`` / ``[`` characters with 400, before anything parses them."""

    def __init__(self, app, max_bytes: int, max_containers: int | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.max_containers = max_containers

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send)
            return
        received = containers = 0
        started = False

        async def limited_receive():
            nonlocal received, containers
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > self.max_bytes:
                    raise _BodyTooLarge()
                if self.max_containers is not None:
                    containers += chunk.count(b"{") + chunk.count(b"[")
                    scope[BODY_CONTAINERS_SCOPE_KEY] = containers
                    if containers > self.max_containers:
                        raise _TooManyContainers()
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
        except _TooManyContainers:
            if not started:
                message = f"the request body holds more than {self.max_containers} JSON objects and arrays"
                await _send_error(send, 400, message, "request_too_complex")

    async def _refuse(self, send) -> None:
        message = f"the request body is over the limit of {self.max_bytes} bytes"
        await _send_error(send, 413, message, "request_too_large")


async def _send_error(send, status: int, message: str, code: str) -> None:
    """An OpenAI-format error response sent straight to ``send`` (outside the application)."""
    content = error_payload(message, type="invalid_request_error", code=code)
    await JSONResponse(status_code=status, content=content)({"type": "http"}, _no_receive, send)


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
        response_started = False

        async def send_with_request_id(message):
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
                if self.set_response_header:
                    message = {
                        **message,
                        "headers": _with_header(message.get("headers"), _REQUEST_ID_HEADER_BYTES, request_id),
                    }
            await send(message)

        try:
            with telemetry.bind_request_id(request_id):
                await self.app(scope, receive, send_with_request_id)
        except asyncio.CancelledError:
            if not response_started:  # the client left before an answer: 499 (nginx's), not a 500
                status = 499
            raise
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


#: Headers with which a client could override Serve's proxy for its own request (Ray 2.60): a timeout of its
#: choosing (0 or less: none) and no cancellation when it disconnects. Meant for a trusted load balancer in
#: front of the proxy, not for API clients: a client could keep KV held after leaving.
PROXY_CONTROL_HEADERS = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")


class ProxyControlHeaderFilterMiddleware:
    """Drop :data:`PROXY_CONTROL_HEADERS` from incoming requests, so the proxy applies the configured
    ``request_timeout_s`` and cancels requests whose client went away, whatever the client sends."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            headers = scope.get("headers") or []
            if any(key.lower() in PROXY_CONTROL_HEADERS for key, _ in headers):
                scope = {
                    **scope,
                    "headers": [(k, v) for k, v in headers if k.lower() not in PROXY_CONTROL_HEADERS],
                }
        await self.app(scope, receive, send)


#: Most bytes of a proxy's own error body read to rewrite it (Serve's are one short sentence).
MAX_PROXY_ERROR_BODY = 64 * 1024

#: Statuses whose answer tells the client to come back later (``Retry-After`` added when missing).
RETRYABLE_STATUSES = (429, 503)

_PROXY_ERROR_WORDING = {
    404: ("no application serves this path", "not_found"),
    408: ("the request took longer than the server's request timeout", "timeout"),
    429: ("too many requests; retry later", "rate_limited"),
    500: ("the service failed to answer this request", "internal_error"),
    503: ("the service is at capacity or not available right now; retry later", "overloaded"),
}


def _content_type(headers) -> str:
    for key, value in headers or []:
        if key.lower() == b"content-type":
            return value.decode("latin-1").lower()
    return ""


def openai_error_body(status: int, detail: str) -> dict[str, Any]:
    """OpenAI's error body for a plain-text error answered by Serve's proxy (``detail`` is its text)."""
    from zipvl_ray.api.errors import ERROR_TYPES

    wording, code = _PROXY_ERROR_WORDING.get(status, ("the request failed", "proxy_error"))
    if status == 503 and "backpressure" not in detail.lower():
        code = "service_unavailable"
    detail = " ".join(detail.split())[:300]
    message = f"{wording} ({detail})" if detail else wording
    return error_payload(
        message,
        type=ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
        code=code,
    )


class OpenAIErrorMiddleware:
    """Turn the plain-text errors a server in front of the application answers by itself into OpenAI errors.

    Ray Serve's HTTP proxy answers some requests without the application: 503 ``Request dropped due to
    backpressure`` (``max_queued_requests`` of the ingress reached), 503 when the application is
    unavailable, 408 on its request timeout, 404 for a path no application serves, and an empty
    response (which the HTTP server turns into a plain 500) when the ingress replica died. This
    middleware rewrites any error status (>= 400) whose body is not JSON or an event stream into
    ``{"error": {"message", "type", "param", "code"}}``, keeps every other header (``x-request-id``,
    ``Retry-After``), adds ``Retry-After: 1`` to a 429 / 503 without one, and answers a JSON 500 when
    the application ended without any response. Answers of the application itself (JSON errors, SSE
    streams, successes) pass through byte for byte.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        held_start: dict[str, Any] | None = None
        held_body: list[bytes] = []
        held_size = 0
        responded = False

        async def rewriting_send(message):
            nonlocal held_start, held_size, responded
            kind = message["type"]
            if kind == "http.response.start":
                responded = True
                content_type = _content_type(message.get("headers"))
                if message["status"] >= 400 and not content_type.startswith(
                    ("application/json", "text/event-stream")
                ):
                    held_start = message
                    return
            elif kind == "http.response.body" and held_start is not None:
                if held_size < MAX_PROXY_ERROR_BODY:
                    chunk = message.get("body", b"")[: MAX_PROXY_ERROR_BODY - held_size]
                    held_body.append(chunk)
                    held_size += len(chunk)
                if message.get("more_body", False):
                    return
                start, held_start = held_start, None
                detail = b"".join(held_body).decode("utf-8", "replace")
                await _send_json_error(send, start["status"], detail, start.get("headers") or [])
                return
            await send(message)

        try:
            await self.app(scope, receive, rewriting_send)
        except Exception:  # the server in front would answer a plain 500: answer it in OpenAI's format
            logger.exception("the application failed before answering")
            if responded:
                raise
        if not responded:
            await _send_json_error(send, 500, "", [])


async def _send_json_error(send, status: int, detail: str, headers) -> None:
    body = json.dumps(openai_error_body(status, detail), separators=(",", ":")).encode()
    kept = [(k, v) for k, v in headers if k.lower() not in (b"content-type", b"content-length")]
    if status in RETRYABLE_STATUSES and not any(k.lower() == b"retry-after" for k, _ in kept):
        kept.append((b"retry-after", b"1"))
    kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": kept})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class ServeProxyMiddleware:
    """What zipvl-ray adds to Ray Serve's HTTP proxy, as one middleware.

    Outside: :class:`OpenAIErrorMiddleware` (the proxy's own plain-text errors become OpenAI errors);
    inside: :class:`RequestIdSanitizerMiddleware` (a malformed ``x-request-id`` is dropped so Serve
    creates a fresh one) and :class:`ProxyControlHeaderFilterMiddleware` (clients cannot lift the
    proxy's timeout or its cancellation on disconnect). Serve's own request-id middleware runs inside.
    """

    def __init__(self, app):
        self.app = OpenAIErrorMiddleware(
            RequestIdSanitizerMiddleware(ProxyControlHeaderFilterMiddleware(app))
        )

    async def __call__(self, scope, receive, send):
        await self.app(scope, receive, send)


def proxy_middlewares() -> list:
    """Middlewares of Ray Serve's HTTP proxy: ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=<this function>``.

    One :class:`ServeProxyMiddleware`: OpenAI-format errors for what the proxy answers by itself
    (backpressure 503 with ``Retry-After``, timeouts, a dead ingress replica) and well-formed request
    ids. Serve's own request-id middleware runs inside it. Set the variable in the environment of
    every node running a proxy.
    """
    from starlette.middleware import Middleware

    return [Middleware(ServeProxyMiddleware)]


PROXY_CALLBACK_IMPORT_PATH = "zipvl_ray.api.middleware:proxy_middlewares"
"""The value of ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` that installs :func:`proxy_middlewares`."""
