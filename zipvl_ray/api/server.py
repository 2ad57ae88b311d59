"""The OpenAI-compatible HTTP application, independent of how inference is reached.

:func:`build_openai_app` returns a FastAPI app whose routes prepare each request on the CPU
(:class:`~zipvl_ray.api.chat.ChatPreparer`) and hand it to an :class:`~zipvl_ray.api.chat.InferenceBackend`.
The Ray Serve ingress (``deployments/ingress.py``) is one backend (vision and LLM deployments behind
handles); an in-process engine is another (:mod:`zipvl_ray.api.local`), which the tests use without Ray.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /v1/models/{model}``, ``GET /health``,
``GET /v1/stats``. Every error is a JSON body in OpenAI's format (:mod:`zipvl_ray.api.errors`).

Middlewares, outermost first: request id (:class:`~zipvl_ray.api.middleware.RequestIdMiddleware`: ids
on log lines, the ``x-request-id`` header, the per-request observer), counters, API-key
authentication when keys are configured (:mod:`zipvl_ray.api.auth`; ``/health`` stays open), the
request body size limit.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import json
import os
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from zipvl_ray.api.auth import APIKeyMiddleware
from zipvl_ray.api.chat import ChatCompletionHandler, ChatPreparer, InferenceBackend, ServingSettings
from zipvl_ray.api.errors import FASTAPI_BODY_PARSE_ERROR, APIError, _declares_json, install_error_handlers
from zipvl_ray.api.middleware import (
    BODY_CONTAINERS_SCOPE_KEY,
    BodySizeLimitMiddleware,
    CountingMiddleware,
    IngressCounters,
    RequestIdMiddleware,
    RequestObserver,
)
from zipvl_ray.api.schemas import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ErrorResponse,
    HealthResponse,
    ModelCard,
    ModelList,
)
from zipvl_ray.api.sse import SSE_MEDIA_TYPE
from zipvl_ray.multimodal import PromptProcessor

__all__ = ["ChatPreparer", "InferenceBackend", "ServingSettings", "build_openai_app"]


_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Invalid request (the message names the field)."},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key (when keys are configured)."},
    404: {"model": ErrorResponse, "description": "Unknown model."},
    413: {"model": ErrorResponse, "description": "Request body too large."},
    500: {"model": ErrorResponse, "description": "Server error."},
    503: {"model": ErrorResponse, "description": "At capacity or a stage failed: retry after Retry-After."},
}


def build_openai_app(
    backend: InferenceBackend,
    processor: PromptProcessor,
    settings: ServingSettings,
    *,
    title: str = "zipvl-ray",
    telemetry: dict[str, Any] | None = None,
    api_keys: Collection[str] | None = None,
    request_id_header: bool = True,
    request_observer: RequestObserver | None = None,
    watch_disconnect: bool = True,
) -> FastAPI:
    """The FastAPI application serving the OpenAI-compatible API in front of ``backend``.

    Parameters
    ----------
    backend : InferenceBackend
        Vision + generation (Ray Serve handles, or an in-process engine).
    processor : PromptProcessor
        The served model's prompt processor.
    settings : ServingSettings
    title : str
        Title of the OpenAPI document.
    telemetry : dict, optional
        FastAPI's own ``telemetry=`` option (``{"tracing": False}`` behind Serve's proxy, which starts
        the trace itself).
    api_keys : collection of str, optional
        Accepted ``Authorization: Bearer`` keys; None or empty: no authentication. Default: the keys
        ``settings.auth`` names (read now, from this process's environment or file).
    request_id_header : bool
        Return ``x-request-id`` (False behind Serve's proxy, which returns it itself).
    request_observer : callable, optional
        ``(path, status, seconds)`` of every answered request (metrics).
    watch_disconnect : bool
        Abort a completion whose client disconnected before the answer, or, streamed, before its first
        chunk (afterwards the response stream notices). False behind Serve's proxy, which cancels the
        request itself.

    Returns
    -------
    FastAPI
    """
    app = FastAPI(
        title=title,
        description="OpenAI-compatible chat completions for vision-language models with ZipVL sparsity.",
        version="0.1.0",
        telemetry=telemetry,
    )
    install_error_handlers(app)
    counters = IngressCounters()
    keys = settings.auth.load_keys() if api_keys is None else frozenset(api_keys)
    # Starlette runs the middleware added last first.
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_bytes=settings.max_request_bytes,
        max_containers=settings.max_request_containers,
    )
    if keys:
        app.add_middleware(APIKeyMiddleware, keys=keys, public_paths=settings.auth.public_paths)
    app.add_middleware(CountingMiddleware, counters=counters)
    app.add_middleware(RequestIdMiddleware, set_response_header=request_id_header, observer=request_observer)
    preparer = ChatPreparer(processor, settings)
    handler = ChatCompletionHandler(backend, preparer, counters)
    card = ModelCard(
        id=settings.served_model_name, root=settings.model_source, max_model_len=settings.max_model_len
    )
    app.state.counters = counters
    app.state.preparer = preparer
    app.state.authenticated = bool(keys)

    chat_route = {
        "response_model": ChatCompletionResponse,
        "responses": {
            **_ERROR_RESPONSES,
            200: {
                "description": "The completion (JSON), or server-sent ChatCompletionChunk events when stream is true.",
                "content": {SSE_MEDIA_TYPE: {}},
            },
        },
    }

    @app.post("/v1/chat/completions", **chat_route)
    async def chat_completions(request: Request, body: ChatCompletionRequest = Depends(chat_request_body)):
        """Create a chat completion (images as data URLs or allowlisted http(s) URLs)."""
        if not watch_disconnect:
            return await handler(body)
        # Streamed too: the handler waits for the first output (queued, encoded, prefilled) before the
        # response stream, which watches the client from then on, exists.
        return await _unless_disconnected(handler(body), request)

    # The OpenAPI document shows the route as FastAPI documents a body parameter: generated from a twin
    # route that declares ``body: ChatCompletionRequest`` and is never served.
    documented = APIRouter()

    @documented.post("/v1/chat/completions", name="chat_completions", **chat_route)
    async def documented_chat_completions(body: ChatCompletionRequest):
        """Create a chat completion (images as data URLs or allowlisted http(s) URLs)."""
        raise AssertionError("never served")  # pragma: no cover

    served = next(route for route in app.routes if getattr(route, "endpoint", None) is chat_completions)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            routes = [documented.routes[0] if route is served else route for route in app.routes]
            app.openapi_schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=routes
            )
        return app.openapi_schema

    app.openapi = openapi

    @app.get("/v1/models", response_model=ModelList)
    async def list_models() -> ModelList:
        """The served model."""
        return ModelList(data=[card])

    @app.get("/v1/models/{model_id:path}", response_model=ModelCard, responses={404: _ERROR_RESPONSES[404]})
    async def get_model(model_id: str) -> ModelCard:
        """One served model."""
        if model_id != card.id:
            raise APIError(
                f"model {model_id[:100]!r} is not served here",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        return card

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        """200 when every stage (ingress, vision, llm) is ready, else 503."""
        try:
            stages = await asyncio.wait_for(backend.health(), timeout=settings.health_timeout_s * 2)
        except TimeoutError:
            stages = {"backend": "health check timed out"}
        ready = {"ingress": True, **{name: reason is None for name, reason in stages.items()}}
        detail = {name: reason for name, reason in stages.items() if reason is not None}
        body = HealthResponse(status="ok" if not detail else "unavailable", stages=ready, detail=detail)
        return JSONResponse(body.model_dump(), status_code=200 if not detail else 503)

    @app.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        """Per stage and replica statistics: LLM KV use, encoder cache hit rate, ingress counters."""
        return {"model": settings.served_model_name, "ingress": counters.to_dict(), **(await backend.stats())}

    return app


#: Bodies up to this size are parsed and validated on the event loop (microseconds), larger ones with many
#: JSON objects (:data:`INLINE_BODY_CONTAINERS`) in a worker thread. A body of 200,000 messages held the
#: loop, and every stream of the replica, for about a second in FastAPI's own parsing.
INLINE_BODY_BYTES = 64 * 1024

#: Bodies with up to this many ``{`` / ``[`` are parsed on the event loop: parsing costs by the JSON
#: object, and an image is one string, so a body of pictures parses in microseconds however large it is.
INLINE_BODY_CONTAINERS = 2_000

_body_parser: ThreadPoolExecutor | None = None


def _body_parser_pool() -> ThreadPoolExecutor:
    """Where large bodies are parsed: two threads, apart from the default executor that prepares prompts
    and decodes images, so that a flood of large bodies queues here instead of starving those. Made on first
    use, and again in a forked child (an executor copied across a fork believes its parent's idle threads
    are there and never runs a job)."""
    global _body_parser
    if _body_parser is None:
        _body_parser = ThreadPoolExecutor(max_workers=2, thread_name_prefix="zipvl-body")
    return _body_parser


def _forget_body_parser() -> None:
    global _body_parser
    _body_parser = None


os.register_at_fork(after_in_child=_forget_body_parser)


def parse_chat_body(body: bytes, content_type: str | None) -> ChatCompletionRequest:
    """Parse and validate a ``POST /v1/chat/completions`` body as FastAPI does for a parameter
    ``body: ChatCompletionRequest``, in one function a worker thread can run.

    JSON only when ``content_type`` declares it (FastAPI's strict content type); the same errors as
    FastAPI's: :class:`RequestValidationError` (locations under ``"body"``, ``json_invalid`` for malformed
    JSON, ``missing`` for an empty body) or a 400 :class:`HTTPException` for a body that does not decode.

    Parameters
    ----------
    body : bytes
        The raw request body.
    content_type : str or None
        Its ``Content-Type`` header.

    Returns
    -------
    ChatCompletionRequest
    """
    if not body:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}]
        )
    value: Any = body
    if _declares_json(content_type):
        try:
            value = json.loads(body)
        except json.JSONDecodeError as e:
            error = {"type": "json_invalid", "loc": ("body", e.pos), "msg": "JSON decode error", "input": {}}
            raise RequestValidationError([{**error, "ctx": {"error": e.msg}}], body=e.doc) from e
        except Exception as e:  # invalid UTF-8, nesting too deep
            raise StarletteHTTPException(status_code=400, detail=FASTAPI_BODY_PARSE_ERROR) from e
    try:
        return ChatCompletionRequest.model_validate(value, from_attributes=True)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=value) from None


async def chat_request_body(request: Request) -> ChatCompletionRequest:
    """The request's :class:`ChatCompletionRequest`, parsed off the event loop when the body is large
    (a FastAPI dependency; :func:`parse_chat_body` says what it accepts)."""
    try:
        body = await request.body()
    except Exception as e:  # the client left during the upload: FastAPI's answer, a 400 (nobody reads it)
        raise StarletteHTTPException(status_code=400, detail=FASTAPI_BODY_PARSE_ERROR) from e
    content_type = request.headers.get("content-type")
    if len(body) <= INLINE_BODY_BYTES:
        return parse_chat_body(body, content_type)
    containers = request.scope.get(BODY_CONTAINERS_SCOPE_KEY)
    if containers is None:
        containers = body.count(b"{") + body.count(b"[")
    if containers <= INLINE_BODY_CONTAINERS:
        return parse_chat_body(body, content_type)
    # The request's context (its id on log lines, its span) goes along into the thread.
    work = functools.partial(contextvars.copy_context().run, parse_chat_body, body, content_type)
    return await asyncio.get_running_loop().run_in_executor(_body_parser_pool(), work)


async def _unless_disconnected(work, request: Request):
    """Await ``work`` unless the client disconnects first: then cancel it (its backend stream aborts the
    engine request and frees its KV) and answer 499, which nobody reads."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled() and watcher.exception() is None:
            return Response(status_code=499)
        raise
