"""``zipvl_ray.telemetry`` and the request id middleware, without a Ray cluster.

Spans go to OpenTelemetry's in-memory exporter through a local ``TracerProvider`` handed to
:func:`telemetry.use_tracer_provider` (the process-wide provider is left alone); metrics to
:class:`telemetry.InMemoryMetricsSink`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from pydantic import ValidationError

from zipvl_ray import telemetry
from zipvl_ray.api.errors import APIError
from zipvl_ray.api.middleware import (
    PROXY_CALLBACK_IMPORT_PATH,
    RequestIdMiddleware,
    RequestIdSanitizerMiddleware,
    is_well_formed_request_id,
    proxy_middlewares,
)
from zipvl_ray.engine.types import EngineStats, RequestMetrics, RequestOutput

DOCS = Path(__file__).resolve().parents[1] / "docs" / "observability.md"
MS = 1_000_000


@pytest.fixture
def spans():
    """A local tracer provider (sampling everything) used by telemetry's helpers; yields its exporter."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.use_tracer_provider(provider):
        yield exporter


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        telemetry.EXPORTER_ENV,
        telemetry.FILE_DIR_ENV,
        *telemetry.OTLP_ENDPOINT_ENVS,
        *telemetry.OTLP_PROTOCOL_ENVS,
    ):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def finished_output(*, engine_timestamps: bool = True, tokens: int = 5) -> RequestOutput:
    base = 1_700_000_000_000_000_000
    metrics = RequestMetrics(
        prompt_tokens=100,
        image_tokens=64,
        kept_tokens_per_layer=[100, 50, 40, 30],
        kv_bytes=4096,
        kv_bytes_dense=8192,
        predicted_kv_bytes=4000,
        queue_time_s=0.010,
        ttft_s=0.030,
        decode_time_s=0.040,
    )
    if engine_timestamps:
        metrics.arrival_ns = base
        metrics.prefill_start_ns = base + 10 * MS
        metrics.first_token_ns = base + 30 * MS
        metrics.finish_ns = base + 70 * MS
    return RequestOutput(
        request_id="chatcmpl-1",
        token_ids=list(range(tokens)),
        finished=True,
        finish_reason="length",
        metrics=metrics,
    )


# ------------------------------------------------------------------------------------------ exporters


def test_exporter_kinds_build_the_right_processors(clean_env, tmp_path):
    assert telemetry.build_span_processors("none") == []
    assert telemetry.build_span_processors("auto") == []  # no OTLP endpoint: nothing to send to
    (memory,) = telemetry.build_span_processors("memory")
    assert isinstance(memory, SimpleSpanProcessor) and memory.span_exporter is telemetry.memory_exporter()
    (console,) = telemetry.build_span_processors("console")
    assert isinstance(console.span_exporter, ConsoleSpanExporter)
    with pytest.raises(ValueError, match="ZIPVL_TRACING_FILE_DIR"):
        telemetry.build_span_processors("file")
    with pytest.raises(ValueError, match="use one of"):
        telemetry.build_span_processors("jaeger")


@pytest.mark.parametrize(
    "protocol, module",
    [
        (None, "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        ("http/protobuf", "opentelemetry.exporter.otlp.proto.http.trace_exporter"),
        ("grpc", "opentelemetry.exporter.otlp.proto.grpc.trace_exporter"),
    ],
)
def test_otlp_when_an_endpoint_is_set(clean_env, protocol, module):
    pytest.importorskip("opentelemetry.exporter.otlp")
    clean_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector.invalid:4317")
    if protocol:
        clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    for kind in ("auto", "otlp"):
        (processor,) = telemetry.build_span_processors(kind)
        assert isinstance(processor, BatchSpanProcessor)
        exporter = processor._batch_processor._exporter
        assert type(exporter).__module__ == module
        processor.shutdown()
    # http/json (allowed by the specification; the Python SDK has none) goes as http/protobuf
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")
    (processor,) = telemetry.build_span_processors("otlp")
    assert type(processor._batch_processor._exporter).__module__.endswith("proto.http.trace_exporter")
    processor.shutdown()
    clean_env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "carrier-pigeon")
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        telemetry.build_span_processors("otlp")


@pytest.mark.parametrize(
    "env",
    [
        {"ZIPVL_TRACING_EXPORTER": "file"},  # no directory
        {"ZIPVL_TRACING_EXPORTER": "otel"},  # a typo
        {"ZIPVL_TRACING_EXPORTER": "file", "ZIPVL_TRACING_FILE_DIR": "/proc/no/such/dir"},
        {"ZIPVL_TRACING_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"},
    ],
)
def test_bad_tracing_settings_turn_tracing_off_instead_of_killing_the_process(clean_env, env, caplog):
    """Serve calls span_processors in the constructor of its proxy and of every replica: an exception
    there killed the proxy (review 2026-12-06: connection refused on every request)."""
    for name, value in env.items():
        clean_env.setenv(name, value)
    with caplog.at_level("ERROR", logger="zipvl_ray.telemetry"):
        assert telemetry.span_processors() == []
    assert "tracing is off in process" in caplog.text


@pytest.mark.parametrize(
    ("service_name", "resource_attributes", "expected"),
    [
        (None, None, "zipvl-ray"),
        ("mine", None, "mine"),
        (None, "team=vlm, service.name=checkout-vlm", None),  # the resource's own name stays in charge
        (None, "team=vlm", "zipvl-ray"),
    ],
)
def test_span_processors_default_the_service_name_only_when_nothing_names_it(
    clean_env, service_name, resource_attributes, expected
):
    import os

    clean_env.setenv(telemetry.EXPORTER_ENV, "none")
    for name, value in (
        ("OTEL_SERVICE_NAME", service_name),
        ("OTEL_RESOURCE_ATTRIBUTES", resource_attributes),
    ):
        if value is None:
            clean_env.delenv(name, raising=False)
        else:
            clean_env.setenv(name, value)
    telemetry.span_processors()
    assert os.environ.get("OTEL_SERVICE_NAME") == expected


def test_file_exporter_writes_one_json_span_per_line(clean_env, tmp_path):
    clean_env.setenv(telemetry.EXPORTER_ENV, "file")
    clean_env.setenv(telemetry.FILE_DIR_ENV, str(tmp_path))
    clean_env.delenv("OTEL_SERVICE_NAME", raising=False)
    processors = telemetry.span_processors()  # Serve's call: no argument, all from the environment
    import os

    assert os.environ["OTEL_SERVICE_NAME"] == "zipvl-ray"
    provider = TracerProvider()
    for processor in processors:
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("t")
    with (
        tracer.start_as_current_span("outer"),
        tracer.start_as_current_span("inner", attributes={"zipvl.images": 2}),
    ):
        pass
    read = telemetry.read_span_files(tmp_path)
    assert [s["name"] for s in read] == ["inner", "outer"]
    assert read[0]["parent_id"] == read[1]["context"]["span_id"]
    assert read[0]["attributes"] == {"zipvl.images": 2}
    assert read[1]["resource"]["attributes"]["service.name"] == "zipvl-ray"
    provider.shutdown()


def test_a_span_line_still_being_written_is_left_for_the_next_read(tmp_path):
    # A process writes a long span in more than one write: a reader can see a line without its end.
    whole = json.dumps({"name": "done", "attributes": {}})
    partial = json.dumps({"name": "writing", "attributes": {"x": "y" * 100}})[:40]
    path = tmp_path / "spans-1.jsonl"
    path.write_text(whole + "\n" + partial)
    assert [s["name"] for s in telemetry.read_span_files(tmp_path)] == ["done"]
    path.write_text(partial)
    assert telemetry.read_span_files(tmp_path) == []
    path.write_text(whole + "\n" + json.dumps({"name": "writing", "attributes": {}}) + "\n")
    assert [s["name"] for s in telemetry.read_span_files(tmp_path)] == ["done", "writing"]


def test_settings_become_replica_environment():
    assert telemetry.TelemetrySettings().env_vars() == {}  # defaults change nothing
    env = telemetry.TelemetrySettings(
        tracing=True,
        exporter="otlp",
        sampling_ratio=0.25,
        otlp_endpoint="http://c:4317",
        otlp_protocol="grpc",
    ).env_vars()
    assert env == {
        telemetry.SERVE_EXPORTER_ENV: telemetry.EXPORTER_IMPORT_PATH,
        telemetry.SERVE_SAMPLING_ENV: "0.25",
        telemetry.EXPORTER_ENV: "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
    }
    assert telemetry.TelemetrySettings(tracing=False).env_vars() == {telemetry.SERVE_EXPORTER_ENV: ""}
    off = telemetry.TelemetrySettings(
        metrics=False, metrics_interval_s=5, log_level="DEBUG", service_name="vlm"
    )
    assert off.env_vars() == {
        telemetry.METRICS_ENV: "0",
        telemetry.METRICS_INTERVAL_ENV: "5.0",
        telemetry.LOG_LEVEL_ENV: "DEBUG",
        "OTEL_SERVICE_NAME": "vlm",
    }
    # Tracing fields without tracing: true would be dropped silently: refused.
    for tracing in (None, False):
        with pytest.raises(ValidationError, match="file_dir, sampling_ratio apply only with tracing: true"):
            telemetry.TelemetrySettings(tracing=tracing, file_dir="/tmp/s", sampling_ratio=1.0)
    for bad in ({"sampling_ratio": 1.5}, {"exporter": "zipkin"}, {"sampler": 1}):
        with pytest.raises(ValidationError):
            telemetry.TelemetrySettings(**bad)
    # The Serve exporter path really is this module's function.
    module, _, name = telemetry.EXPORTER_IMPORT_PATH.partition(":")
    assert module == telemetry.__name__ and getattr(telemetry, name) is telemetry.span_processors


# ------------------------------------------------------------------------------------------ spans


def test_no_provider_means_no_spans():
    with telemetry.use_tracer_provider(None):
        if telemetry.tracing_active():  # another test module installed a global provider
            pytest.skip("a global tracer provider is set in this process")
        assert telemetry.start_span("x") is None
        with telemetry.span("x") as current:
            assert current is None
        assert telemetry.record_engine_spans(None, finished_output()) == []


def test_engine_spans_from_timestamps(spans):
    output = finished_output()
    parent = telemetry.start_span("zipvl.llm.generate", start_time_ns=output.metrics.arrival_ns - MS)
    timing = telemetry.RequestTiming(
        received_ns=1, first_output_ns=2, kv_bytes_after_prefill=2048, kv_bytes_dense_after_prefill=4096
    )
    created = telemetry.record_engine_spans(parent, output, timing)
    parent.end(end_time=output.metrics.finish_ns + MS)
    assert [s.name for s in created] == ["zipvl.llm.queue", "zipvl.llm.prefill", "zipvl.llm.decode"]
    by_name = {s.name: s for s in spans.get_finished_spans()}
    queue, prefill, decode = (by_name[f"zipvl.llm.{n}"] for n in ("queue", "prefill", "decode"))
    m = output.metrics
    assert (queue.start_time, queue.end_time) == (m.arrival_ns, m.prefill_start_ns)
    assert (prefill.start_time, prefill.end_time) == (m.prefill_start_ns, m.first_token_ns)
    assert (decode.start_time, decode.end_time) == (m.first_token_ns, m.finish_ns)
    for span in (queue, prefill, decode):
        assert span.parent.span_id == parent.get_span_context().span_id
        assert span.context.trace_id == parent.get_span_context().trace_id
    a = prefill.attributes
    assert a["zipvl.kept_ratio.per_layer"] == (1.0, 0.5, 0.4, 0.3)
    assert (a["zipvl.kept_ratio.min"], a["zipvl.kept_ratio.max"]) == (0.3, 1.0)
    assert a["zipvl.kept_ratio.mean"] == pytest.approx(0.55)
    assert a["zipvl.attention_flops_saved"] == pytest.approx(1 - (1 + 0.25 + 0.16 + 0.09) / 4)
    assert (a["zipvl.prompt_tokens"], a["zipvl.image_tokens"]) == (100, 64)
    assert (a["zipvl.kv_bytes"], a["zipvl.kv_bytes_dense"]) == (2048, 4096)
    assert a["zipvl.timing_source"] == "engine"
    d = decode.attributes
    assert d["zipvl.output_tokens"] == 5 and d["zipvl.finish_reason"] == "length"
    assert d["zipvl.time_per_output_token_s"] == pytest.approx(0.040 / 4)
    assert d["zipvl.kv_bytes_saved"] == 4096
    assert queue.attributes["zipvl.queue_time_s"] == pytest.approx(0.010)


def test_the_prefill_span_takes_the_engines_kv_after_prefill(spans):
    """A non-streamed request's first output is its final one (``output_kind="final_only"``): the KV
    after prefill comes from the engine's metrics, not from what the deployment saw first."""
    output = finished_output()
    output.metrics.kv_bytes_after_prefill, output.metrics.kv_bytes_dense_after_prefill = 1024, 3072
    timing = telemetry.RequestTiming(  # the final output arrived first: its bytes are the end's
        received_ns=1, first_output_ns=2, kv_bytes_after_prefill=9999, kv_bytes_dense_after_prefill=9999
    )
    parent = telemetry.start_span("zipvl.llm.generate")
    telemetry.record_engine_spans(parent, output, timing)
    parent.end()
    prefill = next(s for s in spans.get_finished_spans() if s.name == "zipvl.llm.prefill")
    assert (prefill.attributes["zipvl.kv_bytes"], prefill.attributes["zipvl.kv_bytes_dense"]) == (1024, 3072)


def test_engine_spans_fall_back_to_observed_times(spans):
    output = finished_output(engine_timestamps=False)
    timing = telemetry.RequestTiming(
        received_ns=1000 * MS, first_output_ns=1020 * MS, final_output_ns=1050 * MS
    )
    parent = telemetry.start_span("zipvl.llm.generate")
    created = telemetry.record_engine_spans(parent, output, timing)
    parent.end()
    assert [s.name for s in created] == [
        "zipvl.llm.prefill",
        "zipvl.llm.decode",
    ]  # no queue without timestamps
    prefill, decode = (s for s in spans.get_finished_spans() if s.name != "zipvl.llm.generate")
    assert (prefill.start_time, prefill.end_time, decode.end_time) == (1000 * MS, 1020 * MS, 1050 * MS)
    assert prefill.attributes["zipvl.timing_source"] == "observed"


def test_unsampled_requests_build_nothing():
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBasedTraceIdRatio(0.0))  # Serve's sampler at ratio 0
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with telemetry.use_tracer_provider(provider):
        parent = telemetry.start_span("zipvl.llm.generate")
        assert parent is not None and not telemetry.recording(parent)
        assert telemetry.record_engine_spans(parent, finished_output()) == []
        parent.end()
    assert exporter.get_finished_spans() == ()


def test_instrument_method_wraps_sync_and_async_methods(spans):
    class Work:
        def double(self, x):
            return 2 * x

        async def triple(self, x):
            with telemetry.span("inner"):
                return 3 * x

    work = Work()
    telemetry.instrument_method(work, "double", "w.double", attributes=lambda r: {"result": r})
    telemetry.instrument_method(work, "triple", "w.triple", attributes=lambda r: {"result": r})
    assert work.double(2) == 4
    assert asyncio.run(work.triple(2)) == 6
    assert Work().double(1) == 2  # the class is untouched
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert by_name["w.double"].attributes["result"] == 4
    assert by_name["w.triple"].attributes["result"] == 6
    assert by_name["inner"].parent.span_id == by_name["w.triple"].context.span_id


def test_a_failing_block_marks_its_span(spans):
    from opentelemetry.trace import StatusCode

    from zipvl_ray.api.errors import APIError

    with pytest.raises(RuntimeError), telemetry.span("failing"):
        raise RuntimeError("boom")
    with pytest.raises(APIError), telemetry.span("refused"):
        raise APIError("bad image", param="messages")
    span = telemetry.start_span("ended")
    telemetry.end_span(span, error="engine error")
    failing, refused, ended = spans.get_finished_spans()
    assert failing.status.status_code is StatusCode.ERROR and failing.events[0].name == "exception"
    assert ended.status.description == "engine error"
    # A refused request (4xx) is not a failure of the service: an attribute, no ERROR status.
    assert refused.status.status_code is StatusCode.UNSET and not refused.events
    assert refused.attributes["http.response.status_code"] == 400


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "ok"),
        ("the client went away", "cancelled"),
        ("aborted", "cancelled"),
        (asyncio.CancelledError(), "cancelled"),
        (telemetry.ClientError("prompt too long"), "client_error"),
        (APIError("messages[0]: the image is too large", status_code=400), "client_error"),
        ("engine error", "error"),
        (RuntimeError("CUDA out of memory"), "error"),
    ],
)
def test_cancellations_and_refusals_do_not_mark_spans_as_errors(spans, error, outcome):
    """Like the metrics (a client leaving counts 499, not 5xx): span-based error rates count only
    failures of the service."""
    from opentelemetry.trace import StatusCode

    assert telemetry.span_outcome(error) == outcome
    span = telemetry.start_span("request")
    telemetry.end_span(span, error=error)
    (ended,) = spans.get_finished_spans()
    assert (ended.status.status_code is StatusCode.ERROR) == (outcome == "error")
    assert ended.attributes.get("zipvl.cancelled", False) == (outcome == "cancelled")
    assert ("zipvl.client_error" in ended.attributes) == (outcome == "client_error")
    if outcome == "client_error":  # the message (it held the exception's type name)
        assert ended.attributes["zipvl.client_error"] == str(error)


def test_llm_deployment_traces_a_request_with_the_fake_engine(spans):
    from deployments.llm import GenerateRequest, LLMServer
    from tests.deployments.fakes import FakeEngine
    from zipvl_ray.engine.types import SamplingParams

    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = FakeEngine(token_delay_s=0)
    request = GenerateRequest(
        request_id="r1", token_ids=list(b"hello"), sampling=SamplingParams(max_tokens=4)
    )

    async def run():
        with telemetry.bind_request_id("req-1"):
            return [item async for item in server.generate(request)]

    items = asyncio.run(run())
    assert items[-1].finished
    by_name = {s.name: s for s in spans.get_finished_spans()}
    generate = by_name["zipvl.llm.generate"]
    assert generate.attributes[telemetry.ATTR_REQUEST_ID] == "req-1"
    assert generate.attributes["zipvl.output_tokens"] == 4 and generate.status.is_ok
    assert by_name["zipvl.llm.decode"].attributes["zipvl.output_tokens"] == 4
    assert by_name["zipvl.llm.prefill"].parent.span_id == generate.context.span_id


@pytest.mark.parametrize(
    ("failure", "reason", "status"),
    [
        (RuntimeError("CUDA out of memory moving the features"), "error", "ERROR"),
        (asyncio.CancelledError(), "abort", "UNSET"),
        ("refused", "refused", "UNSET"),
    ],
)
def test_llm_deployment_counts_an_engine_failure_as_error_not_abort(spans, failure, reason, status):
    """An engine that raised was counted ``finish_reason="abort"`` (like a client that left), so error
    alerts and the abort panel were both wrong; a refusal or a cancellation is no ERROR span."""
    from deployments.llm import GenerateRequest, LLMServer
    from tests.deployments.fakes import FakeEngine
    from zipvl_ray.engine.types import RequestError, SamplingParams

    class FailingEngine(FakeEngine):
        async def generate(self, *args, **kwargs):
            raise RequestError("prompt too long") if failure == "refused" else failure
            yield  # pragma: no cover - an async generator

    server = LLMServer.func_or_class.__new__(LLMServer.func_or_class)
    server.engine = FailingEngine(token_delay_s=0)
    server._metrics = telemetry.InMemoryMetricsSink()
    server._stats_exporter = None
    request = GenerateRequest(
        request_id="r1", token_ids=list(b"hello"), sampling=SamplingParams(max_tokens=4)
    )

    async def run():
        return [item async for item in server.generate(request)]

    if failure == "refused":
        asyncio.run(run())
    else:
        with pytest.raises(type(failure)):
            asyncio.run(run())
    assert server._metrics.counters == {("zipvl_llm_requests_total", (("finish_reason", reason),)): 1}
    (generate,) = [s for s in spans.get_finished_spans() if s.name == "zipvl.llm.generate"]
    assert generate.status.status_code.name == status


def test_replica_counters_exist_at_zero_from_the_start():
    """A series that first appears at 1 hides its first event from rate() / increase()."""
    for stage in ("ingress", "vision", "llm"):
        sink = telemetry.InMemoryMetricsSink()
        telemetry.initialise_counters(sink, stage)
        # The ingress's own counters are all labelled (route, status): none to create before a request.
        assert (bool(sink.counters) != (stage == "ingress")) and all(v == 0 for v in sink.counters.values())
        names = {name for name, _ in sink.counters}
        assert names == {
            m.name
            for m in telemetry.METRICS
            if m.stage == stage
            and m.kind == "counter"
            and (not m.tag_keys or m.name == "zipvl_llm_requests_total")
            and not m.name.startswith("zipvl_router_")  # only where the KV router routes (its exporter's)
        }
        assert not any(name.startswith("zipvl_router_") for name in names)
    assert {tags for name, tags in sink.counters if name == "zipvl_llm_requests_total"} == {
        (("finish_reason", reason),)
        for reason in ("stop", "length", "error", "abort", "refused", "unavailable")
    }


# ------------------------------------------------------------------------------------------ metrics


def test_metric_names_follow_prometheus_conventions():
    names = [spec.name for spec in telemetry.METRICS]
    assert len(names) == len(set(names))
    for spec in telemetry.METRICS:
        assert re.fullmatch(r"zipvl_[a-z0-9_]+", spec.name), spec.name
        assert spec.description.strip()
        assert spec.name.endswith("_total") == (spec.kind == "counter"), spec.name
        if spec.kind == "histogram":
            assert spec.name.endswith(("_seconds", "_ratio")) and list(spec.boundaries) == sorted(
                spec.boundaries
            )
        assert not {"deployment", "replica", "application"} & set(spec.tag_keys)  # Serve's own labels
    with pytest.raises(KeyError, match="not a documented metric"):
        telemetry.InMemoryMetricsSink().inc("zipvl_made_up_total")


def test_docs_describe_every_metric():
    docs = DOCS.read_text()
    missing = [spec.prometheus_name for spec in telemetry.METRICS if f"`{spec.prometheus_name}`" not in docs]
    assert missing == []


def test_engine_stats_become_gauges_and_counter_deltas():
    sink = telemetry.InMemoryMetricsSink()
    exporter = telemetry.EngineStatsExporter(sink)
    stats = EngineStats(
        kv_bytes_used=1000,
        kv_bytes_capacity=4000,
        reserved_bytes=200,
        kv_bytes_saved=300,
        num_running=2,
        num_waiting=1,
        num_preemptions=3,
        kept_fraction_per_layer=[1.0, 0.5],
        prediction_error_mean=-0.1,
    )
    exporter.update(stats)
    stats.num_preemptions, stats.kv_bytes_used, stats.num_running = 5, 0, 0
    exporter.update(stats)
    key = sink.key
    assert sink.counters[key("zipvl_preemptions_total")] == 5
    assert sink.gauges[key("zipvl_kv_cache_used_bytes")] == 0
    assert sink.gauges[key("zipvl_kv_cache_capacity_bytes")] == 4000
    assert sink.gauges[key("zipvl_kv_cache_reserved_bytes")] == 200
    assert sink.gauges[key("zipvl_kv_cache_saved_bytes")] == 300
    assert sink.gauges[key("zipvl_waiting_requests")] == 1
    assert sink.gauges[key("zipvl_layer_kept_ratio", {"layer": "1"})] == 0.5
    assert sink.gauges[key("zipvl_kv_prediction_error_ratio")] == -0.1


def test_finished_requests_fill_the_latency_and_zipvl_histograms():
    sink = telemetry.InMemoryMetricsSink()
    telemetry.record_finished_request(sink, finished_output())
    h, c, key = sink.histograms, sink.counters, sink.key
    assert h[key("zipvl_time_to_first_token_seconds")] == [0.030]
    assert h[key("zipvl_time_per_output_token_seconds")] == [pytest.approx(0.010)]
    assert h[key("zipvl_queue_time_seconds")] == [0.010]
    assert h[key("zipvl_kept_tokens_ratio")] == [pytest.approx(0.55)]
    assert h[key("zipvl_attention_flops_saved_ratio")] == [pytest.approx(0.625)]
    assert c[key("zipvl_kv_saved_bytes_total")] == 4096
    assert c[key("zipvl_llm_requests_total", {"finish_reason": "length"})] == 1
    assert (c[key("zipvl_prompt_tokens_total")], c[key("zipvl_generation_tokens_total")]) == (100, 5)
    # Without engine timestamps, TTFT comes from what the deployment observed, and no queue time.
    sink = telemetry.InMemoryMetricsSink()
    output = finished_output(engine_timestamps=False)
    output.metrics.ttft_s = None
    timing = telemetry.RequestTiming(
        received_ns=1000 * MS, first_output_ns=1025 * MS, final_output_ns=1065 * MS
    )
    telemetry.record_finished_request(sink, output, timing)
    assert sink.histograms[sink.key("zipvl_time_to_first_token_seconds")] == [pytest.approx(0.025)]
    assert sink.key("zipvl_queue_time_seconds") not in sink.histograms
    # An empty answer (the first token sampled was end-of-sequence) still had a first token.
    sink = telemetry.InMemoryMetricsSink()
    output = finished_output()
    output.token_ids, output.finish_reason = [], "stop"
    telemetry.record_finished_request(sink, output)
    assert sink.histograms[sink.key("zipvl_time_to_first_token_seconds")] == [0.030]


def test_encoder_cache_and_router_counters_export_deltas():
    sink = telemetry.InMemoryMetricsSink()
    cache = telemetry.EncoderCacheExporter(sink)
    assert cache.update({"hits": 0, "misses": 2, "size": 2}) == (0, 2)
    assert cache.update({"hits": 3, "misses": 2, "size": 2}) == (3, 0)
    assert sink.counters[sink.key("zipvl_encoder_cache_hits_total")] == 3
    assert sink.counters[sink.key("zipvl_encoder_cache_misses_total")] == 2
    router = telemetry.RouterCountersExporter(sink)
    first = {"fits": 2, "overflow": 1, "chosen_rank": {0: 2, 1: 1}, "predicted_bytes_total": 100}
    router.update({"counters": first, "held_bytes": {"a": 10, "b": 5}})
    second = {**first, "fits": 4, "chosen_rank": {0: 3, 1: 1, 4: 1, -1: 1}, "predicted_bytes_total": 250}
    router.update({"counters": second, "held_bytes": {}})
    c, key = sink.counters, sink.key
    assert c[key("zipvl_router_decisions_total", {"outcome": "fits"})] == 4
    assert c[key("zipvl_router_decisions_total", {"outcome": "overflow"})] == 1
    assert c[key("zipvl_router_decisions_total", {"outcome": "held_back"})] == 0
    assert c[key("zipvl_router_routed_total", {"rank": "0"})] == 3
    assert c[key("zipvl_router_routed_total", {"rank": "3+"})] == 1
    assert c[key("zipvl_router_routed_total", {"rank": "unranked"})] == 1
    assert c[key("zipvl_router_predicted_kv_bytes_total")] == 250
    assert sink.gauges[key("zipvl_router_held_kv_bytes")] == 0


def test_http_routes_are_bounded_labels():
    sink = telemetry.InMemoryMetricsSink()
    for path in ("/v1/chat/completions", "/v1/models/tiny-llava", "/wp-admin/x.php", "/health"):
        telemetry.record_http_request(sink, path, 200, 0.1)
    routes = {dict(tags)["route"] for name, tags in sink.counters}
    assert routes == {"/v1/chat/completions", "/v1/models/{model}", "other", "/health"}


# ------------------------------------------------------------------------------------------ request ids


def _app(seen: list, set_header_in_app: bool = False):
    log = logging.getLogger("zipvl_ray.test_app")

    async def app(scope, receive, send):
        seen.append({k.decode(): v.decode() for k, v in scope["headers"]})
        log.info("handling")
        headers = [(b"content-type", b"text/plain")]
        if set_header_in_app:
            headers.append((b"x-request-id", b"from-the-app"))
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": b"ok"})

    return app


async def _get(app, headers=None):
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get("/v1/stats", headers=headers or {})


@pytest.mark.parametrize(
    "incoming, kept",
    [
        (None, False),
        ("abc-123", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("tenant:42/req.7@eu", True),
        ("has spaces", False),
        ("x" * 129, False),
        ("-leading-dash", False),
        ("ünïcode".encode(), False),
    ],
)
def test_request_ids_are_kept_when_well_formed_and_echoed(incoming, kept):
    seen, observed = [], []
    stream = io.StringIO()
    handler = telemetry.configure_local_logging(stream=stream)
    try:
        app = RequestIdMiddleware(_app(seen, set_header_in_app=True), observer=lambda *a: observed.append(a))
        headers = {"x-request-id": incoming} if incoming is not None else {}
        response = asyncio.run(_get(app, headers))
    finally:
        for name in telemetry.PACKAGE_LOGGERS:
            logging.getLogger(name).removeHandler(handler)
    echoed = response.headers.get_list("x-request-id")
    assert len(echoed) == 1  # the app's own header was replaced, not duplicated
    assert (echoed[0] == incoming) is kept
    assert is_well_formed_request_id(echoed[0])
    assert seen[0]["x-request-id"] == echoed[0]  # the app sees the id that is answered
    assert f"[{echoed[0]}] handling" in stream.getvalue()
    ((path, status, seconds),) = observed
    assert (path, status) == ("/v1/stats", 201) and seconds >= 0


@pytest.mark.parametrize(("answer_first", "expected"), [(False, 499), (True, 200)])
def test_a_request_cancelled_before_its_answer_is_observed_as_499_not_500(answer_first, expected):
    """Serve cancels the ingress's request when its client leaves: that is no server error."""
    observed = []

    async def app(scope, receive, send):
        if answer_first:
            await send({"type": "http.response.start", "status": 200, "headers": []})
        raise asyncio.CancelledError

    async def run():
        middleware = RequestIdMiddleware(app, observer=lambda *a: observed.append(a))
        scope = {"type": "http", "path": "/v1/chat/completions", "headers": []}

        async def send(message):
            pass

        with pytest.raises(asyncio.CancelledError):
            await middleware(scope, None, send)

    asyncio.run(run())
    ((path, status, _),) = observed
    assert (path, status) == ("/v1/chat/completions", expected)


def test_behind_serve_the_proxy_sets_the_header():
    seen = []
    response = asyncio.run(
        _get(RequestIdMiddleware(_app(seen), set_response_header=False), {"x-request-id": "r-1"})
    )
    assert "x-request-id" not in response.headers and seen[0]["x-request-id"] == "r-1"


def test_proxy_sanitizer_drops_only_malformed_ids():
    seen = []
    app = RequestIdSanitizerMiddleware(_app(seen))
    asyncio.run(_get(app, {"x-request-id": "bad id"}))
    asyncio.run(_get(app, {"x-request-id": "good-id"}))
    assert "x-request-id" not in seen[0] and seen[1]["x-request-id"] == "good-id"
    from ray.serve._private.http_util import validate_http_proxy_callback_return

    assert len(validate_http_proxy_callback_return(proxy_middlewares())) == 1
    module, _, name = PROXY_CALLBACK_IMPORT_PATH.partition(":")
    assert module == "zipvl_ray.api.middleware" and name == "proxy_middlewares"


def test_log_filter_falls_back_to_the_installed_source():
    record = logging.LogRecord("zipvl_ray.x", logging.INFO, __file__, 1, "m", (), None)
    previous = telemetry._request_id_fallback
    telemetry._request_id_fallback = lambda: "from-serve"
    try:
        assert telemetry.RequestIdLogFilter().filter(record) and record.request_id == "from-serve"
        with telemetry.bind_request_id("bound"):
            other = logging.LogRecord("zipvl_ray.x", logging.INFO, __file__, 1, "m", (), None)
            telemetry.RequestIdLogFilter().filter(other)
        assert other.request_id == "bound"
    finally:
        telemetry._request_id_fallback = previous


def test_time_per_output_token_ends_at_the_last_kept_token():
    """A request that stops on EOS takes one more step for a token it does not keep: 2 tokens, 3 steps of
    50 ms after the first token's step would read 100 ms per token up to the finish, 50 ms up to the
    last kept token."""
    ms = 1_000_000
    stop = telemetry.StageTimes(0, 0, 1000 * ms, 1100 * ms, "engine", last_token_ns=1050 * ms)
    assert telemetry.time_per_output_token_s(stop, 2) == pytest.approx(0.050)
    observed = telemetry.StageTimes(0, 0, 1000 * ms, 1100 * ms, "observed")  # no engine timestamps
    assert telemetry.time_per_output_token_s(observed, 2) == pytest.approx(0.100)
    assert telemetry.time_per_output_token_s(stop, 1) is None
