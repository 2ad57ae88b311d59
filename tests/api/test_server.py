"""The HTTP application over an in-process fake engine and encoder, on a real loopback server (no Ray)."""

from __future__ import annotations

import json
import time

import pytest

from tests.api import service_checks as checks
from tests.api.conftest import MAX_MODEL_LEN
from tests.api.helpers import image_data_url


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
