"""The vision and LLM deployment classes without a cluster (their Serve wrappers unwrapped)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest
import torch
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from deployments.ingress import unavailable_error
from deployments.llm import GenerateRequest, LLMServer, StreamError, slim_output
from deployments.vision import VisionEncoderServer
from tests.deployments.fakes import FakeEngine, FakeVisionEncoder
from zipvl_ray.api.errors import error_response
from zipvl_ray.engine.types import RequestOutput, SamplingParams
from zipvl_ray.multimodal import ImageInput
from zipvl_ray.routing.replica_stats import AUTOSCALING_METRIC_NAMES


def llm_server(**engine_kwargs) -> LLMServer:
    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = FakeEngine(**engine_kwargs)
    return server


def test_constructor_loads_the_engine_without_its_vision_tower():
    calls = []

    class Recorder(FakeEngine):
        @classmethod
        def from_pretrained(cls, model, **kwargs):
            calls.append((model, kwargs))
            return cls()

    LLMServer.func_or_class(Recorder, "tiny-llava", dtype="bf16", device="cpu")
    assert calls == [
        (
            "tiny-llava",
            {"dtype": "bf16", "device": "cpu", "zipvl": None, "engine": None, "load_vision": False},
        )
    ]


def _request(request_id: str = "r1", max_tokens: int = 12, prompt: str = "hello") -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id, token_ids=list(prompt.encode()), sampling=SamplingParams(max_tokens=max_tokens)
    )


def test_generate_streams_deltas_and_a_full_final_output():
    server = llm_server(token_delay_s=0)

    async def run():
        return [item async for item in server.generate(_request(), None, routing_hints={"prompt_tokens": 5})]

    items = asyncio.run(run())
    assert all(isinstance(item, RequestOutput) for item in items)
    assert all(item.token_ids == [] and item.text == "" for item in items[:-1])
    final = items[-1]
    assert final.finished and len(final.token_ids) == 12
    assert "".join(item.delta_text for item in items) == final.text
    assert server.engine.stats().kv_bytes_used == 0


def test_a_non_streamed_request_gets_only_the_final_output():
    server = llm_server(token_delay_s=0)
    request = _request(max_tokens=7)
    request.stream = False

    async def run():
        return [item async for item in server.generate(request)]

    (final,) = asyncio.run(run())
    assert final.finished and len(final.token_ids) == 7 and final.text


def test_a_refused_request_becomes_one_stream_error():
    server = llm_server(token_delay_s=0)

    async def run():
        return [item async for item in server.generate(_request(max_tokens=10_000_000))]

    (item,) = asyncio.run(run())
    assert isinstance(item, StreamError) and item.status_code == 400 and "max_model_len" in item.message


def test_a_request_larger_than_the_pool_is_a_400_counted_as_refused():
    """Nothing was generated and nothing could be: the client's mistake, not an engine error."""
    from deployments.llm import POOL_OVERFLOW_ERROR
    from zipvl_ray import telemetry
    from zipvl_ray.engine.types import EngineStats, RequestMetrics

    class PoolTooSmall:
        async def generate(self, request_id, prompt, sampling, zipvl):
            yield RequestOutput(
                request_id=request_id,
                token_ids=[],
                finished=True,
                finish_reason="error",
                error=f"the request needs {POOL_OVERFLOW_ERROR}",
                metrics=RequestMetrics(prompt_tokens=5000),
            )

        async def abort(self, request_id):
            pass

        def stats(self):
            return EngineStats(kv_bytes_capacity=1 << 20)

    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = PoolTooSmall()
    server._metrics = sink = telemetry.InMemoryMetricsSink()

    async def run():
        return [item async for item in server.generate(_request(max_tokens=4))]

    (item,) = asyncio.run(run())
    assert isinstance(item, StreamError) and item.status_code == 400 and item.code == "kv_capacity_exceeded"
    counts = {key: value for key, value in sink.counters.items() if key[0] == "zipvl_llm_requests_total"}
    assert counts == {("zipvl_llm_requests_total", (("finish_reason", "refused"),)): 1.0}
    assert not any(key[0] == "zipvl_prompt_tokens_total" for key in sink.counters)

    async def close_at_the_refusal():  # a consumer that stops at the StreamError: still a refusal, not an abort
        stream = server.generate(_request(max_tokens=4))
        assert isinstance(await anext(stream), StreamError)
        await stream.aclose()

    asyncio.run(close_at_the_refusal())
    counts = {key: value for key, value in sink.counters.items() if key[0] == "zipvl_llm_requests_total"}
    assert counts == {("zipvl_llm_requests_total", (("finish_reason", "refused"),)): 2.0}


def test_closing_the_stream_aborts_the_request_and_frees_kv():
    server = llm_server(token_delay_s=0.01)

    async def run():
        stream = server.generate(_request(max_tokens=200))
        await anext(stream)
        assert server.engine.stats().kv_bytes_used > 0
        await stream.aclose()

    asyncio.run(run())
    assert server.engine.aborted == ["r1"]
    assert server.engine.stats().kv_bytes_used == 0 and server.engine.stats().num_running == 0


def test_cancelling_the_task_aborts_the_request():
    server = llm_server(token_delay_s=0.01)

    async def consume():
        async for _ in server.generate(_request("r2", max_tokens=200)):
            pass

    async def run():
        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run())
    assert server.engine.aborted == ["r2"]


def test_replica_stats_for_router_and_autoscaler():
    server = llm_server()
    routing = server.record_routing_stats()
    assert {"kv_bytes_used", "kv_bytes_capacity", "kept_fraction_per_layer", "stats_timestamp"} <= set(
        routing
    )
    assert abs(routing["stats_timestamp"] - time.time()) < 5  # the fake engine has no stats_time: now
    server.engine.stats_time = lambda: 1234.5  # an engine that knows when its snapshot stops
    assert server.record_routing_stats()["stats_timestamp"] == 1234.5
    autoscaling = server.record_autoscaling_stats()
    assert list(autoscaling) == list(AUTOSCALING_METRIC_NAMES)
    assert all(isinstance(v, float) for v in autoscaling.values())


def test_slim_output_drops_cumulative_fields_until_the_end():
    partial = RequestOutput("r", token_ids=[1, 2], text="ab", delta_token_ids=[2], delta_text="b")
    assert slim_output(partial).token_ids == [] and slim_output(partial).delta_text == "b"
    entries = [{"token_id": t, "logprob": -1.0, "top": []} for t in (1, 2)]
    with_logprobs = dataclasses.replace(partial, logprobs=entries, delta_logprobs=entries[1:])
    slim = slim_output(with_logprobs)
    assert slim.logprobs == [] and slim.delta_logprobs == entries[1:]
    final = RequestOutput("r", token_ids=[1, 2], text="ab", finished=True, finish_reason="stop")
    assert slim_output(final) is final


def _image(seed: int) -> ImageInput:
    return ImageInput(
        pixel_values=torch.full((1, 3, 4, 4), float(seed)), extra={}, num_tokens=3, content_hash=f"h{seed}"
    )


def test_vision_batch_encodes_all_requests_at_once_and_splits_in_order():
    server = VisionEncoderServer.func_or_class(
        FakeVisionEncoder, "tiny-llava", cache_size=8, max_batch_size=8
    )
    requests = [[_image(i), _image(i + 10)] for i in range(3)] + [[_image(1)]]
    # The batch body as the batcher calls it.
    batch = VisionEncoderServer.func_or_class._encode_batch
    results = asyncio.run(batch(server, requests))
    for images, (features, report) in zip(requests, results, strict=True):
        assert (report.requests, report.images) == (4, 7)
        assert [f.content_hash for f in features] == [im.content_hash for im in images]
        assert all(f.embeds.device.type == "cpu" and f.embeds.is_contiguous() for f in features)
    assert server.encoder.batch_sizes == [7]  # one encoder call for the whole batch
    stats = server.stats()
    assert (stats["batches"], stats["requests"], stats["images"], stats["max_batch_requests"]) == (1, 4, 7, 4)
    assert (stats["misses"], stats["hits"]) == (6, 1)
    assert asyncio.run(server.encode([])) == []


@pytest.mark.parametrize(
    "exc, retry_after, fragment",
    [
        (
            BackPressureError(num_queued_requests=9, max_queued_requests=8, retry_after_s=2.6),
            "3",
            "at capacity",
        ),
        (BackPressureError(num_queued_requests=9, max_queued_requests=8), "1", "at capacity"),
        (DeploymentUnavailableError(DeploymentID(name="LLMServer", app_name="zipvl")), "1", "not available"),
    ],
)
def test_serve_backpressure_becomes_an_openai_503_with_retry_after(exc, retry_after, fragment):
    error = unavailable_error(exc)
    response = error_response(error)
    assert response.status_code == 503
    assert response.headers["retry-after"] == retry_after
    body = json.loads(response.body)
    assert fragment in body["error"]["message"] and body["error"]["type"] == "service_unavailable"


def test_vision_health_check_fails_while_every_batch_fails():
    class Broken(FakeVisionEncoder):
        fail = True

        def encode(self, images):
            if Broken.fail:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return super().encode(images)

    server = VisionEncoderServer.func_or_class(
        Broken, "tiny-llava", cache_size=8, max_batch_size=8, unhealthy_after_failed_batches=2
    )
    batch = VisionEncoderServer.func_or_class._encode_batch
    for _ in range(2):
        server.check_health()
        with pytest.raises(RuntimeError, match="illegal memory access"):
            asyncio.run(batch(server, [[_image(1)]]))
    with pytest.raises(RuntimeError, match="last 2 encoder batches failed"):
        server.check_health()
    Broken.fail = False
    asyncio.run(batch(server, [[_image(2)]]))
    server.check_health()


def test_one_requests_failing_images_fail_only_that_request_of_its_batch():
    """A request whose images make the tower raise (bad input, its own out-of-memory) is batched with
    others: the batch is re-encoded request by request, the others get their features, and the replica
    stays healthy; a batch in which every request fails counts for the health check."""

    class Picky(FakeVisionEncoder):
        def encode(self, images):
            if any(im.content_hash == "poison" for im in images):
                raise RuntimeError("vision tower produced 64 tokens for an image announced as 3")
            return super().encode(images)

    server = VisionEncoderServer.func_or_class(
        Picky, "tiny-llava", cache_size=8, max_batch_size=8, unhealthy_after_failed_batches=1
    )
    batch = VisionEncoderServer.func_or_class._encode_batch
    poison = dataclasses.replace(_image(5), content_hash="poison")
    good, bad, also_good = asyncio.run(batch(server, [[_image(1)], [_image(2), poison], [_image(3)]]))
    assert isinstance(bad, RuntimeError) and "announced as 3" in str(bad)
    assert [f.content_hash for f in good[0]] == ["h1"] and [f.content_hash for f in also_good[0]] == ["h3"]
    assert good[1].requests == 1 and good[1].images == 1
    server.check_health()
    assert (server.stats()["requests"], server.stats()["images"]) == (2, 2)  # what was served

    # A batch whose only success came from the cache says nothing about the device: it counts as failed.
    cached_only = asyncio.run(batch(server, [[_image(1)], [poison]]))
    assert cached_only[0][1].cache_misses == 0 and isinstance(cached_only[1], RuntimeError)
    assert server.consecutive_failed_batches == 1
    server.consecutive_failed_batches = 0

    # Through the request path: the failing request raises its own error.
    async def call_alone():
        return await VisionEncoderServer.func_or_class.encode(server, [poison])

    with pytest.raises(RuntimeError, match="announced as 3"):
        asyncio.run(call_alone())
    with pytest.raises(RuntimeError, match="last 1 encoder batches failed"):
        server.check_health()

    outcomes = asyncio.run(batch(server, [[poison], [poison]]))
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert server.consecutive_failed_batches == 2


def test_a_retry_after_an_unreachable_replica_cancels_the_first_attempt_and_uses_its_own_id():
    """An unreachable replica may still run the first attempt: the retry must not reuse its engine id
    (the same replica would refuse it as already in use) and the first attempt is cancelled."""
    from ray.exceptions import ActorUnavailableError

    from deployments.ingress import RayServeBackend

    class Call(ScriptedCall):
        cancelled: list[str] = []

        async def _run(self):
            if len(seen) == 1:
                raise ActorUnavailableError("unreachable", None)
            yield RequestOutput(request_id=self.request.request_id, token_ids=[1], finished=True)

    handle = FakeLLMHandle(Call)
    seen = handle.request_ids
    backend = RayServeBackend(vision=None, llm=handle)

    (out,) = generate_all(backend)
    assert out.finished and seen == ["chatcmpl-1", "chatcmpl-1-retry1"]
    assert Call.cancelled == ["chatcmpl-1"]


def test_a_stream_that_ends_without_a_result_is_an_error_in_the_span_not_a_client_leaving():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from deployments.ingress import RayServeBackend
    from zipvl_ray import telemetry

    class Call(ScriptedCall):
        async def _run(self):
            yield RequestOutput(request_id=self.request.request_id, token_ids=[1], delta_token_ids=[1])

    backend = RayServeBackend(vision=None, llm=FakeLLMHandle(Call))
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.use_tracer_provider(provider):
        outs = generate_all(backend)
    assert len(outs) == 1 and not outs[0].finished
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "zipvl.ingress.generate"]
    assert span.status.status_code.name == "ERROR" and "without a result" in span.status.description
    assert "zipvl.cancelled" not in span.attributes


def test_the_death_of_the_vision_replica_under_a_request_is_retried():
    """Serve's router reports the death of an upstream actor (the vision replica whose result the LLM call
    takes as an argument) as a RayServeException caused by the ActorDiedError: a replica failure, retried
    like the LLM replica's own death (it used to be a plain 500)."""
    from ray.exceptions import ActorDiedError, RayTaskError
    from ray.serve.exceptions import RayServeException

    from deployments.ingress import RayServeBackend, is_replica_failure

    died = RayTaskError("encode", "traceback", ActorDiedError()).as_instanceof_cause()
    upstream = RayServeException("Request to deployment 'LLMServer' failed because an upstream actor died")
    upstream.__cause__ = died
    assert is_replica_failure(upstream) and is_replica_failure(ActorDiedError())
    assert not is_replica_failure(RayServeException("bad request")) and not is_replica_failure(ValueError())

    cancelled = []

    class Response:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def __aiter__(self):
            return self._run()

        async def _run(self):
            if self.fail:
                raise upstream
            yield RequestOutput(request_id="x", token_ids=[1], finished=True)

        def cancel(self):
            cancelled.append(self.name)

    llm = FakeLLMHandle(lambda _request: Response(f"llm-{len(attempts)}", fail=len(attempts) == 1))
    attempts = llm.request_ids

    class Vision:
        calls = 0

        @property
        def encode(self):
            return self

        def remote(self, images):
            Vision.calls += 1
            return Response(f"vision-{Vision.calls}")

    backend = RayServeBackend(vision=Vision(), llm=llm)

    (out,) = generate_all(backend, images=[_image(1)])
    assert out.finished and attempts == ["chatcmpl-1", "chatcmpl-1-retry1"]
    assert {"llm-1", "vision-1"} <= set(cancelled)  # the first attempt, its encode included


class ScriptedCall:
    """One LLM handle call's response for :class:`FakeLLMHandle`: a subclass scripts ``_run`` (an async
    generator of outputs) and may set its own ``cancelled`` list to record ``cancel()`` calls."""

    cancelled: list[str] | None = None

    def __init__(self, request):
        self.request = request

    def __aiter__(self):
        return self._run()

    async def _run(self):
        raise NotImplementedError
        yield

    def cancel(self):
        if self.cancelled is not None:
            self.cancelled.append(self.request.request_id)


def generate_all(backend, images=()) -> list[RequestOutput]:
    """Every output of ``backend.generate`` for a three-token prompt (with ``images``)."""
    from zipvl_ray.multimodal import PreparedPrompt
    from zipvl_ray.routing.footprint import RoutingHints

    prompt = PreparedPrompt(token_ids=[1, 2, 3], images=list(images), image_token_id=None)

    async def run():
        return [
            o async for o in backend.generate("chatcmpl-1", prompt, SamplingParams(), None, RoutingHints(3))
        ]

    return asyncio.run(run())


class FakeLLMHandle:
    """The LLM deployment's handle as ``RayServeBackend`` calls it (``options(...).generate.remote(...)``):
    each call's request id is recorded, and ``respond(request)`` gives the call's response."""

    def __init__(self, respond):
        self.respond = respond
        self.request_ids: list[str] = []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request, features, routing_hints):
        self.request_ids.append(request.request_id)
        return self.respond(request)


def test_a_client_leaving_mid_request_cancels_both_stages():
    from deployments.ingress import RayServeBackend
    from zipvl_ray.multimodal import PreparedPrompt
    from zipvl_ray.routing.footprint import RoutingHints

    cancelled = []

    class Response:
        def __init__(self, name):
            self.name = name

        def __aiter__(self):
            return self._run()

        async def _run(self):
            yield RequestOutput(request_id="x", token_ids=[1], delta_token_ids=[1])
            await asyncio.sleep(3600)

        def cancel(self):
            cancelled.append(self.name)

    class Vision:
        @property
        def encode(self):
            return self

        def remote(self, images):
            return Response("vision")

    backend = RayServeBackend(vision=Vision(), llm=FakeLLMHandle(lambda _request: Response("llm")))
    prompt = PreparedPrompt(token_ids=[1, 2, 3], images=[_image(1)], image_token_id=None)

    async def run():
        stream = backend.generate("chatcmpl-1", prompt, SamplingParams(), None, RoutingHints(3))
        first = await anext(stream)
        await stream.aclose()  # the client went away
        return first

    assert not asyncio.run(run()).finished
    assert sorted(cancelled) == ["llm", "vision"]


def test_vision_autoscaling_stats_count_what_is_queued_or_encoding():
    """``record_autoscaling_stats`` reports the images and requests accepted and not yet answered, the
    load a ``QueueLengthPolicy(metric="pending_images")`` scales the vision stage on."""
    from deployments.vision import VISION_AUTOSCALING_METRIC_NAMES

    class Slow(FakeVisionEncoder):
        def encode(self, images):
            time.sleep(0.2)
            return super().encode(images)

    server = VisionEncoderServer.func_or_class(Slow, "tiny-llava", cache_size=0, max_batch_size=1)
    encode = VisionEncoderServer.func_or_class.encode

    async def scenario():
        calls = [
            asyncio.create_task(encode(server, [_image(1), _image(2)])),
            asyncio.create_task(encode(server, [_image(3)])),
        ]
        await asyncio.sleep(0.05)  # the first is encoding, the second queued behind it
        during = server.record_autoscaling_stats()
        await asyncio.gather(*calls)
        return during, server.record_autoscaling_stats()

    during, after = asyncio.run(scenario())
    assert tuple(during) == VISION_AUTOSCALING_METRIC_NAMES
    assert during == {"pending_images": 3.0, "pending_requests": 2.0}
    assert after == {"pending_images": 0.0, "pending_requests": 0.0}


@pytest.fixture(scope="module")
def real_engine_server():
    """An ``LLMServer`` over the real ``AsyncLLMEngine`` (tiny-llava, CPU)."""
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine

    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = AsyncLLMEngine.from_pretrained(
        "tiny-llava", device="cpu", engine=EngineConfig(max_model_len=1024, kv_cache_bytes=4 << 20)
    )
    yield server
    server.engine.shutdown()


@pytest.mark.parametrize("how", ["aclose", "cancel"])
def test_a_request_left_early_is_aborted_once_and_freed_before_the_close_returns(
    real_engine_server, how, monkeypatch
):
    """The engine's stream aborts its request when closed; ``stream_with_abort`` used to send a second
    abort, which waited behind a step for nothing. And the inner stream is closed with the outer one
    (``aclosing``), so the KV is back in the pool when ``aclose()`` returns (the event loop's finalizer
    used to close it later)."""
    server = real_engine_server
    core = server.engine.engine
    aborts: list[str] = []
    real_abort = core.abort_request
    monkeypatch.setattr(core, "abort_request", lambda rid: aborts.append(rid) or real_abort(rid))
    request = _request(f"left-{how}", max_tokens=500)
    request = dataclasses.replace(
        request, sampling=SamplingParams(max_tokens=500, ignore_eos=True), stream=True
    )

    async def run():
        stream = server.generate(request)
        if how == "aclose":
            await anext(stream)
            assert server.engine.stats().kv_bytes_used > 0
            await stream.aclose()
        else:

            async def consume():
                async for _ in stream:
                    pass

            task = asyncio.ensure_future(consume())
            while server.engine.stats().kv_bytes_used == 0:
                await asyncio.sleep(0.005)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        return server.engine.stats(), dict(core.sequences)

    stats, sequences = asyncio.run(run())
    assert aborts == [request.request_id]
    assert stats.kv_bytes_used == 0 and not sequences


def test_a_replica_whose_engine_stopped_answers_503_and_the_ingress_retries_elsewhere():
    """An LLM replica whose engine thread has stopped refused with an exception that reached the client as
    a 500 (the in-process app said 503). It now answers ``StreamError(503, engine_unavailable)``, which
    the ingress treats as a replica failure: run again on another replica (its health check fails and
    Serve replaces it)."""
    from deployments.ingress import RayServeBackend
    from zipvl_ray.config import EngineConfig
    from zipvl_ray.engine import AsyncLLMEngine

    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = AsyncLLMEngine.from_pretrained(
        "tiny-llava", device="cpu", engine=EngineConfig(max_model_len=1024, kv_cache_bytes=1 << 20)
    )
    server.engine.shutdown()
    from zipvl_ray import telemetry

    server._metrics = sink = telemetry.InMemoryMetricsSink()

    async def run():
        retried = dataclasses.replace(_request("dead-retry1"), completion_id="dead")
        return [item async for item in server.generate(retried)]

    (item,) = asyncio.run(run())
    assert isinstance(item, StreamError) and item.status_code == 503 and item.code == "engine_unavailable"
    counts = {key: value for key, value in sink.counters.items() if key[0] == "zipvl_llm_requests_total"}
    assert counts == {("zipvl_llm_requests_total", (("finish_reason", "unavailable"),)): 1.0}

    class Call(ScriptedCall):
        async def _run(self):
            if len(seen) == 1:  # the first replica's engine has stopped
                yield item
                return
            yield RequestOutput(request_id=self.request.request_id, token_ids=[1], finished=True)

    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    handle = FakeLLMHandle(Call)
    seen = handle.request_ids
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.use_tracer_provider(provider):
        (out,) = generate_all(RayServeBackend(vision=None, llm=handle))
    assert out.finished and seen == ["chatcmpl-1", "chatcmpl-1-retry1"]
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "zipvl.ingress.generate"]
    assert [e.name for e in span.events] == ["zipvl.retry"]  # the retry is on the client's trace

    class AlwaysDead(ScriptedCall):
        async def _run(self):
            yield item

    from zipvl_ray.api.errors import APIError

    with pytest.raises(APIError) as refused:  # every attempt refused: a 503 the client may retry
        generate_all(RayServeBackend(vision=None, llm=FakeLLMHandle(AlwaysDead)))
    assert refused.value.status_code == 503 and refused.value.headers == {"Retry-After": "1"}


def test_an_ingress_without_api_keys_warns_that_every_route_is_open(caplog):
    """A missing or misnamed key source (``auth.required`` off, the default) opened every route silently."""
    import logging

    from deployments.ingress import log_auth_state
    from zipvl_ray.api.auth import AuthSettings

    with caplog.at_level(logging.INFO, logger="deployments.ingress"):
        log_auth_state([], AuthSettings(api_keys_env="ZIPVL_API_KEYS"))
        log_auth_state(["k1"], AuthSettings(api_keys_env="ZIPVL_API_KEYS"))
    records = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "deployments.ingress"]
    assert records[0][0] == logging.WARNING and "OFF" in records[0][1] and "ZIPVL_API_KEYS" in records[0][1]
    assert records[1] == (logging.INFO, "API-key authentication is on (1 keys)")
