"""The proxy's middleware: the plain-text errors Serve's proxy answers by itself become OpenAI errors."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from zipvl_ray.api.middleware import (
    PROXY_CALLBACK_IMPORT_PATH,
    OpenAIErrorMiddleware,
    ServeProxyMiddleware,
    proxy_middlewares,
)


def _plain(
    status: int, body: bytes, headers=(), content_type: bytes = b"text/plain; charset=utf-8", chunks: int = 1
):
    async def app(scope, receive, send):
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", content_type), *headers],
            }
        )
        size = max(1, len(body) // chunks)
        parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

    return app


async def _silent(scope, receive, send):  # the proxy when the ingress replica died: no response at all
    return None


async def _crashing(scope, receive, send):
    raise RuntimeError("secret internals")


def _get(app, headers: dict[str, str] | None = None) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get("/v1/chat/completions", headers=headers or {})

    return asyncio.run(run())


BACKPRESSURE = b"Request dropped due to backpressure (num_queued_requests=4, max_queued_requests=4)."


@pytest.mark.parametrize(
    "app, status, type_, code, fragment, retry_after",
    [
        (_plain(503, BACKPRESSURE), 503, "service_unavailable", "overloaded", "num_queued_requests=4", "1"),
        (
            _plain(503, BACKPRESSURE, [(b"retry-after", b"7")]),
            503,
            "service_unavailable",
            "overloaded",
            "at capacity",
            "7",
        ),
        (
            _plain(503, b"Deployment is unavailable.", chunks=3),
            503,
            "service_unavailable",
            "service_unavailable",
            "unavailable",
            "1",
        ),
        (
            _plain(408, b"Request abc timed out after 120.0s."),
            408,
            "timeout_error",
            "timeout",
            "timed out after 120.0s",
            None,
        ),
        (
            _plain(404, b"Path '/nope' not found."),
            404,
            "not_found_error",
            "not_found",
            "Path '/nope' not found",
            None,
        ),
        (
            _plain(500, b"Internal Server Error"),
            500,
            "server_error",
            "internal_error",
            "failed to answer",
            None,
        ),
        (
            _plain(500, b"", content_type=b"text/plain"),
            500,
            "server_error",
            "internal_error",
            "failed to answer",
            None,
        ),
        (_silent, 500, "server_error", "internal_error", "failed to answer", None),
        (_crashing, 500, "server_error", "internal_error", "failed to answer", None),
    ],
)
def test_plain_text_errors_become_openai_errors(app, status, type_, code, fragment, retry_after):
    response = _get(OpenAIErrorMiddleware(app))
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == (type_, code)
    assert fragment in error["message"]
    assert response.headers.get("retry-after") == retry_after
    assert "secret internals" not in response.text and "Traceback" not in response.text


@pytest.mark.parametrize(
    "app",
    [
        _plain(200, b"pong"),
        _plain(400, b'{"error": {"message": "mine"}}', content_type=b"application/json"),
        _plain(503, b'{"error": {"message": "mine"}}', content_type=b"application/json"),
        _plain(200, b"data: {}\n\n", content_type=b"text/event-stream", chunks=4),
    ],
)
def test_answers_of_the_application_pass_untouched(app):
    direct, wrapped = _get(app), _get(OpenAIErrorMiddleware(app))
    assert (wrapped.status_code, wrapped.content) == (direct.status_code, direct.content)
    assert wrapped.headers["content-type"] == direct.headers["content-type"]


def test_other_headers_are_kept():
    app = _plain(503, BACKPRESSURE, [(b"x-request-id", b"rid-1")])
    response = _get(OpenAIErrorMiddleware(app))
    assert response.headers["x-request-id"] == "rid-1"
    assert int(response.headers["content-length"]) == len(response.content)


def test_the_proxy_middleware_also_drops_malformed_request_ids():
    seen = []

    async def app(scope, receive, send):
        seen.append(dict(scope["headers"]).get(b"x-request-id"))
        await _plain(503, BACKPRESSURE)(scope, receive, send)

    response = _get(ServeProxyMiddleware(app), {"x-request-id": "bad id with spaces"})
    assert seen == [None]
    assert response.json()["error"]["code"] == "overloaded"


def test_the_proxy_callback_installs_one_middleware():
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    (middleware,) = validate_http_proxy_callback_return(proxy_middlewares())
    assert middleware.cls is ServeProxyMiddleware
    assert PROXY_CALLBACK_IMPORT_PATH == "zipvl_ray.api.middleware:proxy_middlewares"


def test_clients_cannot_lift_the_proxys_timeout_or_disconnect_cancellation():
    """Ray 2.60's proxy reads x-request-timeout-seconds (0: no timeout) and x-request-disconnect-disabled
    from each request; the proxy middleware drops both before the proxy sees them."""
    from ray.serve._private.http_util import parse_disconnect_disabled_header, parse_request_timeout_header

    seen = []

    async def app(scope, receive, send):
        headers = dict(scope["headers"])
        seen.append((parse_request_timeout_header(headers, 600.0), parse_disconnect_disabled_header(headers)))
        await _plain(200, b"ok")(scope, receive, send)

    _get(ServeProxyMiddleware(app), {"x-request-timeout-seconds": "0", "X-Request-Disconnect-Disabled": "?1"})
    assert seen == [(600.0, False)]
