"""API-key authentication: where keys come from, what the middleware lets through, what it answers."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.api.helpers import chat_body
from tests.deployments.fakes import FakeEngine, FakeVisionEncoder
from zipvl_ray.api.auth import APIKeyMiddleware, AuthSettings, parse_keys
from zipvl_ray.api.local import LocalBackend
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.config import EngineConfig

KEY = "zk-test-key-0123456789"
OTHER = "zk-other-key-9876543210"


@pytest.mark.parametrize(
    "environ, file_text, settings, expected",
    [
        ({}, None, {}, set()),
        ({"ZIPVL_API_KEYS": ""}, None, {}, set()),
        ({"ZIPVL_API_KEYS": KEY}, None, {}, {KEY}),
        ({"ZIPVL_API_KEYS": f" {KEY},{OTHER}\n"}, None, {}, {KEY, OTHER}),
        ({"MY_KEYS": KEY}, None, {"api_keys_env": "MY_KEYS"}, {KEY}),
        ({"ZIPVL_API_KEYS": KEY}, None, {"api_keys_env": None}, set()),
        ({}, f"{KEY}\n{OTHER}\n\n", {"api_keys_file": "<file>"}, {KEY, OTHER}),
        ({"ZIPVL_API_KEYS": KEY}, OTHER, {"api_keys_file": "<file>"}, {KEY, OTHER}),
    ],
)
def test_keys_come_from_the_named_variable_and_file(tmp_path, environ, file_text, settings, expected):
    if file_text is not None:
        path = tmp_path / "keys"
        path.write_text(file_text)
        settings = {**settings, "api_keys_file": str(path)}
    assert AuthSettings(**settings).load_keys(environ) == expected


@pytest.mark.parametrize(
    "environ, settings, fragment",
    [
        ({}, {"required": True}, "no API key was found in $ZIPVL_API_KEYS"),
        ({"ZIPVL_API_KEYS": "short"}, {}, "API key #1 in $ZIPVL_API_KEYS is malformed"),
        ({"ZIPVL_API_KEYS": f"{KEY},k\u00e9y-with-accent"}, {}, "API key #2"),
        ({}, {"api_keys_file": "/nonexistent/keys"}, "cannot read the API key file"),
    ],
)
def test_bad_or_missing_keys_fail_closed_without_echoing_them(environ, settings, fragment):
    with pytest.raises(ValueError, match="API key") as info:
        AuthSettings(**settings).load_keys(environ)
    assert fragment in str(info.value)
    assert "short" not in str(info.value) and "accent" not in str(info.value)


@pytest.mark.parametrize(
    "settings, fragment",
    [
        ({"api_keys_env": "NOT-A-NAME"}, "environment variable name"),
        ({"public_paths": ["health"]}, "start with '/'"),
        ({"api_key": KEY}, "Extra inputs are not permitted"),
    ],
)
def test_settings_are_validated(settings, fragment):
    with pytest.raises(ValueError, match=fragment):
        AuthSettings(**settings)


def test_keys_are_parsed_from_commas_and_whitespace():
    assert parse_keys(f"{KEY}, {OTHER}\n{KEY}", source="x") == {KEY, OTHER}


async def _ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"in"})


def _get(app, path: str, headers: dict[str, str] | None = None, root_path: str = "") -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app, root_path=root_path)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path, headers=headers or {})

    return asyncio.run(run())


@pytest.mark.parametrize(
    "path, headers, status, code",
    [
        ("/health", {}, 200, None),
        ("/v1/models", {}, 401, "missing_api_key"),
        ("/health/../v1/models", {}, 401, "missing_api_key"),
        ("/healthz", {}, 401, "missing_api_key"),
        ("/v1/models", {"Authorization": f"Bearer {KEY}"}, 200, None),
        ("/v1/models", {"Authorization": f"bearer   {OTHER}  "}, 200, None),
        ("/v1/models", {"Authorization": f"Bearer {KEY[:-1]}"}, 401, "invalid_api_key"),
        ("/v1/models", {"Authorization": f"Bearer {KEY}{KEY}"}, 401, "invalid_api_key"),
        ("/v1/models", {"Authorization": KEY}, 401, "invalid_authorization_header"),
        ("/v1/models", {"Authorization": f"Token {KEY}"}, 401, "invalid_authorization_header"),
        ("/v1/models", {"Authorization": "Bearer "}, 401, "invalid_authorization_header"),
        ("/v1/models", {"X-API-Key": KEY}, 401, "missing_api_key"),
    ],
)
def test_middleware_lets_through_only_valid_keys_and_public_paths(path, headers, status, code):
    response = _get(APIKeyMiddleware(_ok_app, [KEY, OTHER]), path, headers)
    assert response.status_code == status
    if status == 401:
        error = response.json()["error"]
        assert error == {
            "message": error["message"],
            "type": "authentication_error",
            "param": None,
            "code": code,
        }
        assert response.headers["www-authenticate"] == 'Bearer realm="zipvl-ray"'
        assert KEY not in response.text and OTHER not in response.text
    else:
        assert response.text == "in"


def test_public_paths_are_matched_below_the_route_prefix():
    app = APIKeyMiddleware(_ok_app, [KEY])
    assert _get(app, "/tight/health", root_path="/tight").status_code == 200
    assert _get(app, "/tight/v1/stats", root_path="/tight").status_code == 401


def test_middleware_needs_keys():
    with pytest.raises(ValueError, match="at least one key"):
        APIKeyMiddleware(_ok_app, [])


@pytest.fixture(scope="module")
def settings() -> ServingSettings:
    return ServingSettings(served_model_name="tiny-llava", model_source="tiny-llava", max_model_len=512)


def _app(prompt_processor, settings, **kwargs):
    engine = FakeEngine(engine=EngineConfig(max_model_len=512), token_delay_s=0)
    return build_openai_app(LocalBackend(engine, FakeVisionEncoder()), prompt_processor, settings, **kwargs)


def _call(app, method: str, path: str, headers: dict[str, str], body=None) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, headers=headers, json=body)

    return asyncio.run(run())


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("POST", "/v1/chat/completions", chat_body()),
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/tiny-llava", None),
        ("GET", "/v1/stats", None),
        ("GET", "/openapi.json", None),
        ("GET", "/docs", None),
    ],
)
def test_the_app_guards_every_route_but_health(prompt_processor, settings, method, path, body):
    app = _app(prompt_processor, settings, api_keys=[KEY])
    refused = _call(app, method, path, {}, body)
    assert refused.status_code == 401 and refused.headers["x-request-id"]
    assert _call(app, method, path, {"Authorization": f"Bearer {KEY}"}, body).status_code == 200
    assert _call(app, "GET", "/health", {}).status_code == 200


def test_the_app_reads_keys_from_its_settings(prompt_processor, monkeypatch):
    monkeypatch.setenv("ZIPVL_TEST_KEYS", KEY)
    settings = ServingSettings(
        served_model_name="tiny-llava",
        model_source="tiny-llava",
        max_model_len=512,
        auth=AuthSettings(api_keys_env="ZIPVL_TEST_KEYS"),
    )
    app = _app(prompt_processor, settings)
    assert app.state.authenticated
    assert _call(app, "GET", "/v1/models", {}).status_code == 401
    assert _call(app, "GET", "/v1/models", {"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_without_keys_the_app_is_open(prompt_processor, settings, monkeypatch):
    monkeypatch.delenv("ZIPVL_API_KEYS", raising=False)
    app = _app(prompt_processor, settings)
    assert not app.state.authenticated
    assert _call(app, "GET", "/v1/models", {"Authorization": "Bearer anything-at-all"}).status_code == 200
