"""The OpenAI-compatible HTTP layer: schemas, image intake, errors, SSE and the FastAPI application.

Pure Python on FastAPI and pydantic; no Ray. The Ray Serve glue lives in ``deployments/``.

Exports are imported on first use: Serve's HTTP proxy imports ``zipvl_ray.api.middleware`` (its
request-id and error callback) at start-up and must not pay for the server, the prompt processor
and torch, which it never uses (a slow start fails the proxy's readiness check on a busy node).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zipvl_ray._lazy import lazy_getattr

_EXPORTS = {
    "APIKeyMiddleware": "zipvl_ray.api.auth",
    "AuthSettings": "zipvl_ray.api.auth",
    "APIError": "zipvl_ray.api.errors",
    "error_payload": "zipvl_ray.api.errors",
    "install_error_handlers": "zipvl_ray.api.errors",
    "ImageLimits": "zipvl_ray.api.images",
    "decode_image": "zipvl_ray.api.images",
    "load_image": "zipvl_ray.api.images",
    "parse_data_url": "zipvl_ray.api.images",
    "ChatCompletionChunk": "zipvl_ray.api.schemas",
    "ChatCompletionRequest": "zipvl_ray.api.schemas",
    "ChatCompletionResponse": "zipvl_ray.api.schemas",
    "ZipVLReport": "zipvl_ray.api.schemas",
    "ChatPreparer": "zipvl_ray.api.server",
    "InferenceBackend": "zipvl_ray.api.server",
    "ServingSettings": "zipvl_ray.api.server",
    "build_openai_app": "zipvl_ray.api.server",
    "SSE_DONE": "zipvl_ray.api.sse",
    "parse_sse": "zipvl_ray.api.sse",
    "sse_event": "zipvl_ray.api.sse",
}

if TYPE_CHECKING:
    from zipvl_ray.api.auth import APIKeyMiddleware, AuthSettings
    from zipvl_ray.api.errors import APIError, error_payload, install_error_handlers
    from zipvl_ray.api.images import ImageLimits, decode_image, load_image, parse_data_url
    from zipvl_ray.api.schemas import (
        ChatCompletionChunk,
        ChatCompletionRequest,
        ChatCompletionResponse,
        ZipVLReport,
    )
    from zipvl_ray.api.server import ChatPreparer, InferenceBackend, ServingSettings, build_openai_app
    from zipvl_ray.api.sse import SSE_DONE, parse_sse, sse_event


__getattr__ = lazy_getattr(__name__, _EXPORTS)


__all__ = [
    "SSE_DONE",
    "APIError",
    "APIKeyMiddleware",
    "AuthSettings",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatPreparer",
    "ImageLimits",
    "InferenceBackend",
    "ServingSettings",
    "ZipVLReport",
    "build_openai_app",
    "decode_image",
    "error_payload",
    "install_error_handlers",
    "load_image",
    "parse_data_url",
    "parse_sse",
    "sse_event",
]
