"""The HTTP application over an in-process fake engine and encoder, on a real loopback server (no Ray)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest

from tests.api import service_checks as checks
from tests.api.conftest import MAX_MODEL_LEN
from tests.api.helpers import image_data_url
from zipvl_ray.api import server as server_module
from zipvl_ray.api.schemas import ChatCompletionRequest


@pytest.fixture(scope="module")
def target(local_service) -> checks.Target:
    return checks.Target(
        base_url=local_service.base_url,
        model="tiny-llava",
        max_model_len=MAX_MODEL_LEN,
        limits=local_service.settings.images,
        fake=True,
        timeout_s=30,
    )


def test_chat_with_image(target):
    body = checks.check_chat_with_image(target)
    assert body["choices"][0]["message"]["content"].startswith("echo:")


def test_stream_matches_non_stream(target):
    checks.check_stream_matches_non_stream(target)


def test_concurrent_requests_get_their_own_answers(target):
    checks.check_concurrent_requests(target, n=16)


def test_encoder_cache_hit(target):
    checks.check_encoder_cache_hit(target)


def test_tau_one_is_dense(target):
    checks.check_tau_one_is_dense(target)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_aborts_and_frees_kv(target, local_service, stream):
    local_service.engine.token_delay_s = 0.02
    try:
        aborted_before = len(local_service.engine.aborted)
        checks.check_disconnect_frees_kv(target, stream=stream)
        assert len(local_service.engine.aborted) == aborted_before + 1
    finally:
        local_service.engine.token_delay_s = 0.002


def test_a_streaming_client_leaving_before_the_first_token_is_aborted_at_once(target, local_service):
    """The handler waits for the first output before the response stream exists: a client that leaves
    while its request is queued or in prefill is cancelled then, not when the first token is ready."""
    import socket

    import httpx

    local_service.engine.token_delay_s = 5.0  # the first token takes 5 s
    try:
        aborted_before = len(local_service.engine.aborted)
        body = {**target.body("Stream a long answer.", []), "max_tokens": 50, "stream": True}
        payload = json.dumps(body).encode()
        url = httpx.URL(target.base_url)
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        with socket.create_connection((url.host, url.port or 80), timeout=30) as conn:
            conn.sendall(head.encode() + payload)
            time.sleep(0.3)
        left = time.monotonic()
        while len(local_service.engine.aborted) == aborted_before:
            assert time.monotonic() - left < 3.0, "the request ran on after its client left"
            time.sleep(0.05)
    finally:
        local_service.engine.token_delay_s = 0.002
    assert checks.llm_stats(target)["kv_bytes_used"] == 0


def test_bad_requests_get_openai_errors(target):
    cases = checks.check_bad_requests(target)
    assert len(cases) >= 25


def test_models_and_health(target):
    checks.check_models_and_health(target)


def test_zipvl_overrides_reach_the_engine(target, local_service):
    response = checks.chat(target, target.body("knobs", zipvl={"tau": 0.5, "max_keep_ratio": 0.3}))
    assert response.status_code == 200
    received = local_service.engine.received[-1]
    assert received["zipvl"] == {"tau": 0.5, "max_keep_ratio": 0.3}
    assert "tau:0.5" in response.json()["choices"][0]["message"]["content"]
    assert max(response.json()["zipvl"]["kept_ratio_per_layer"]) <= 0.3 + 1 / received["prompt_tokens"]


@pytest.mark.parametrize(
    "extra, finish_reason, check",
    [
        ({"max_tokens": 5}, "length", lambda text: len(text) == 5),
        ({"max_completion_tokens": 7, "max_tokens": 3}, "length", lambda text: len(text) == 7),
        ({"stop": "|img"}, "stop", lambda text: text.startswith("echo:") and "|img" not in text),
        ({"stop": ["zzz", "echo"]}, "stop", lambda text: text == ""),
        ({}, "stop", lambda text: text.endswith("|tau:0.975")),
    ],
)
def test_generation_limits(target, extra, finish_reason, check):
    body = {**target.body("limits"), **extra}
    if "max_tokens" not in extra:
        body.pop("max_tokens")
    response = checks.chat(target, body)
    text = checks.content(response)
    assert response.json()["choices"][0]["finish_reason"] == finish_reason
    assert check(text), text


def test_seeded_sampling_is_reproducible_and_seed_dependent(target):
    body = target.body("sample", temperature=1.0, seed=5)
    first, again = (checks.content(checks.chat(target, body)) for _ in range(2))
    other = checks.content(checks.chat(target, {**body, "seed": 6}))
    assert first == again and first != other


def test_request_body_over_the_limit_is_413(target, local_service):
    limit = local_service.settings.max_request_bytes
    body = target.body("x" * (limit + 10))
    with target.client() as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        # Without Content-Length (chunked upload) too.
        payload = (
            b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "'
            + b"y" * (limit + 10)
            + b'"}]}'
        )
        chunked = client.post("/v1/chat/completions", content=iter([payload[:1000], payload[1000:]]))
        assert "content-length" not in chunked.request.headers
        assert chunked.status_code == 413
        assert client.get("/health").status_code == 200


JSON = "application/json"
BAD_BODIES = {
    "truncated JSON": (b'{"model": "tiny-llava", "messages": [', JSON),
    "invalid UTF-8": (b'{"model": "tiny-llava\xff", "messages": []}', JSON),
    "an array": (b"[1, 2]", JSON),
    "a JSON body declared as text": (b'{"model": "tiny-llava", "messages": []}', "text/plain"),
    "no content type": (b'{"model": "tiny-llava", "messages": []}', None),
    "out of range": (
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "temperature": 9}',
        JSON,
    ),
    "unknown field": (
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}], "bogus": 1}',
        JSON,
    ),
    "a number for text": (b'{"model": "tiny-llava", "messages": [{"role": "user", "content": 5}]}', JSON),
    "nested too deep": (b"[" * 5000 + b"]" * 5000, JSON),
    "a malformed JSON type": (b'{"model": "tiny-llava", "messages": []}', "application/x/y+json"),
    "a JSON type with parameters": (
        b'{"model": "tiny-llava", "messages": []}',
        "Application/JSON; charset=utf-8",
    ),
    "a vendor JSON type": (b"[1]", "application/vnd.api+json"),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
def test_a_large_body_is_refused_as_a_small_one_is(target, case, monkeypatch):
    """Bodies over ``INLINE_BODY_BYTES`` with many JSON objects are parsed in a worker thread (here every
    body over the size): the same body with trailing JSON whitespace gets the same 4xx and message as when
    it is parsed on the event loop."""
    monkeypatch.setattr(server_module, "INLINE_BODY_CONTAINERS", -1)
    content, content_type = BAD_BODIES[case]
    padded = content + b" " * (server_module.INLINE_BODY_BYTES + 1)
    headers = {"content-type": content_type} if content_type else {}
    with target.client() as client:
        small, large = (
            client.post("/v1/chat/completions", content=c, headers=headers) for c in (content, padded)
        )
        assert 400 <= small.status_code < 500, small.text
        assert (large.status_code, large.json()) == (small.status_code, small.json())
        assert client.get("/health").status_code == 200


@pytest.mark.parametrize("padded", [False, True])
def test_the_body_parser_answers_as_fastapi_does(monkeypatch, padded):
    """``chat_request_body`` against FastAPI's own parsing of a ``body: ChatCompletionRequest`` parameter,
    both behind the service's error handlers: the same status and message for every bad body (and a valid
    one), inline and (padded, every body to the thread) in the worker thread."""
    from fastapi import Depends, FastAPI

    from zipvl_ray.api.errors import install_error_handlers
    from zipvl_ray.api.server import chat_request_body

    monkeypatch.setattr(server_module, "INLINE_BODY_CONTAINERS", -1)
    reference, ours = FastAPI(), FastAPI()
    for app in (reference, ours):
        install_error_handlers(app)

    @reference.post("/c")
    async def fastapi_parses(body: ChatCompletionRequest):
        return {"model": body.model}

    @ours.post("/c")
    async def we_parse(body: ChatCompletionRequest = Depends(chat_request_body)):
        return {"model": body.model}

    valid = (json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode(), JSON)

    async def answers(app, content, content_type):
        headers = {"content-type": content_type} if content_type else {}
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post("/c", content=content, headers=headers)
        return response.status_code, response.json()

    for name, (content, content_type) in {**BAD_BODIES, "valid": valid}.items():
        if padded:
            content += b" " * (server_module.INLINE_BODY_BYTES + 1)
        expected = asyncio.run(answers(reference, content, content_type))
        assert asyncio.run(answers(ours, content, content_type)) == expected, name


def metadata_of_braces(pairs: int = 16) -> dict[str, str]:
    """``metadata`` (accepted, ignored) holding 512 ``{`` per value: JSON objects as the ingress counts them."""
    return {f"k{i}": "{" * 512 for i in range(pairs)}


def test_a_large_body_is_validated_off_the_event_loop(target, monkeypatch):
    """A large body of many JSON objects is parsed and validated in a worker thread: the server answers
    other requests meanwhile (FastAPI's own parsing held the loop, and every stream on it, for about a second
    for 200,000 messages). Validation is slowed here to make the window certain."""
    validate = ChatCompletionRequest.model_validate
    calls, done = [], threading.Event()

    def slow_validate(value, **kwargs):
        try:
            asyncio.get_running_loop()
            calls.append("on the event loop")
        except RuntimeError:
            calls.append("off the loop")
        time.sleep(1.0)
        try:
            return validate(value, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(ChatCompletionRequest, "model_validate", slow_validate)
    payload = target.body("What is this?", metadata=metadata_of_braces())
    body = json.dumps(payload).encode() + b" " * (server_module.INLINE_BODY_BYTES + 1)
    assert body.count(b"{") > server_module.INLINE_BODY_CONTAINERS
    result = {}

    def post():
        with target.client() as client:
            result["chat"] = client.post("/v1/chat/completions", content=body, headers={"content-type": JSON})

    poster = threading.Thread(target=post)
    poster.start()
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:
        time.sleep(0.01)
    with target.client() as client:
        models = client.get("/v1/models")
    answered_while_validating = not done.is_set()
    poster.join(timeout=30)
    assert calls == ["off the loop"]
    assert models.status_code == 200 and answered_while_validating
    checks.content(result["chat"])


def test_a_large_body_of_few_objects_is_parsed_on_the_loop(target, monkeypatch):
    """Parsing costs by the JSON object: a body of pictures (one string each) is parsed where it arrives,
    however large; one of many objects goes to the worker thread."""
    validate = ChatCompletionRequest.model_validate
    where = []

    def recording_validate(value, **kwargs):
        try:
            asyncio.get_running_loop()
            where.append("loop")
        except RuntimeError:
            where.append("thread")
        return validate(value, **kwargs)

    monkeypatch.setattr(ChatCompletionRequest, "model_validate", recording_validate)
    pad = b" " * (server_module.INLINE_BODY_BYTES + 1)
    with target.client() as client:
        for payload in (
            target.body("What is this?"),
            target.body("What is this?", metadata=metadata_of_braces(4)),
        ):
            body = json.dumps(payload).encode() + pad
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": JSON})
            checks.content(response)
    assert where == ["loop", "thread"]


def test_a_client_that_leaves_during_the_upload_is_no_server_error(prompt_processor, caplog):
    """A body that never finishes arriving (the client went away) is FastAPI's 400, nobody reads it; it was
    a 500 logged as an unhandled error with its traceback."""
    import logging

    from tests.deployments.fakes import FakeEngine
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.api.server import ServingSettings, build_openai_app

    app = build_openai_app(
        LocalBackend(FakeEngine()),
        prompt_processor,
        ServingSettings(served_model_name="tiny-llava", model_source="tiny-llava", max_model_len=512),
    )
    messages = iter(
        [
            {"type": "http.request", "body": b'{"model": "tiny-llava", ', "more_body": True},
            {"type": "http.disconnect"},
        ]
    )
    sent = []

    async def receive():
        return next(messages)

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    with caplog.at_level(logging.INFO):
        asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_the_body_parser_is_made_again_in_a_forked_child():
    """An executor copied across a fork believes its parent's idle threads are there and never runs a job:
    a child forked after the parent parsed a large body makes its own."""
    import multiprocessing

    pool = server_module._body_parser_pool()
    assert pool.submit(lambda: 1).result(timeout=10) == 1
    context = multiprocessing.get_context("fork")
    results = context.Queue()

    def child():
        try:
            fresh = server_module._body_parser_pool()
            results.put(fresh is not pool and fresh.submit(lambda: 2).result(timeout=5) == 2)
        except Exception as exc:  # pragma: no cover - reported to the parent
            results.put(repr(exc))

    process = context.Process(target=child)
    process.start()
    try:
        assert results.get(timeout=30) is True
    finally:
        process.join(timeout=10)
        if process.is_alive():  # pragma: no cover
            process.kill()


def test_stats_report_ingress_llm_and_vision(target):
    checks.content(checks.chat(target, target.body("stats", [image_data_url(3)])))
    with target.client() as client:
        stats = client.get("/v1/stats").json()
    assert stats["model"] == "tiny-llava"
    assert stats["ingress"]["requests"] >= 1 and stats["ingress"]["in_flight"] >= 1
    assert {"kv_bytes_used", "kv_bytes_capacity", "num_running"} <= set(stats["llm"][0])
    assert {"hits", "misses", "hit_rate"} <= set(stats["vision"][0])


def test_openapi_schema_documents_the_routes(target):
    with target.client() as client:
        schema = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/models", "/health", "/v1/stats"} <= set(schema["paths"])
    assert "zipvl" in schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]


def test_service_healthy_after_everything(target):
    time.sleep(0.1)
    with target.client() as client:
        assert client.get("/health").status_code == 200
