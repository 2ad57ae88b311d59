"""The OpenAI-compatible HTTP layer: schemas, image intake, errors, SSE and the FastAPI application.

Pure Python on FastAPI and pydantic; no Ray. The Ray Serve glue lives in ``deployments/``.
"""

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
