"""``n`` choices per request, over the real engine (zipvl-tiny) in this process on a loopback server.

Each choice is an engine request of its own, sharing the prepared prompt; with a seed, choice ``i`` is
the answer a single request with ``seed + i`` gets.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import uvicorn

from tests.api.helpers import chat_body
from tests.deployments.conftest import free_port
from zipvl_ray.api.local import LocalBackend
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.config import EngineConfig
from zipvl_ray.engine import AsyncLLMEngine
from zipvl_ray.models import load_processor
from zipvl_ray.multimodal import PromptProcessor

SETTINGS = ServingSettings(served_model_name="zipvl-tiny", model_source="zipvl-tiny", max_model_len=512)


@pytest.fixture(scope="module")
def service():
    engine = AsyncLLMEngine.from_pretrained(
        "zipvl-tiny", device="cpu", engine=EngineConfig(max_model_len=512, kv_cache_bytes=2 << 20)
    )
    app = build_openai_app(LocalBackend(engine), PromptProcessor(load_processor("zipvl-tiny")), SETTINGS)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", engine
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        engine.shutdown()


def body(**extra) -> dict:
    fields = {"model": "zipvl-tiny", "max_tokens": 6, "ignore_eos": True, "temperature": 1.0, **extra}
    return chat_body("What shape is in the image?", **fields)


def post(url: str, payload: dict) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as client:
        return client.post("/v1/chat/completions", json=payload)


def events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_seeded_choices_are_the_answers_of_single_requests_with_consecutive_seeds(service):
    url, _engine = service
    answer = post(url, body(n=3, seed=11, logprobs=True)).json()
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    singles = [post(url, body(seed=11 + i, logprobs=True)).json()["choices"][0] for i in range(3)]
    for choice, single in zip(choices, singles, strict=True):
        assert choice["message"] == single["message"] and choice["finish_reason"] == "length"
        # The same tokens; their log-probabilities to rounding (a batch of three vs one request).
        ours, theirs = choice["logprobs"]["content"], single["logprobs"]["content"]
        assert [e["token"] for e in ours] == [e["token"] for e in theirs]
        assert [e["logprob"] for e in ours] == pytest.approx([e["logprob"] for e in theirs], abs=1e-4)
    assert answer["usage"]["completion_tokens"] == 3 * 6
    assert answer["usage"]["prompt_tokens"] == post(url, body(seed=1)).json()["usage"]["prompt_tokens"]


def test_streamed_choices_carry_their_index_and_add_up_to_the_answer(service):
    url, _engine = service
    payload = body(n=2, seed=5, stream_options={"include_usage": True}, stream=True)
    chunks = events(post(url, payload))
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 2 * 6
    texts, roles, finishes = {0: "", 1: ""}, [], []
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] += choice["delta"].get("content") or ""
        if choice["delta"].get("role"):
            roles.append(choice["index"])
        if choice["finish_reason"] is not None:
            finishes.append(choice["index"])
    assert sorted(roles) == [0, 1] and sorted(finishes) == [0, 1]
    whole = post(url, body(n=2, seed=5)).json()["choices"]
    assert [texts[0], texts[1]] == [c["message"]["content"] for c in whole]


def test_a_client_leaving_a_stream_of_choices_aborts_every_one(service):
    url, engine = service
    before = engine.stats()
    payload = body(n=3, max_tokens=400, stream=True)
    with (
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/chat/completions", json=payload) as response,
    ):
        assert response.status_code == 200
        seen = 0
        for line in response.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 6:  # the three role chunks and some text
                break
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.kv_bytes_used == 0:
            break
        time.sleep(0.05)
    assert stats.kv_bytes_used == 0 and stats.num_running == 0
    assert stats.num_aborted - before.num_aborted == 3
