"""OpenAI error format: locations, validation messages, handlers that never leak a stack trace."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from zipvl_ray.api.errors import (
    APIError,
    clean_location,
    describe_validation_errors,
    format_location,
    install_error_handlers,
)


@pytest.mark.parametrize(
    "loc, text",
    [
        (("body", "messages", 0, "content"), "messages[0].content"),
        (
            (
                "body",
                "messages",
                0,
                "content",
                "list[tagged-union[TextPart,ImagePart]]",
                1,
                "image_url",
                "image_url",
                "url",
            ),
            "messages[0].content[1].image_url.url",
        ),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "zipvl", "tau"), "zipvl.tau"),
        (("body",), ""),
    ],
)
def test_format_location(loc, text):
    assert format_location(loc) == text


def test_clean_location_keeps_real_repeated_names_outside_tagged_unions():
    assert clean_location(("a", "a", "b")) == ("a", "a", "b")


@pytest.mark.parametrize(
    "errors, message, param, code",
    [
        (
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", 5),
                    "msg": "JSON decode error",
                    "ctx": {"error": "Expecting value"},
                }
            ],
            "malformed JSON body: Expecting value",
            None,
            "invalid_json",
        ),
        (
            [{"type": "missing", "loc": ("body",), "msg": "Field required"}],
            "the request body is missing; send a JSON object",
            None,
            "missing_body",
        ),
        (
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("body", "tools"),
                    "msg": "Extra inputs are not permitted",
                    "input": [],
                }
            ],
            "unsupported parameter 'tools'",
            "tools",
            "unsupported_parameter",
        ),
        (
            [
                {
                    "type": "less_than_equal",
                    "loc": ("body", "temperature"),
                    "msg": "Input should be less than or equal to 2",
                    "input": 5,
                }
            ],
            "temperature: Input should be less than or equal to 2 (got 5)",
            "temperature",
            "invalid_value",
        ),
        (
            [
                {
                    "type": "value_error",
                    "loc": ("body", "n"),
                    "msg": "Value error, only n=1 is supported",
                    "input": 2,
                }
            ],
            "n: only n=1 is supported (got 2)",
            "n",
            "invalid_value",
        ),
        (
            [
                {
                    "type": "string_type",
                    "loc": ("body", "model"),
                    "msg": "Input should be a valid string",
                    "input": "x" * 500,
                }
            ],
            "model: Input should be a valid string",
            "model",
            "invalid_value",
        ),
        (
            [
                {
                    "type": "string_type",
                    "loc": ("body", "messages", 0, "content", "str"),
                    "msg": "Input should be a valid string",
                    "input": [],
                },
                {
                    "type": "missing",
                    "loc": ("body", "messages", 0, "content", "list[x]", 0, "text", "text"),
                    "msg": "Field required",
                    "input": {},
                },
            ],
            "messages[0].content[0].text: Field required; and 1 more problem(s)",
            "messages[0].content[0].text",
            "invalid_value",
        ),
    ],
)
def test_describe_validation_errors(errors, message, param, code):
    error = describe_validation_errors(errors)
    assert (error.message, error.param, error.code, error.status_code) == (message, param, code, 400)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    x: int = Field(ge=0)


def _app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(body: _Body):
        return {"x": body.x}

    @app.get("/teapot")
    async def teapot():
        raise APIError("short and stout", status_code=418, code="teapot")

    @app.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail")

    return app


@pytest.mark.parametrize(
    "method, path, kwargs, status, fragment",
    [
        ("POST", "/echo", {"content": b"{not json"}, 400, "malformed JSON"),
        ("POST", "/echo", {"json": {"x": -1}}, 400, "x: Input should be greater than or equal to 0"),
        ("POST", "/echo", {"json": {"x": 1, "y": 2}}, 400, "unsupported parameter 'y'"),
        ("POST", "/echo", {"json": [1, 2]}, 400, "JSON object"),
        ("GET", "/nowhere", {}, 404, "no such route"),
        ("GET", "/echo", {}, 405, "method not allowed"),
        ("GET", "/teapot", {}, 418, "short and stout"),
        ("GET", "/boom", {}, 500, "internal server error"),
    ],
)
def test_handlers_answer_in_openai_format(method, path, kwargs, status, fragment):
    async def call():
        transport = httpx.ASGITransport(app=_app(), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            headers = {"content-type": "application/json"} if "content" in kwargs else None
            return await client.request(method, path, headers=headers, **kwargs)

    response = asyncio.run(call())
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert fragment in body["error"]["message"]
    assert "Traceback" not in response.text and "secret internal detail" not in response.text


@pytest.mark.parametrize(
    "content, param, message",
    [
        (
            [{"type": "image_url", "image_url": "data:image/png;base64,AAAA"}],
            "messages[0].content[0].image_url",
            "valid dictionary",
        ),
        ([{"type": "text", "text": 5}], "messages[0].content[0].text", "valid string (got 5)"),
        (
            [{"type": "text", "text": "x", "cache_control": {}}],
            "messages[0].content[0].cache_control",
            "unsupported",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "u"}, "foo": 1}],
            "messages[0].content[0].foo",
            "unsupported",
        ),
        (
            [{"type": "image_url", "image_url": {"url": "u", "x": 1}}],
            "messages[0].content[0].image_url.x",
            "unsupported",
        ),
        ([{"type": "text"}], "messages[0].content[0].text", "Field required"),
    ],
)
def test_real_validation_errors_name_the_content_part_at_fault(content, param, message):
    """Pydantic's own errors for a list content (the union's `str` member fails too): the part, not the union."""
    from pydantic import ValidationError

    from zipvl_ray.api.schemas import ChatCompletionRequest

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": content}]}
        )
    error = describe_validation_errors(list(info.value.errors()))
    assert error.param == param and message in str(error), str(error)
