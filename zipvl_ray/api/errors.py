"""Errors in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the HTTP layer returns goes through :func:`error_response`, so clients always get the
same JSON shape, a message that names the problem, and never a stack trace. :func:`install_error_handlers`
maps FastAPI/Starlette's own errors (malformed JSON, validation, unknown route) to the same format,
with status 400 instead of FastAPI's 422 (OpenAI answers invalid requests with 400).
"""

from __future__ import annotations

import email.message
import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

#: OpenAI's error ``type`` for each status family we return.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def _declares_json(content_type: str | None) -> bool:
    """Whether FastAPI parses a body of this content type as JSON (``application/json``,
    ``application/*+json``), decided as FastAPI decides it (the ``email`` package's parsing: a malformed type,
    such as one with two slashes, reads as ``text/plain``)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    if message.get_content_maintype() != "application":
        return False
    subtype = message.get_content_subtype()
    return subtype == "json" or subtype.endswith("+json")


#: FastAPI's detail when the body is not parseable at all (bad UTF-8, too deep, huge number).
FASTAPI_BODY_PARSE_ERROR = "There was an error parsing the body"

#: Scalar inputs echoed in validation messages are cut to this many characters (never image data).
MAX_ECHOED_INPUT_CHARS = 40


class APIError(Exception):
    """An error the HTTP layer reports to the client in OpenAI's format.

    Parameters
    ----------
    message : str
        What went wrong, naming the offending field or value.
    status_code : int
        HTTP status (4xx for the client's mistakes, 5xx for ours).
    type : str, optional
        OpenAI error type; derived from ``status_code`` when omitted.
    param : str, optional
        The request field at fault, as a path (``"messages[0].content[1].image_url.url"``).
    code : str, optional
        A stable machine-readable code (``"image_too_large"``, ``"model_not_found"``...).
    headers : dict, optional
        Response headers (``Retry-After`` on 503).
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type or ERROR_TYPES.get(
            status_code, "server_error" if status_code >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code
        self.headers = headers

    def to_dict(self) -> dict[str, Any]:
        """The JSON body: ``{"error": {...}}``."""
        return error_payload(self.message, type=self.type, param=self.param, code=self.code)


def error_payload(
    message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(error: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    """A JSON response carrying ``error`` with its status code (and its headers, then ``headers``)."""
    merged = {**(error.headers or {}), **(headers or {})}
    return JSONResponse(status_code=error.status_code, content=error.to_dict(), headers=merged or None)


#: Location items pydantic adds for the members of a union (``"str"``, ``"list[...]"``): not field names.
_UNION_MEMBER_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _is_union_tag(item: Any) -> bool:
    return isinstance(item, str) and (item in _UNION_MEMBER_TAGS or "[" in item)


def clean_location(loc: tuple[Any, ...] | list[Any]) -> tuple[Any, ...]:
    """Drop what pydantic adds to locations inside unions: member types and discriminator tags.

    ``("messages", 0, "content", "list[tagged-union[TextPart,ImagePart]]", 0, "image_url", "image_url", "url")``
    becomes ``("messages", 0, "content", 0, "image_url", "url")``, and ``(..., 0, "text", "cache_control")``
    (an unknown key on a text part) ``(..., 0, "cache_control")``.
    """
    items = list(loc)
    out: list[Any] = []
    tagged = False  # inside a list of a tagged union: the item after the index is the member's tag
    for i, item in enumerate(items):
        if _is_union_tag(item):
            tagged = "tagged-union[" in item
            continue
        after_index = isinstance(item, str) and bool(out) and isinstance(out[-1], int)
        # The tag, also recognised by the member's field of the same name that follows it.
        if after_index and (tagged or (i + 1 < len(items) and items[i + 1] == item)):
            tagged = False
            continue
        out.append(item)
    return tuple(out)


def format_location(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("body", "messages", 0, "content")`` -> ``"messages[0].content"`` (union noise removed)."""
    parts: list[str] = []
    for item in clean_location(loc):
        if item == "body" and not parts:
            continue
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _echo(value: Any) -> str:
    if isinstance(value, bool | int | float) or value is None:
        return json.dumps(value)
    if isinstance(value, str) and len(value) <= MAX_ECHOED_INPUT_CHARS:
        return json.dumps(value)
    return ""


def describe_validation_errors(errors: list[dict[str, Any]]) -> APIError:
    """Turn pydantic/FastAPI validation errors into one :class:`APIError` naming the first problem.

    Malformed JSON gets its own message; unknown fields are reported as unsupported parameters;
    small scalar inputs are echoed, anything long (such as image data) never is.
    """
    if not errors:
        return APIError("invalid request")
    # Inside a union, prefer the member the input was meant for over "should be a valid string": an
    # error about the whole value not being one member's type (its location ends at the member) goes last.
    ranked = sorted(
        errors,
        key=lambda e: (
            bool(e.get("loc")) and _is_union_tag(e["loc"][-1]) and e.get("type", "").endswith("_type")
        ),
    )
    first = ranked[0]
    kind = first.get("type", "")
    loc = tuple(first.get("loc", ()))
    param = format_location(loc) or None
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return APIError(
            f"malformed JSON body{': ' + str(detail) if detail else ''}", param=None, code="invalid_json"
        )
    if kind == "missing" and loc in (("body",), ()):
        return APIError("the request body is missing; send a JSON object", code="missing_body")
    if kind == "model_attributes_type" and loc in (("body",), ()):
        return APIError("the request body must be a JSON object", code="invalid_body")
    if kind == "extra_forbidden":
        return APIError(f"unsupported parameter {param!r}", param=param, code="unsupported_parameter")
    message = str(first.get("msg", "invalid value"))
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    echoed = _echo(first.get("input")) if "input" in first and kind != "missing" else ""
    suffix = f" (got {echoed})" if echoed and f"got {echoed}" not in message else ""
    more = f"; and {len(errors) - 1} more problem(s)" if len(errors) > 1 else ""
    text = f"{param}: {message}{suffix}{more}" if param else f"{message}{suffix}{more}"
    return APIError(text, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error ``app`` returns an OpenAI error body, with no stack trace."""

    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        error = describe_validation_errors(list(exc.errors()))
        if error.code == "invalid_body" and not _declares_json(request.headers.get("content-type")):
            # FastAPI reads a body as JSON only when declared so: the body may well be a JSON object.
            declared = (request.headers.get("content-type") or "none")[:60]
            error = APIError(
                f"the request body must be JSON sent with Content-Type: application/json (got {declared!r}; "
                "curl -d needs -H 'Content-Type: application/json')",
                status_code=415,
                code="unsupported_media_type",
            )
        return error_response(error)

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        code = None
        if status == 404:
            message = "no such route; see GET /docs for the API"
        elif status == 405:
            message = "method not allowed on this route"
        elif status == 400 and exc.detail == FASTAPI_BODY_PARSE_ERROR:
            message = (
                "malformed JSON body: it could not be parsed (invalid UTF-8, nesting too deep or a number "
                "with too many digits)"
            )
            code = "invalid_json"
        else:
            message = str(exc.detail)
        return error_response(
            APIError(message, status_code=status, code=code), headers=getattr(exc, "headers", None)
        )

    async def on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error(
            "unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__, exc_info=exc
        )
        return error_response(APIError("internal server error", status_code=500, code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected_error)
