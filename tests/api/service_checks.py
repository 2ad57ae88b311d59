"""Checks of a running zipvl-ray HTTP service, shared by every way the tests run it.

The same functions run against the in-process app (fake engine, uvicorn), the Ray Serve application
with fakes injected, and ``serve run configs/zipvl.yaml`` with the real engine, so the three cannot
drift apart. They use only HTTP; engine-specific expectations are switched by ``Target.fake``.
"""

from __future__ import annotations

import json
import math
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.api.helpers import chat_body, data_url, encode, image_data_url, png_header_only, random_image
from zipvl_ray.api.images import ImageLimits
from zipvl_ray.api.sse import parse_sse


@dataclass
class Target:
    """A running service and what the checks need to know about it."""

    base_url: str
    model: str
    max_model_len: int
    limits: ImageLimits = field(default_factory=ImageLimits)
    fake: bool = True
    timeout_s: float = 120.0

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=self.timeout_s)

    def body(self, text: str = "What is this?", image_urls: list[str] | None = None, **extra) -> dict:
        body = chat_body(text, image_urls, **extra)
        body["model"] = self.model
        if not self.fake:
            # Random-weight models may emit EOS at once: force a fixed length so answers are comparable.
            body.setdefault("ignore_eos", True)
            body["max_tokens"] = extra.get("max_tokens", 8)
        return body


def chat(target: Target, body: dict, client: httpx.Client | None = None) -> httpx.Response:
    if client is not None:
        return client.post("/v1/chat/completions", json=body)
    with target.client() as own:
        return own.post("/v1/chat/completions", json=body)


def content(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stream_events(target: Target, body: dict) -> list[Any]:
    with (
        target.client() as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(r.read().decode()))


def answered_stats(target: Target, stage: str, *, timeout_s: float = 60.0) -> list[dict]:
    """``GET /v1/stats``'s entries for ``stage`` (``llm`` or ``vision``) once every replica answered.

    A busy replica can miss the ingress's deadline; its entry is then ``{"replica", "error"}``, whose
    figures would read as zeros. Such an answer is asked again, not summed.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        with target.client() as client:
            replicas = client.get("/v1/stats").json()[stage]
        if replicas and not any("error" in r for r in replicas):
            return replicas
        assert time.monotonic() < deadline, f"/v1/stats: not every {stage} replica answered: {replicas}"
        time.sleep(0.2)


def llm_stats(target: Target) -> dict[str, float]:
    """KV bytes used, running and aborted requests, summed over the LLM replicas."""
    replicas = answered_stats(target, "llm")
    return {
        key: sum(float(r.get(key, 0)) for r in replicas)
        for key in ("kv_bytes_used", "num_running", "num_aborted", "num_finished")
    }


def encoder_stats(target: Target) -> dict[str, float]:
    replicas = answered_stats(target, "vision")
    return {key: sum(float(r.get(key, 0)) for r in replicas) for key in ("hits", "misses")}


# ---------------------------------------------------------------------------------------------------


def check_chat_with_image(target: Target) -> dict:
    """A chat completion with an image: 200, text, usage and zipvl stats."""
    response = chat(target, target.body("Describe the picture.", [image_data_url(11)]))
    text = content(response)
    body = response.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == target.model
    assert text, "empty answer"
    usage = body["usage"]
    assert usage["completion_tokens"] >= 1
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    zipvl = body["zipvl"]
    assert zipvl["image_tokens"] >= 1 and usage["prompt_tokens"] > zipvl["image_tokens"]
    assert zipvl["kept_ratio_per_layer"] and all(0 < r <= 1 for r in zipvl["kept_ratio_per_layer"])
    assert math.isclose(
        zipvl["mean_kept_ratio"],
        sum(zipvl["kept_ratio_per_layer"]) / len(zipvl["kept_ratio_per_layer"]),
        rel_tol=1e-4,
    )
    assert 0 < zipvl["kv_bytes"] <= zipvl["kv_bytes_dense"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    return body


def check_stream_matches_non_stream(target: Target, *, seed: int = 1234, temperature: float = 0.8) -> None:
    """For a fixed seed, the streamed text equals the non-streamed text; the stream is OpenAI-shaped."""
    body = target.body("Tell me a story.", [image_data_url(12)], seed=seed, temperature=temperature)
    whole = chat(target, body).json()
    events = stream_events(target, {**body, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishing = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finishing) == 1 and "zipvl" in finishing[0]
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    streamed = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    assert finishing[0]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert finishing[0]["zipvl"] == whole["zipvl"]
    # Same seed again: same answer; without include_usage there is no usage key at all.
    events = stream_events(target, body)
    assert all("usage" not in c for c in events[:-1])
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1] if c["choices"])
        == streamed
    )


def check_concurrent_requests(target: Target, n: int = 16) -> None:
    """``n`` concurrent requests all succeed, and each gets the answer it gets when sent alone."""
    bodies = [target.body(f"Question number {i}.", [image_data_url(100 + i % 4)]) for i in range(n)]
    alone = {i: content(chat(target, bodies[i])) for i in (0, 5, n - 1)}
    with target.client() as client, ThreadPoolExecutor(max_workers=n) as pool:
        answers = list(pool.map(lambda b: content(chat(target, b, client)), bodies))
    assert len(answers) == n
    for i, answer in alone.items():
        assert answers[i] == answer, f"request {i} got another answer under concurrency"
    if target.fake:
        for i, answer in enumerate(answers):
            assert f"number {i}." in answer, f"request {i} got {answer!r}"


def check_encoder_cache_hit(target: Target) -> None:
    """A repeated image hits the encoder cache (visible in /v1/stats), and the answer is unchanged."""
    body = target.body("Same image twice.", [image_data_url(777, size=(48, 40))])
    before = encoder_stats(target)
    first = content(chat(target, body))
    middle = encoder_stats(target)
    second = content(chat(target, body))
    after = encoder_stats(target)
    assert middle["misses"] == before["misses"] + 1
    assert after["hits"] == middle["hits"] + 1 and after["misses"] == middle["misses"]
    assert first == second


def check_disconnect_frees_kv(target: Target, *, max_tokens: int = 200, stream: bool = True) -> None:
    """A client that disconnects mid-generation (mid-stream, or while waiting for a non-streamed answer)
    leaves the LLM replicas' KV use back at baseline."""
    baseline = llm_stats(target)
    body = {
        **target.body("Stream a long answer.", [image_data_url(13)]),
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }

    def running() -> bool:
        during = llm_stats(target)
        return (
            during["kv_bytes_used"] > baseline["kv_bytes_used"]
            or during["num_running"] > baseline["num_running"]
        )

    if stream:
        with (
            target.client() as client,
            client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r,
        ):
            assert r.status_code == 200
            lines = r.iter_lines()
            received = [line for line, _ in zip(lines, range(6), strict=False) if line]
            assert len(received) >= 2
            deadline = time.monotonic() + 30  # the stream is open, so the request runs; the stats may lag
            while not running():
                assert time.monotonic() < deadline, "the streaming request never showed as running"
                time.sleep(0.05)
    else:  # a raw connection, closed without reading the answer
        url = httpx.URL(target.base_url)
        payload = json.dumps(body).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {url.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        )
        with socket.create_connection((url.host, url.port or 80), timeout=30) as conn:
            conn.sendall(head.encode() + payload)
            deadline = time.monotonic() + 30
            while not running():
                assert time.monotonic() < deadline, "the request never ran"
                time.sleep(0.05)
    deadline = time.monotonic() + 30
    while True:
        now = llm_stats(target)
        if (
            now["kv_bytes_used"] == baseline["kv_bytes_used"]
            and now["num_running"] == baseline["num_running"]
        ):
            break
        assert time.monotonic() < deadline, f"KV not freed after disconnect: {now} vs {baseline}"
        time.sleep(0.2)
    assert now["num_aborted"] >= baseline["num_aborted"] + 1
    assert now["num_finished"] == baseline["num_finished"]


def check_tau_one_is_dense(target: Target) -> None:
    """Per-request ``zipvl.tau = 1.0`` (and no per-layer cap: the served config may set one, e.g.
    zipvl-tiny's 0.6) answers token for token like ZipVL switched off, keeping every token."""
    base = target.body("Compare dense and sparse.", [image_data_url(14)], max_tokens=12)
    tau_one = chat(target, {**base, "zipvl": {"tau": 1.0, "max_keep_ratio": 1.0}}).json()
    dense = chat(target, {**base, "zipvl": {"enabled": False}}).json()
    assert tau_one["choices"][0]["message"]["content"] == dense["choices"][0]["message"]["content"]
    assert tau_one["usage"] == dense["usage"]
    assert tau_one["zipvl"]["kept_ratio_per_layer"] == [1.0] * len(tau_one["zipvl"]["kept_ratio_per_layer"])
    assert tau_one["zipvl"]["kv_bytes"] == dense["zipvl"]["kv_bytes"]


def bad_requests(target: Target) -> list[tuple[str, Any, int, str]]:
    """``(case, body, status, fragment of the message)``; a body that is ``bytes`` is sent raw."""
    limits = target.limits
    side = math.isqrt(limits.max_image_pixels) + 1
    big = max(16, math.isqrt(limits.max_image_bytes // 3) + 64)
    too_many_bytes = (
        data_url(encode(random_image(5, (big, big)), "PNG")) if big * big <= limits.max_image_pixels else None
    )
    cases: list[tuple[str, Any, int, str]] = [
        ("malformed JSON", b'{"model": "x", "messages": [', 400, "malformed JSON"),
        ("body not an object", b"[1, 2]", 400, "JSON object"),
        ("no messages", target.body() | {"messages": []}, 400, "messages"),
        ("missing messages", {"model": target.model}, 400, "messages: Field required"),
        (
            "unknown role",
            target.body() | {"messages": [{"role": "tool", "content": "x"}]},
            400,
            "messages[0].role",
        ),
        (
            "empty content",
            target.body() | {"messages": [{"role": "user", "content": ""}]},
            400,
            "content is empty",
        ),
        ("undecodable image", target.body(image_urls=[data_url(b"garbage bytes")]), 400, "not a decodable"),
        (
            "truncated image",
            target.body(image_urls=[data_url(encode(random_image(1), "PNG")[:100])]),
            400,
            "truncated",
        ),
        ("pixel bomb", target.body(image_urls=[data_url(png_header_only(side, side))]), 400, "pixels"),
        ("wrong MIME", target.body(image_urls=["data:text/html;base64,PGI+"]), 400, "MIME type"),
        (
            "remote URL",
            target.body(image_urls=["https://example.com/cat.png"]),
            400,
            "remote image URLs are disabled",
        ),
        (
            "too many images",
            target.body(image_urls=[image_data_url(i) for i in range(limits.max_images + 1)]),
            400,
            "at most",
        ),
        ("max_tokens 0", target.body() | {"max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens too big", target.body() | {"max_tokens": target.max_model_len + 1}, 400, "max_tokens"),
        ("max_tokens wrong type", target.body() | {"max_tokens": "5"}, 400, "max_tokens"),
        ("temperature", target.body() | {"temperature": 2.5}, 400, "temperature"),
        ("top_p", target.body() | {"top_p": 0}, 400, "top_p"),
        ("tau too big", target.body() | {"zipvl": {"tau": 1.5}}, 400, "zipvl.tau"),
        ("tau zero", target.body() | {"zipvl": {"tau": 0}}, 400, "zipvl.tau"),
        ("max_keep_ratio", target.body() | {"zipvl": {"max_keep_ratio": -0.1}}, 400, "zipvl.max_keep_ratio"),
        ("unknown zipvl knob", target.body() | {"zipvl": {"probe_random": 3}}, 400, "zipvl.probe_random"),
        ("n > 16", target.body() | {"n": 17}, 400, "n:"),
        ("unsupported parameter", target.body() | {"best_of": 2}, 400, "unsupported parameter 'best_of'"),
        ("tools", target.body() | {"tools": [{"type": "function"}]}, 400, "tools are not supported"),
        ("penalty", target.body() | {"presence_penalty": 2.5}, 400, "presence_penalty"),
        ("prompt too long", target.body("x" * (target.max_model_len + 10)), 400, "max_model_len"),
        ("unknown model", target.body() | {"model": "gpt-17"}, 404, "not served here"),
    ]
    if too_many_bytes is not None:
        cases.append(("image over byte limit", target.body(image_urls=[too_many_bytes]), 400, "bytes"))
    return cases


def check_bad_requests(target: Target) -> list[str]:
    """Every bad request gets a 4xx JSON error in OpenAI's format naming the problem; the service stays healthy."""
    failures = []
    with target.client() as client:
        for case, body, status, fragment in bad_requests(target):
            if isinstance(body, bytes):
                response = client.post(
                    "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
                )
            else:
                response = client.post("/v1/chat/completions", json=body)
            try:
                payload = response.json()
            except json.JSONDecodeError:
                payload = {}
            error = payload.get("error") if isinstance(payload, dict) else None
            ok = (
                response.status_code == status
                and isinstance(error, dict)
                and set(error) == {"message", "type", "param", "code"}
                and fragment in error["message"]
                and "Traceback" not in response.text
            )
            if not ok:
                failures.append(f"{case}: {response.status_code} {response.text[:300]}")
        health = client.get("/health")
    assert not failures, "\n".join(failures)
    assert health.status_code == 200, health.text
    return [case for case, *_ in bad_requests(target)]


def check_models_and_health(target: Target) -> None:
    with target.client() as client:
        models = client.get("/v1/models").json()
        assert models["object"] == "list" and [m["id"] for m in models["data"]] == [target.model]
        assert client.get(f"/v1/models/{target.model}").json()["max_model_len"] == target.max_model_len
        assert client.get("/v1/models/nope").status_code == 404
        health = client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        assert all(health.json()["stages"].values()) and {"ingress", "llm", "vision"} <= set(
            health.json()["stages"]
        )
