"""How the HTTP layer reports what goes wrong behind it: refusals, engine errors, crashes mid-stream."""

from __future__ import annotations

import asyncio
import contextlib

import httpx
import pytest

from tests.api.helpers import chat_body
from zipvl_ray.api.errors import APIError
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.api.sse import parse_sse
from zipvl_ray.engine.types import RequestError, RequestOutput


def _token(
    text: str, finished: bool = False, reason: str | None = None, error: str | None = None
) -> RequestOutput:
    return RequestOutput(
        request_id="r",
        token_ids=[1] * len(text),
        text=text,
        delta_text=text,
        finished=finished,
        finish_reason=reason,
        error=error,
    )


class ScriptedBackend:
    """Yields ``script`` items; an exception instance in the script is raised at that point."""

    def __init__(self, script: list, health: dict | None = None):
        self.script = script
        self.health_result = health or {"llm": None, "vision": None}
        self.closed = 0

    async def generate(self, request_id, prompt, sampling, zipvl, hints, *, stream=True):
        try:
            for item in self.script:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.closed += 1

    async def health(self):
        return self.health_result

    async def stats(self):
        return {"llm": [], "vision": []}


SETTINGS = ServingSettings(served_model_name="tiny-llava", model_source="tiny-llava", max_model_len=512)


def _call(backend, prompt_processor, body) -> httpx.Response:
    async def run():
        app = build_openai_app(backend, prompt_processor, SETTINGS)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            if body is None:
                return await client.get("/health")
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(run())


@pytest.mark.parametrize(
    "script, status, fragment",
    [
        ([RequestError("the prompt holds token ids outside the vocabulary")], 400, "outside the vocabulary"),
        ([APIError("refused upstream", status_code=400, code="x")], 400, "refused upstream"),
        ([], 500, "no output"),
        ([RuntimeError("secret detail")], 500, "internal server error"),
        ([_token("a"), _token("b", True, "error", "out of blocks")], 500, "generation failed: out of blocks"),
        ([_token("a")], 500, "without a result"),
    ],
)
def test_non_streamed_failures(prompt_processor, script, status, fragment):
    backend = ScriptedBackend(script)
    response = _call(backend, prompt_processor, chat_body())
    assert response.status_code == status
    assert fragment in response.json()["error"]["message"]
    assert "secret detail" not in response.text
    assert backend.closed == 1


@pytest.mark.parametrize(
    "script, status, last_event_fragment",
    [
        ([RequestError("too many images")], 400, None),
        # failed before its first token: an error response, not a 200 stream with an error event
        ([_token("", True, "error", "engine died")], 500, None),
        ([_token("a"), RuntimeError("secret detail")], 200, "internal server error"),
        ([_token("a"), _token("b", True, "error", "engine died")], 200, "generation failed: engine died"),
        ([_token("a")], 200, "ended the stream early"),
        ([_token("a"), APIError("upstream refused", status_code=400)], 200, "upstream refused"),
    ],
)
def test_streamed_failures(prompt_processor, script, status, last_event_fragment):
    backend = ScriptedBackend(script)
    response = _call(backend, prompt_processor, chat_body(stream=True))
    assert response.status_code == status
    assert "secret detail" not in response.text
    if last_event_fragment is None:
        assert "error" in response.json()
        return
    events = list(parse_sse(response.text))
    assert events[-1] == "[DONE]"
    assert last_event_fragment in events[-2]["error"]["message"]
    assert (
        events[0]["choices"][0]["delta"]["content"] == ""
        and events[1]["choices"][0]["delta"]["content"] == "a"
    )
    assert backend.closed == 1


@pytest.mark.parametrize(
    "stages, status, detail",
    [
        ({"llm": None, "vision": None}, 200, {}),
        ({"llm": "no answer within 5.0 s", "vision": None}, 503, {"llm": "no answer within 5.0 s"}),
    ],
)
def test_health_is_ready_only_when_every_stage_is(prompt_processor, stages, status, detail):
    response = _call(ScriptedBackend([], health=stages), prompt_processor, None)
    assert response.status_code == status
    body = response.json()
    assert body["detail"] == detail
    assert body["stages"]["ingress"] is True
    assert body["stages"]["llm"] is (stages["llm"] is None)


def test_a_prompt_larger_than_the_kv_pool_is_a_400_in_process_too(prompt_processor):
    """The in-process app (``LocalBackend`` over the real engine) refuses a request that cannot fit in the
    whole KV pool as the Ray application does: 400 ``kv_capacity_exceeded``, streamed or not."""
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_pretrained(
        "tiny-llava", device="cpu", engine=EngineConfig(max_model_len=512, kv_cache_bytes=64 << 10)
    )
    try:
        capacity = engine.stats().kv_bytes_capacity
        body = chat_body(text="word " * 80, max_tokens=4, zipvl={"enabled": False})
        for stream in (False, True):
            response = _call(LocalBackend(engine), prompt_processor, {**body, "stream": stream})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["code"] == "kv_capacity_exceeded" and f"({capacity} bytes)" in error["message"]
        stats = engine.stats()
        assert stats.kv_bytes_used == 0 and stats.num_running == stats.num_waiting == 0
    finally:
        engine.shutdown()


def test_the_in_process_app_reports_a_stopped_engine_as_unhealthy_and_refuses_with_503(prompt_processor):
    """``LocalBackend`` asks the engine's own health check: once the engine thread has stopped, ``/health``
    is 503 with the reason (it said ok) and a request is a 503 ``engine_unavailable`` at once (it used to
    wait forever for a step that never came)."""
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_pretrained(
        "tiny-llava", device="cpu", engine=EngineConfig(max_model_len=512, kv_cache_bytes=1 << 20)
    )
    backend = LocalBackend(engine)
    assert _call(backend, prompt_processor, None).status_code == 200
    engine.shutdown()
    health = _call(backend, prompt_processor, None)
    assert health.status_code == 503 and "not running" in health.json()["detail"]["llm"]
    for stream in (False, True):
        response = _call(backend, prompt_processor, chat_body(max_tokens=2, stream=stream))
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "engine_unavailable"


def test_an_image_request_to_an_in_process_app_without_encoder_is_a_400(prompt_processor):
    """A ``LocalBackend`` built without a vision encoder (text only) refuses an image with a 400 naming the
    reason; it was a 500 ``internal_error``."""
    from tests.api.helpers import image_data_url
    from zipvl_ray.api.local import LocalBackend
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine

    engine = AsyncLLMEngine.from_pretrained(
        "tiny-llava", device="cpu", engine=EngineConfig(max_model_len=512, kv_cache_bytes=1 << 20)
    )
    try:
        for stream in (False, True):
            body = chat_body(image_urls=[image_data_url(0)], max_tokens=2, stream=stream)
            response = _call(LocalBackend(engine), prompt_processor, body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == "images_not_supported"
        assert engine.stats().kv_bytes_used == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_stream_whose_send_fails_is_closed_and_its_request_aborted(prompt_processor, caplog, spec_version):
    """An ASGI server may report a closed connection by raising from ``send``. Starlette then left the
    response's generator to the garbage collector, so the request went on generating (a review: 480
    tokens, 3.5 s of KV held); now the generator is closed at once, which closes the backend's stream.
    With ASGI spec 2.4 Starlette turns the error into ``ClientDisconnect``: the client's doing, logged at
    INFO (it was logged as an unhandled server error)."""
    import logging

    class Endless:
        closed = 0

        async def generate(self, request_id, prompt, sampling, zipvl, hints, *, stream=True):
            try:
                while True:
                    await asyncio.sleep(0.001)
                    yield _token("a")
            finally:
                Endless.closed += 1

        async def health(self):
            return {"llm": None}

        async def stats(self):
            return {"llm": [], "vision": []}

    import json

    app = build_openai_app(Endless(), prompt_processor, SETTINGS)
    body = json.dumps(chat_body(stream=True)).encode()
    sent: list[dict] = []

    received = []

    async def receive():  # the body once, then nothing (the client is silent; no disconnect message)
        if not received:
            received.append(True)
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)
        if sum(m["type"] == "http.response.body" for m in sent) > 2:
            raise OSError("connection closed")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
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

    async def run():
        with contextlib.suppress(OSError):  # 2.3: the send's error; 2.4: handled as a disconnect
            await asyncio.wait_for(app(scope, receive, send), 10)
        return Endless.closed

    with caplog.at_level(logging.INFO):
        assert asyncio.run(run()) == 1
    assert not [r for r in caplog.records if "unhandled error" in r.getMessage()]


def test_a_body_of_too_many_json_objects_is_refused_before_it_is_parsed(prompt_processor):
    """FastAPI parsed and validated a body on the event loop: 2.1M empty messages in a 62 MB body (under the
    byte limit) held it for 14 s in a review (a large body is parsed in a worker thread now, which still costs
    the replica that CPU). Bodies with more than ``max_request_containers`` ``{`` / ``[``
    are refused as they arrive, chunked or not, without parsing."""
    import json
    import time

    limit = SETTINGS.max_request_containers
    n = limit + 10  # one container per message
    payload = json.dumps(
        {"model": "tiny-llava", "messages": [{"role": "system", "content": ""}] * n}
    ).encode()
    assert len(payload) < SETTINGS.max_request_bytes
    app = build_openai_app(ScriptedBackend([]), prompt_processor, SETTINGS)

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            out = []
            for content in (payload, _chunks(payload)):
                started = time.perf_counter()
                response = await client.post(
                    "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
                )
                out.append((response, time.perf_counter() - started))
            return out

    for response, seconds in asyncio.run(run()):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "request_too_complex"
        assert seconds < 1.0  # not parsed (the parse of such a body takes seconds)


async def _chunks(payload: bytes):
    half = len(payload) // 2
    yield payload[:half]
    yield payload[half:]
