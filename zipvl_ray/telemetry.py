"""Observability of the serving stack: OpenTelemetry traces, Prometheus metrics and request-scoped logs.

One module used by every deployment (``deployments/``) and by the in-process app.

Tracing
    Ray Serve owns the tracer provider: its HTTP proxy starts one trace per request (honouring an
    incoming W3C ``traceparent``) and propagates it through every handle call. Serve builds the
    provider from an *exporter function* named by ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` (or
    ``tracing_config.exporter_import_path``); :func:`span_processors` is that function
    (:data:`EXPORTER_IMPORT_PATH`). It reads the exporter kind from ``ZIPVL_TRACING_EXPORTER``
    (:data:`EXPORTER_KINDS`): OTLP over gRPC or HTTP when an endpoint is configured
    (``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``, read by the OTLP exporters
    themselves), console, a JSON-lines file per process, in-memory, or none. The sampling ratio is
    Serve's (``RAY_SERVE_TRACING_SAMPLING_RATIO``, parent-based). :func:`start_span`,
    :func:`use_span` and :func:`record_engine_spans` add the ZipVL spans under Serve's current span;
    they cost one provider check when tracing is off.

Metrics
    :data:`METRICS` lists every metric (Prometheus names with a ``zipvl_`` prefix; Ray's metrics agent
    adds ``ray_`` when it exports them). Deployments record through a :class:`MetricsSink`:
    :class:`ServeMetricsSink` creates ``ray.serve.metrics`` objects (imported lazily, so this module
    stays importable without Ray Serve), :class:`InMemoryMetricsSink` keeps values for tests. The
    translators (:class:`EngineStatsExporter`, :class:`EncoderCacheExporter`,
    :class:`RouterCountersExporter`, :func:`record_finished_request`) are plain Python.

Logs
    :data:`REQUEST_ID` holds the request id of the running request (set by the HTTP middleware);
    :class:`RequestIdLogFilter` stamps it on log records and :func:`configure_replica_logging`
    sends the package's log records to Ray Serve's replica logger, which writes the request id of
    Serve's request context (propagated through handle calls) on every line.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from opentelemetry import trace
from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import SpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from zipvl_ray.engine.types import EngineStats, RequestOutput

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- settings

EXPORTER_IMPORT_PATH = "zipvl_ray.telemetry:span_processors"
"""What to give Serve as ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` / ``tracing_config.exporter_import_path``."""

SERVE_EXPORTER_ENV = "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH"
SERVE_SAMPLING_ENV = "RAY_SERVE_TRACING_SAMPLING_RATIO"
EXPORTER_ENV = "ZIPVL_TRACING_EXPORTER"
FILE_DIR_ENV = "ZIPVL_TRACING_FILE_DIR"
METRICS_ENV = "ZIPVL_METRICS"
METRICS_INTERVAL_ENV = "ZIPVL_METRICS_INTERVAL_S"
LOG_LEVEL_ENV = "ZIPVL_LOG_LEVEL"
OTLP_ENDPOINT_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
OTLP_PROTOCOL_ENVS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")

ExporterKind = Literal["auto", "otlp", "console", "file", "memory", "none"]
EXPORTER_KINDS: tuple[str, ...] = ("auto", "otlp", "console", "file", "memory", "none")
"""``auto``: OTLP when an OTLP endpoint is set in the environment, else none."""
DEFAULT_SERVICE_NAME = "zipvl-ray"
DEFAULT_METRICS_INTERVAL_S = 1.0
DEFAULT_LOG_LEVEL = "INFO"
OtlpProtocol = Literal["grpc", "http/protobuf"]
DEFAULT_OTLP_PROTOCOL: OtlpProtocol = "http/protobuf"
"""The OpenTelemetry specification's default OTLP transport."""


#: TelemetrySettings fields that take effect only with ``tracing: true``.
TRACING_ONLY_FIELDS = frozenset({"exporter", "sampling_ratio", "otlp_endpoint", "otlp_protocol", "file_dir"})


class TelemetrySettings(BaseModel):
    """Tracing, metrics and logs of the application (``args.telemetry`` of ``configs/zipvl.yaml``).

    Everything reaches the replicas as environment variables (:meth:`env_vars`). Ray 2.60's HTTP proxy
    reads only the environment of its node, so the proxy, which starts each trace and honours an
    incoming ``traceparent``, needs the same ``RAY_SERVE_TRACING_*`` / ``ZIPVL_TRACING_*`` /
    ``OTEL_*`` variables set on the nodes (see ``docs/observability.md``).
    """

    model_config = ConfigDict(extra="forbid")

    tracing: bool | None = Field(
        None,
        description="True: trace every replica with span_processors; False: no tracing in the replicas; "
        "None: leave it to the RAY_SERVE_TRACING_* environment of the nodes.",
    )
    exporter: ExporterKind = Field(
        "auto",
        description="Span exporter: otlp, console, file (JSON lines per process), memory, none, or auto "
        "(otlp when an OTLP endpoint is set, else none).",
    )
    sampling_ratio: float = Field(
        0.01, ge=0.0, le=1.0, description="Share of new traces sampled (parent-based: a sampled parent wins)."
    )
    otlp_endpoint: str | None = Field(
        None, description="OTLP collector, e.g. http://otel-collector:4317 (gRPC) or :4318 (HTTP)."
    )
    otlp_protocol: OtlpProtocol | None = Field(
        None, description="grpc or http/protobuf (None: the environment's, else http/protobuf)."
    )
    file_dir: str | None = Field(
        None, description="Directory of the file exporter (one spans-<pid>.jsonl per process)."
    )
    service_name: str = Field(
        "zipvl-ray", min_length=1, description="OpenTelemetry service.name of the spans."
    )
    metrics: bool = Field(True, description="Record the zipvl_* Prometheus metrics (ray.serve.metrics).")
    metrics_interval_s: float = Field(
        DEFAULT_METRICS_INTERVAL_S,
        gt=0,
        le=60,
        description="How often replicas refresh their gauges (KV use, queues).",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        DEFAULT_LOG_LEVEL, description="Level of the zipvl_ray / deployments loggers in the replicas."
    )

    @model_validator(mode="after")
    def _tracing_fields_need_tracing(self) -> TelemetrySettings:
        """The exporter, sampling and OTLP fields are applied with ``tracing: true`` only: set with tracing
        null or false they would be dropped without a word."""
        ignored = sorted(TRACING_ONLY_FIELDS & self.model_fields_set)
        if ignored and self.tracing is not True:
            raise ValueError(
                f"{', '.join(ignored)} apply only with tracing: true (with tracing: {self.tracing}, "
                "the nodes' RAY_SERVE_TRACING_* / ZIPVL_TRACING_* / OTEL_* environment decides; "
                "see docs/observability.md)"
            )
        return self

    def env_vars(self) -> dict[str, str]:
        """Environment variables of every replica that carry the settings differing from the defaults.

        Defaults set nothing: replicas then read the same defaults (and tracing stays with the nodes'
        ``RAY_SERVE_TRACING_*`` environment).
        """
        env: dict[str, str] = {}
        if not self.metrics:
            env[METRICS_ENV] = "0"
        if self.metrics_interval_s != DEFAULT_METRICS_INTERVAL_S:
            env[METRICS_INTERVAL_ENV] = repr(self.metrics_interval_s)
        if self.log_level != DEFAULT_LOG_LEVEL:
            env[LOG_LEVEL_ENV] = self.log_level
        if self.service_name != DEFAULT_SERVICE_NAME:
            env["OTEL_SERVICE_NAME"] = self.service_name
        if self.tracing is False:
            env[SERVE_EXPORTER_ENV] = ""
        elif self.tracing:
            env[SERVE_EXPORTER_ENV] = EXPORTER_IMPORT_PATH
            env[SERVE_SAMPLING_ENV] = repr(self.sampling_ratio)
            env[EXPORTER_ENV] = self.exporter
            if self.otlp_endpoint:
                env["OTEL_EXPORTER_OTLP_ENDPOINT"] = self.otlp_endpoint
            if self.otlp_protocol:
                env["OTEL_EXPORTER_OTLP_PROTOCOL"] = self.otlp_protocol
            if self.file_dir:
                env[FILE_DIR_ENV] = self.file_dir
        return env


def metrics_enabled() -> bool:
    """``ZIPVL_METRICS`` (default on)."""
    return os.environ.get(METRICS_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def metrics_interval_s() -> float:
    """``ZIPVL_METRICS_INTERVAL_S`` (default 1 s)."""
    try:
        return max(0.05, float(os.environ.get(METRICS_INTERVAL_ENV, DEFAULT_METRICS_INTERVAL_S)))
    except ValueError:
        return DEFAULT_METRICS_INTERVAL_S


# --------------------------------------------------------------------------------------------- exporters

_memory_exporter: InMemorySpanExporter | None = None
_memory_lock = threading.Lock()


#: The most spans the ``memory`` exporter keeps per process (the oldest go first): a serving process
#: that nothing reads would otherwise grow by about 3 KB per span, ~40 KB per request, without end.
MEMORY_EXPORTER_MAX_SPANS = 10_000


def memory_exporter() -> InMemorySpanExporter:
    """This process's in-memory span exporter (created on first use; the ``memory`` exporter kind).

    It keeps the last :data:`MEMORY_EXPORTER_MAX_SPANS` finished spans.
    """
    global _memory_exporter
    with _memory_lock:
        if _memory_exporter is None:
            from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

            _memory_exporter = InMemorySpanExporter(max_spans=MEMORY_EXPORTER_MAX_SPANS)
        return _memory_exporter


def _otlp_endpoint() -> str | None:
    for name in OTLP_ENDPOINT_ENVS:
        value = os.environ.get(name, "").strip()
        if value:
            return value
    return None


def otlp_protocol() -> OtlpProtocol:
    """The OTLP transport from the environment (traces-specific variable first)."""
    for name in OTLP_PROTOCOL_ENVS:
        value = os.environ.get(name, "").strip().lower()
        if value:
            if value == "http/json":  # allowed by the specification; the Python SDK has no JSON exporter
                logger.warning("%s=http/json: exporting OTLP as http/protobuf (same endpoint)", name)
                return "http/protobuf"
            if value not in ("grpc", "http/protobuf"):
                raise ValueError(f"{name}={value!r}: zipvl-ray exports OTLP as grpc or http/protobuf")
            return value  # type: ignore[return-value]
    return DEFAULT_OTLP_PROTOCOL


def resolve_exporter_kind(kind: str | None = None) -> str:
    """The exporter kind to use: ``kind`` or ``ZIPVL_TRACING_EXPORTER``, with ``auto`` resolved."""
    kind = (kind or os.environ.get(EXPORTER_ENV, "") or "auto").strip().lower()
    if kind not in EXPORTER_KINDS:
        raise ValueError(f"{EXPORTER_ENV}={kind!r}: use one of {', '.join(EXPORTER_KINDS)}")
    if kind == "auto":
        return "otlp" if _otlp_endpoint() else "none"
    return kind


def _json_line(span) -> str:
    return span.to_json(indent=None) + "\n"


def build_span_processors(kind: str | None = None, *, file_dir: str | os.PathLike | None = None) -> list:
    """Span processors for exporter ``kind`` (default: from the environment).

    Parameters
    ----------
    kind : {"auto", "otlp", "console", "file", "memory", "none"}, optional
        ``otlp`` batches spans to the collector of ``OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT`` over
        ``OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL`` (grpc or http/protobuf; the exporters read the standard
        ``OTEL_EXPORTER_OTLP_*`` variables for headers, certificates, timeout). ``console`` writes each
        span as JSON to stdout; ``file`` appends one JSON object per span and line (the SDK's
        ``ReadableSpan.to_json``) to ``<file_dir>/spans-<pid>.jsonl``; ``memory`` keeps spans in
        :func:`memory_exporter`.
    file_dir : path, optional
        Directory of the ``file`` kind (default ``ZIPVL_TRACING_FILE_DIR``).

    Returns
    -------
    list of opentelemetry.sdk.trace.SpanProcessor
    """
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    kind = resolve_exporter_kind(kind)
    if kind == "none":
        return []
    if kind == "memory":
        return [SimpleSpanProcessor(memory_exporter())]
    if kind == "console":
        return [SimpleSpanProcessor(ConsoleSpanExporter(formatter=_json_line))]
    if kind == "file":
        location = str(file_dir or os.environ.get(FILE_DIR_ENV) or "").strip()
        if not location:
            raise ValueError(f"the file span exporter needs a directory: set {FILE_DIR_ENV}")
        directory = Path(location)
        directory.mkdir(parents=True, exist_ok=True)
        # Line-buffered: a span is on disk as soon as it ends (tests and tail -f read it).
        out = open(directory / f"spans-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115
        return [SimpleSpanProcessor(ConsoleSpanExporter(out=out, formatter=_json_line))]
    # otlp
    try:
        if otlp_protocol() == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError as exc:
        raise ImportError(
            "the OTLP span exporter needs opentelemetry-exporter-otlp: pip install 'zipvl-ray[otlp]'"
        ) from exc
    return [BatchSpanProcessor(OTLPSpanExporter())]


def _resource_attributes_name_service() -> bool:
    """Whether ``OTEL_RESOURCE_ATTRIBUTES`` (``key=value,...``) sets ``service.name``."""
    pairs = os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "").split(",")
    return any(pair.split("=", 1)[0].strip() == "service.name" and "=" in pair for pair in pairs)


def span_processors() -> list[SpanProcessor]:
    """Serve's tracing exporter function (:data:`EXPORTER_IMPORT_PATH`): processors from the environment.

    Serve calls it with no argument in every process it traces (proxy and replicas) and installs the
    returned processors on a ``TracerProvider`` sampled ``ParentBasedTraceIdRatio(sampling_ratio)``.
    """
    # Serve builds its TracerProvider right after this call; its resource reads OTEL_SERVICE_NAME, which
    # outranks a service.name in OTEL_RESOURCE_ATTRIBUTES: default it only when neither names the service.
    if not os.environ.get("OTEL_SERVICE_NAME") and not _resource_attributes_name_service():
        os.environ["OTEL_SERVICE_NAME"] = DEFAULT_SERVICE_NAME
    try:
        kind = resolve_exporter_kind()
        processors = build_span_processors(kind)
    except Exception:
        # Serve calls this in the constructor of its proxy and of every replica: an exception there
        # kills the actor, and a tracing typo would stop the whole service. Serve untraced instead.
        logger.exception("tracing is off in process %d: its exporter settings are invalid", os.getpid())
        return []
    logger.info("tracing: %s exporter in process %d (%d span processors)", kind, os.getpid(), len(processors))
    return processors


def read_span_files(directory: str | os.PathLike) -> list[dict[str, Any]]:
    """Every span written by the ``file`` exporter under ``directory`` (all processes), as dicts.

    The files may be read while their processes write them: a last line without its newline is a
    span still being written and is left for the next read.
    """
    import json

    spans = []
    for path in sorted(Path(directory).glob("spans-*.jsonl")):
        text = path.read_text()
        complete = text[: text.rfind("\n") + 1]  # up to the last newline ("" when there is none)
        for line in complete.splitlines():
            if line.strip():
                spans.append(json.loads(line))
    return spans


# --------------------------------------------------------------------------------------------- spans

_provider_override: Any = None
_active_provider: Any = None
_sdk_provider_class: Any = None
#: With no SDK provider installed, the check is repeated at most this often (a provider set later, e.g.
#: by a local setup after import, is still picked up); the off path then costs a clock read.
_RECHECK_S = 1.0
_next_check = 0.0


@contextlib.contextmanager
def use_tracer_provider(provider: Any) -> Iterator[None]:
    """Use ``provider`` instead of the global tracer provider for this module's spans (tests, benchmarks).

    OpenTelemetry lets a process set its global provider once; this lets one process compare
    tracing setups. It does not change Serve's or FastAPI's own spans.
    """
    global _provider_override, _next_check
    previous = _provider_override
    _provider_override = provider
    try:
        yield
    finally:
        _provider_override = previous
        _next_check = 0.0


def _provider() -> Any:
    global _active_provider, _next_check
    if _provider_override is not None:
        return _provider_override
    if _active_provider is not None:
        return _active_provider
    now = time.monotonic()
    if now < _next_check:
        return None
    _next_check = now + _RECHECK_S
    provider = trace.get_tracer_provider()
    if _is_sdk_provider(provider):
        _active_provider = provider  # a global provider is set once per process: cache it
        return provider
    return None


def _is_sdk_provider(provider: Any) -> bool:
    global _sdk_provider_class
    if _sdk_provider_class is None:
        from opentelemetry.sdk.trace import TracerProvider

        _sdk_provider_class = TracerProvider
    return isinstance(provider, _sdk_provider_class)


def tracing_active() -> bool:
    """True when spans of this process go somewhere (an SDK tracer provider is installed)."""
    return _provider() is not None


def tracer() -> trace.Tracer | None:
    """The ``zipvl_ray`` tracer, or None when tracing is off."""
    provider = _provider()
    return provider.get_tracer("zipvl_ray") if provider is not None else None


def start_span(
    name: str,
    *,
    attributes: Mapping[str, Any] | None = None,
    parent: trace.Span | None = None,
    start_time_ns: int | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
) -> trace.Span | None:
    """Start a span (not made current) under ``parent`` or the current span; None when tracing is off.

    End it with ``span.end()``. Use :func:`use_span` to make it current around code that must see it
    (Serve handle calls read the current context to propagate the trace).
    """
    active = tracer()
    if active is None:
        return None
    context = trace.set_span_in_context(parent) if parent is not None else None
    return active.start_span(
        name, context=context, kind=kind, attributes=dict(attributes or {}), start_time=start_time_ns
    )


_NO_SPAN = contextlib.nullcontext()


def use_span(span_: trace.Span | None) -> contextlib.AbstractContextManager:
    """Make ``span_`` current inside a ``with`` block (nothing when it is None); it is not ended on exit."""
    if span_ is None:
        return _NO_SPAN
    return trace.use_span(span_, end_on_exit=False)


@contextlib.contextmanager
def span(name: str, *, attributes: Mapping[str, Any] | None = None) -> Iterator[trace.Span | None]:
    """A current span around a block of synchronous or ``await``-ing code; yields None when tracing is off.

    An exception escaping the block marks the span as an error.
    """
    active = tracer()
    if active is None:
        yield None
        return
    with active.start_as_current_span(
        name, attributes=dict(attributes or {}), record_exception=False, set_status_on_exception=False
    ) as current:
        try:
            yield current
        except BaseException as exc:
            mark_span_outcome(current, exc)
            raise


def recording(span_: trace.Span | None) -> bool:
    """True when ``span_`` records (sampled): only then are attributes worth computing."""
    return span_ is not None and span_.is_recording()


#: Why a request ended early without anything failing (``end_span(error=...)`` strings): the client left
#: or the request was aborted. Not errors of the service.
CANCELLED_REASONS = ("the client went away", "aborted")


class ClientError(str):
    """An ``end_span`` error text for a request refused as invalid (a 4xx): not a failure of the service."""


def span_outcome(error: BaseException | str | None) -> Literal["ok", "cancelled", "client_error", "error"]:
    """How a request's span should end for ``error``.

    ``cancelled``: the client left or the request was aborted (``asyncio.CancelledError``,
    ``GeneratorExit``, :data:`CANCELLED_REASONS`); ``client_error``: refused as invalid (an exception with
    an HTTP ``status_code`` below 500, :class:`ClientError`); ``error``: anything else. Like the metrics
    (a client leaving counts 499, not 5xx), only ``error`` marks the span ERROR, as the OpenTelemetry HTTP
    conventions do for server spans: span-based error rates then count failures of the service only.
    """
    import asyncio

    if error is None:
        return "ok"
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)) or (
        isinstance(error, str) and error in CANCELLED_REASONS
    ):
        return "cancelled"
    status = getattr(error, "status_code", None)
    if isinstance(error, ClientError) or (isinstance(status, int) and 400 <= status < 500):
        return "client_error"
    return "error"


def mark_span_outcome(span_: trace.Span | None, error: BaseException | str | None) -> None:
    """Record ``error`` on ``span_`` as :func:`span_outcome` classifies it (attributes or ERROR status)."""
    if span_ is None or error is None:
        return
    outcome = span_outcome(error)
    description = type(error).__name__ if isinstance(error, BaseException) else str(error)
    if outcome == "cancelled":
        span_.set_attribute("zipvl.cancelled", True)
    elif outcome == "client_error":
        status = getattr(error, "status_code", None)
        # The message, as the client got it (API errors' messages are written to be shown to clients).
        message = str(error) if isinstance(error, str) else (str(error) or description)
        span_.set_attribute("zipvl.client_error", message[:300])
        if isinstance(status, int):
            span_.set_attribute("http.response.status_code", status)
    else:
        from opentelemetry.trace import Status, StatusCode

        if isinstance(error, BaseException):
            span_.record_exception(error)
        span_.set_status(Status(StatusCode.ERROR, description))


def end_span(
    span_: trace.Span | None, *, error: BaseException | str | None = None, end_time_ns: int | None = None
):
    """End ``span_`` (None is ignored), recording ``error`` as :func:`mark_span_outcome` does: a failure
    of the service is an ERROR status, a cancellation or a refused request an attribute."""
    if span_ is None:
        return
    mark_span_outcome(span_, error)
    span_.end(end_time=end_time_ns)


def instrument_method(
    obj: Any,
    method: str,
    span_name: str,
    *,
    attributes: Callable[..., Mapping[str, Any]] | None = None,
) -> None:
    """Replace ``obj.<method>`` (sync or async) on the instance by a version that runs in a span.

    The span carries the request id bound at its start (:func:`current_request_id`), so that a request
    that fails in it can be found by its id too; ``attributes(result)`` adds attributes from the result
    when the span records. Call it only when tracing is active (the unwrapped method costs nothing).
    """
    import inspect

    original = getattr(obj, method)

    def start_attributes() -> dict[str, Any]:
        request_id = current_request_id()
        return {ATTR_REQUEST_ID: request_id} if request_id else {}

    if inspect.iscoroutinefunction(original):

        async def traced_async(*args, **kwargs):
            with span(span_name, attributes=start_attributes()) as current:
                result = await original(*args, **kwargs)
                if attributes is not None and recording(current):
                    current.set_attributes(dict(attributes(result)))
                return result

        setattr(obj, method, traced_async)
        return

    def traced(*args, **kwargs):
        with span(span_name, attributes=start_attributes()) as current:
            result = original(*args, **kwargs)
            if attributes is not None and recording(current):
                current.set_attributes(dict(attributes(result)))
            return result

    setattr(obj, method, traced)


# ZipVL span attributes (namespaced ``zipvl.``).
ATTR_REQUEST_ID = "zipvl.request_id"
ATTR_COMPLETION_ID = "zipvl.completion_id"


def kept_ratio_summary(ratios: Sequence[float]) -> dict[str, Any]:
    """``zipvl.kept_ratio.{min,mean,max,per_layer}`` of a request (empty when ZipVL reported nothing)."""
    if not ratios:
        return {}
    values = [float(r) for r in ratios]
    return {
        "zipvl.kept_ratio.min": min(values),
        "zipvl.kept_ratio.mean": sum(values) / len(values),
        "zipvl.kept_ratio.max": max(values),
        "zipvl.kept_ratio.per_layer": values,
    }


@dataclass
class RequestTiming:
    """What the LLM deployment observed of one request, to complete the engine's own timestamps.

    Attributes
    ----------
    received_ns : int
        ``time.time_ns()`` when the deployment received the request.
    first_output_ns, final_output_ns : int
        When the first / final output reached the deployment (0 until then).
    kv_bytes_after_prefill, kv_bytes_dense_after_prefill : int
        The request's KV bytes when its first output arrived, with and without ZipVL: right after prefill
        for a streamed request; a non-streamed one (``output_kind="final_only"``) has only its final
        output, so spans and metrics take the engine's ``RequestMetrics`` figures first.
    """

    received_ns: int = field(default_factory=time.time_ns)
    first_output_ns: int = 0
    final_output_ns: int = 0
    kv_bytes_after_prefill: int = 0
    kv_bytes_dense_after_prefill: int = 0

    def observe(self, output: RequestOutput) -> None:
        """Note the arrival of ``output`` (call for every output, before slimming it)."""
        now = time.time_ns()
        if not self.first_output_ns:
            self.first_output_ns = now
            self.kv_bytes_after_prefill = int(output.metrics.kv_bytes)
            self.kv_bytes_dense_after_prefill = int(output.metrics.kv_bytes_dense)
        if output.finished:
            self.final_output_ns = now


@dataclass(frozen=True)
class StageTimes:
    """Wall-clock stage boundaries of one request (ns; 0 when unknown) and where they came from."""

    arrival_ns: int
    prefill_start_ns: int
    first_token_ns: int
    finish_ns: int
    source: Literal["engine", "observed"]
    last_token_ns: int = 0  # when the last kept token was generated (engine); 0: use finish_ns


def stage_times(output: RequestOutput, timing: RequestTiming | None = None) -> StageTimes:
    """The engine's timestamps (``RequestMetrics``), or what the deployment observed when it has none."""
    m = output.metrics
    if m.arrival_ns and m.first_token_ns:
        return StageTimes(
            m.arrival_ns, m.prefill_start_ns, m.first_token_ns, m.finish_ns, "engine", m.last_token_ns
        )
    timing = timing or RequestTiming(received_ns=0)
    return StageTimes(timing.received_ns, 0, timing.first_output_ns, timing.final_output_ns, "observed")


def time_per_output_token_s(times: StageTimes, output_tokens: int) -> float | None:
    """Decode time over the tokens after the first (None with fewer than two tokens or no timestamps): from
    the first token to the last kept one (a stop on EOS takes one more step, for a token not counted)."""
    end = times.last_token_ns or times.finish_ns
    if output_tokens < 2 or not times.first_token_ns or not end:
        return None
    return max(0, end - times.first_token_ns) / 1e9 / (output_tokens - 1)


def prefill_attributes(output: RequestOutput, timing: RequestTiming | None = None) -> dict[str, Any]:
    """ZipVL attributes of the prefill span: tokens, kept ratio summary, FLOPs saved, KV bytes vs dense."""
    m = output.metrics
    attributes: dict[str, Any] = {
        "zipvl.prompt_tokens": int(m.prompt_tokens),
        "zipvl.image_tokens": int(m.image_tokens),
        "zipvl.attention_flops_saved": float(m.attention_flops_saved),
        "zipvl.predicted_kv_bytes": int(m.predicted_kv_bytes),
        "zipvl.guard_fired_layers": int(m.guard_fired),
        "zipvl.num_preemptions": int(m.num_preemptions),
        **kept_ratio_summary(m.kept_ratio_per_layer),
    }
    if m.kept_tokens_per_layer:
        attributes["zipvl.kept_tokens.per_layer"] = [int(k) for k in m.kept_tokens_per_layer]
    if m.kv_bytes_after_prefill:  # the engine's own figure (a non-streamed request has no earlier output)
        attributes["zipvl.kv_bytes"] = int(m.kv_bytes_after_prefill)
        attributes["zipvl.kv_bytes_dense"] = int(m.kv_bytes_dense_after_prefill)
    elif timing is not None and timing.first_output_ns:
        attributes["zipvl.kv_bytes"] = timing.kv_bytes_after_prefill
        attributes["zipvl.kv_bytes_dense"] = timing.kv_bytes_dense_after_prefill
    return attributes


def decode_attributes(output: RequestOutput, times: StageTimes) -> dict[str, Any]:
    """Attributes of the decode span: tokens, time per output token, final KV bytes vs dense."""
    m = output.metrics
    tokens = len(output.token_ids)
    attributes: dict[str, Any] = {
        "zipvl.output_tokens": tokens,
        "zipvl.finish_reason": output.finish_reason or "unknown",
        "zipvl.kv_bytes": int(m.kv_bytes),
        "zipvl.kv_bytes_dense": int(m.kv_bytes_dense),
        "zipvl.kv_bytes_saved": max(0, int(m.kv_bytes_dense) - int(m.kv_bytes)),
    }
    tpot = time_per_output_token_s(times, tokens)
    if tpot is not None:
        attributes["zipvl.time_per_output_token_s"] = tpot
    return attributes


def record_engine_spans(
    parent: trace.Span | None, output: RequestOutput, timing: RequestTiming | None = None
) -> list[trace.Span]:
    """Queue, prefill and decode spans of a finished request under ``parent``, from its timestamps.

    The engine runs in a background thread, so these spans are built afterwards with explicit start
    and end times: queue = arrival -> first prefill step, prefill = first prefill step -> first token
    (ZipVL attributes), decode = first token -> finish. Stages without timestamps are skipped (an
    engine without them falls back to what the deployment observed: the prefill span then runs from
    the request's arrival at the deployment).

    Returns
    -------
    list of Span
        The spans created (ended), empty when ``parent`` does not record.
    """
    if not recording(parent):
        return []
    times = stage_times(output, timing)
    common = {"zipvl.timing_source": times.source}
    created = []

    def child(name: str, start: int, end: int, attributes: dict[str, Any]) -> None:
        if not start or not end or end < start:
            return
        child_span = start_span(name, parent=parent, start_time_ns=start, attributes={**common, **attributes})
        if child_span is not None:
            child_span.end(end_time=end)
            created.append(child_span)

    queue_time = (times.prefill_start_ns - times.arrival_ns) / 1e9 if times.prefill_start_ns else None
    if queue_time is not None:
        child(
            "zipvl.llm.queue",
            times.arrival_ns,
            times.prefill_start_ns,
            {"zipvl.queue_time_s": queue_time, "zipvl.num_preemptions": int(output.metrics.num_preemptions)},
        )
    child(
        "zipvl.llm.prefill",
        times.prefill_start_ns or times.arrival_ns,
        times.first_token_ns,
        prefill_attributes(output, timing),
    )
    child("zipvl.llm.decode", times.first_token_ns, times.finish_ns, decode_attributes(output, times))
    return created


# --------------------------------------------------------------------------------------------- metrics

MetricKind = Literal["counter", "gauge", "histogram"]
Stage = Literal["ingress", "vision", "llm"]

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
RATIO_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric.

    Attributes
    ----------
    name : str
        Prometheus name as recorded (Ray's metrics agent exports it as ``ray_<name>``).
    kind : {"counter", "gauge", "histogram"}
    stage : {"ingress", "vision", "llm"}
        The deployment that records it (every series also carries Serve's ``application``,
        ``deployment`` and ``replica`` labels).
    description : str
    tag_keys : tuple of str
        Labels of our own.
    boundaries : tuple of float, optional
        Histogram bucket upper bounds.
    """

    name: str
    kind: MetricKind
    stage: Stage
    description: str
    tag_keys: tuple[str, ...] = ()
    boundaries: tuple[float, ...] | None = None

    @property
    def prometheus_name(self) -> str:
        """The name a Prometheus scrape of Ray's metrics agent shows."""
        return f"ray_{self.name}"


METRICS: tuple[MetricSpec, ...] = (
    # ingress
    MetricSpec(
        "zipvl_http_requests_total",
        "counter",
        "ingress",
        "HTTP requests answered, by route and status code (disconnected streams count with the status sent).",
        ("route", "status_code"),
    ),
    MetricSpec(
        "zipvl_e2e_request_latency_seconds",
        "histogram",
        "ingress",
        "Request received by the ingress -> last response byte sent (streams included), by route.",
        ("route",),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "zipvl_router_decisions_total",
        "counter",
        "ingress",
        "KVPackingRouter decisions in this ingress process, by outcome: fits (first choice fits the "
        "request), overflow (no replica fits), no_kv_info (no replica reported KV stats), held_back "
        "(every replica over the queue guard).",
        ("outcome",),
    ),
    MetricSpec(
        "zipvl_router_routed_total",
        "counter",
        "ingress",
        "Requests Serve routed after a KVPackingRouter decision, by the chosen replica's rank in the "
        "router's ranking (0 = first choice; unranked = a replica the router had not ranked).",
        ("rank",),
    ),
    MetricSpec(
        "zipvl_router_predicted_kv_bytes_total",
        "counter",
        "ingress",
        "Sum of the router's predicted post-pruning KV bytes of the first choice over decisions.",
    ),
    MetricSpec(
        "zipvl_router_held_kv_bytes",
        "gauge",
        "ingress",
        "KV bytes the router of this ingress process currently reserves on LLM replicas (select-and-reserve).",
    ),
    # vision
    MetricSpec(
        "zipvl_encoder_cache_hits_total",
        "counter",
        "vision",
        "Images whose features came from the vision replica's encoder cache.",
    ),
    MetricSpec(
        "zipvl_encoder_cache_misses_total",
        "counter",
        "vision",
        "Images the vision replica had to encode (not in its encoder cache).",
    ),
    MetricSpec(
        "zipvl_encoder_cache_entries", "gauge", "vision", "Entries in the vision replica's encoder cache."
    ),
    # llm, per request
    MetricSpec(
        "zipvl_time_to_first_token_seconds",
        "histogram",
        "llm",
        "Request arrival at the engine -> first generated token (queueing and prefill included).",
        (),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "zipvl_time_per_output_token_seconds",
        "histogram",
        "llm",
        "Decode time per generated token after the first, per request.",
        (),
        TOKEN_LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "zipvl_queue_time_seconds",
        "histogram",
        "llm",
        "Request arrival at the engine -> its first prefill step.",
        (),
        LATENCY_BUCKETS_S,
    ),
    MetricSpec(
        "zipvl_llm_requests_total",
        "counter",
        "llm",
        "Requests the LLM replica ended, by finish reason: stop, length, error (engine), abort (cancelled, "
        "e.g. the client left) or refused (invalid for the engine, answered 400).",
        ("finish_reason",),
    ),
    MetricSpec(
        "zipvl_prompt_tokens_total", "counter", "llm", "Prompt tokens of finished requests (images included)."
    ),
    MetricSpec("zipvl_generation_tokens_total", "counter", "llm", "Tokens generated for finished requests."),
    MetricSpec(
        "zipvl_kept_tokens_ratio",
        "histogram",
        "llm",
        "Per request, the share of prompt tokens ZipVL kept in the KV cache, averaged over layers (1 = dense).",
        (),
        RATIO_BUCKETS,
    ),
    MetricSpec(
        "zipvl_attention_flops_saved_ratio",
        "histogram",
        "llm",
        "Per request, the share of prefill attention FLOPs ZipVL avoided (1 - mean over layers of (kept/n)^2).",
        (),
        RATIO_BUCKETS,
    ),
    MetricSpec(
        "zipvl_kv_saved_bytes_total",
        "counter",
        "llm",
        "Dense-equivalent KV bytes minus the bytes held, at finish, summed over finished requests.",
    ),
    # llm, per replica snapshot
    MetricSpec(
        "zipvl_kv_cache_used_bytes", "gauge", "llm", "KV pool bytes held by sequences on the replica."
    ),
    MetricSpec("zipvl_kv_cache_capacity_bytes", "gauge", "llm", "KV pool size of the replica."),
    MetricSpec(
        "zipvl_kv_cache_reserved_bytes",
        "gauge",
        "llm",
        "Bytes admission has promised to running sequences for decode growth, not yet used.",
    ),
    MetricSpec(
        "zipvl_kv_cache_saved_bytes",
        "gauge",
        "llm",
        "Dense-equivalent KV bytes minus the bytes held, over the sequences the replica holds now.",
    ),
    MetricSpec("zipvl_running_requests", "gauge", "llm", "Requests in the replica's running batch."),
    MetricSpec("zipvl_waiting_requests", "gauge", "llm", "Requests queued in the replica's scheduler."),
    MetricSpec(
        "zipvl_preemptions_total",
        "counter",
        "llm",
        "Sequences preempted (KV freed, recomputed later) because the KV pool ran out.",
    ),
    MetricSpec(
        "zipvl_layer_kept_ratio",
        "gauge",
        "llm",
        "Running mean, over recent prefills, of the kept share of prompt tokens per decoder layer.",
        ("layer",),
    ),
    MetricSpec(
        "zipvl_kv_prediction_error_ratio",
        "gauge",
        "llm",
        "Moving average (weight 0.1 on the newest request) of (KV bytes held after prefill - predicted) "
        "/ predicted, over requests with the server's ZipVL settings: the error of the KV footprint "
        "prediction the router and admission use (positive = under-predicted).",
    ),
)
"""Every metric, in documentation order."""

METRICS_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


class MetricsSink(Protocol):
    """Where metric values go (``ray.serve.metrics`` in a replica, a dict in tests)."""

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None: ...

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None: ...


class InMemoryMetricsSink:
    """Keeps counters, gauges and histogram observations, keyed by ``(name, sorted tags)``."""

    def __init__(self) -> None:
        self.counters: dict[tuple, float] = {}
        self.gauges: dict[tuple, float] = {}
        self.histograms: dict[tuple, list[float]] = {}

    @staticmethod
    def key(name: str, tags: Mapping[str, str] | None = None) -> tuple:
        _check(name)
        return (name, tuple(sorted((tags or {}).items())))

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        if value < 0:
            raise ValueError(f"counter {name} cannot decrease")
        key = self.key(name, tags)
        self.counters[key] = self.counters.get(key, 0.0) + value

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.gauges[self.key(name, tags)] = float(value)

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self.histograms.setdefault(self.key(name, tags), []).append(float(value))


def _check(name: str) -> MetricSpec:
    spec = METRICS_BY_NAME.get(name)
    if spec is None:
        raise KeyError(f"{name} is not a documented metric (telemetry.METRICS)")
    return spec


class ServeMetricsSink:
    """Records into ``ray.serve.metrics`` Counter / Gauge / Histogram objects (created on first use).

    Use it only inside a Serve replica: Serve adds the ``application``, ``deployment`` and ``replica``
    labels, and Ray's metrics agent exports every series to Prometheus.

    Parameters
    ----------
    stage : {"ingress", "vision", "llm"}
        Only this stage's metrics may be recorded (a mistake otherwise).
    """

    def __init__(self, stage: Stage):
        self.stage = stage
        self._metrics: dict[str, Any] = {}
        self._initialised: set[tuple] = set()

    def _metric(self, name: str) -> Any:
        metric = self._metrics.get(name)
        if metric is not None:
            return metric
        spec = _check(name)
        if spec.stage != self.stage:
            raise ValueError(f"{name} belongs to the {spec.stage} stage, not {self.stage}")
        from ray.serve import metrics as serve_metrics

        if spec.kind == "counter":
            metric = serve_metrics.Counter(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        elif spec.kind == "gauge":
            metric = serve_metrics.Gauge(spec.name, description=spec.description, tag_keys=spec.tag_keys)
        else:
            metric = serve_metrics.Histogram(
                spec.name,
                description=spec.description,
                boundaries=list(spec.boundaries or LATENCY_BUCKETS_S),
                tag_keys=spec.tag_keys,
            )
        self._metrics[name] = metric
        return metric

    def inc(self, name: str, value: float = 1.0, tags: Mapping[str, str] | None = None) -> None:
        """Add ``value``; 0 creates the series at 0 (Prometheus: a counter exists before its first event)."""
        if value < 0:
            raise ValueError(f"counter {name} cannot decrease")
        metric = self._metric(name)
        if value > 0:
            metric.inc(value, tags=dict(tags) if tags else None)
        else:
            series = (name, tuple(sorted((tags or {}).items())))
            if series not in self._initialised:
                # Counter.inc refuses 0; recording 0 through the base class creates the series.
                metric._record(0.0, tags=dict(tags) if tags else None)
                self._initialised.add(series)

    def set(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._metric(name).set(value, tags=dict(tags) if tags else None)

    def observe(self, name: str, value: float, tags: Mapping[str, str] | None = None) -> None:
        self._metric(name).observe(value, tags=dict(tags) if tags else None)


def record_finished_request(
    sink: MetricsSink, output: RequestOutput, timing: RequestTiming | None = None
) -> None:
    """Per-request LLM metrics of a finished ``output``: latencies, tokens, ZipVL savings, finish reason."""
    m = output.metrics
    times = stage_times(output, timing)
    sink.inc("zipvl_llm_requests_total", 1, {"finish_reason": output.finish_reason or "unknown"})
    sink.inc("zipvl_prompt_tokens_total", m.prompt_tokens)
    sink.inc("zipvl_generation_tokens_total", len(output.token_ids))
    ttft = m.ttft_s  # the engine's: set when a first token was sampled, even an end-of-sequence one
    if ttft is None and output.token_ids and times.first_token_ns and times.arrival_ns:
        ttft = (times.first_token_ns - times.arrival_ns) / 1e9  # observed by the deployment
    if ttft is not None:
        sink.observe("zipvl_time_to_first_token_seconds", max(0.0, ttft))
    tpot = time_per_output_token_s(times, len(output.token_ids))
    if tpot is not None:
        sink.observe("zipvl_time_per_output_token_seconds", tpot)
    if times.source == "engine" and times.prefill_start_ns:
        sink.observe("zipvl_queue_time_seconds", max(0.0, m.queue_time_s))
    if m.kept_tokens_per_layer:
        sink.observe("zipvl_kept_tokens_ratio", m.mean_kept_ratio)
        sink.observe("zipvl_attention_flops_saved_ratio", m.attention_flops_saved)
    saved = int(m.kv_bytes_dense) - int(m.kv_bytes)
    if m.kv_bytes_dense and saved > 0:
        sink.inc("zipvl_kv_saved_bytes_total", saved)


class EngineStatsExporter:
    """Turns successive :class:`~zipvl_ray.engine.types.EngineStats` snapshots into gauges and counter deltas."""

    def __init__(self, sink: MetricsSink):
        self.sink = sink
        self._preemptions: int | None = None

    def update(self, stats: EngineStats) -> None:
        sink = self.sink
        sink.set("zipvl_kv_cache_used_bytes", stats.kv_bytes_used)
        sink.set("zipvl_kv_cache_capacity_bytes", stats.kv_bytes_capacity)
        sink.set("zipvl_kv_cache_reserved_bytes", stats.reserved_bytes)
        sink.set("zipvl_kv_cache_saved_bytes", stats.kv_bytes_saved)
        sink.set("zipvl_running_requests", stats.num_running)
        sink.set("zipvl_waiting_requests", stats.num_waiting)
        sink.set("zipvl_kv_prediction_error_ratio", stats.prediction_error_mean)
        for layer, fraction in enumerate(stats.kept_fraction_per_layer):
            sink.set("zipvl_layer_kept_ratio", fraction, {"layer": str(layer)})
        previous = self._preemptions if self._preemptions is not None else 0
        # The first snapshot exports the total since start (the counter starts with the replica).
        sink.inc("zipvl_preemptions_total", max(0, stats.num_preemptions - previous))
        self._preemptions = stats.num_preemptions


class EncoderCacheExporter:
    """Turns an encoder's ``cache_stats()`` (cumulative hits / misses, size) into counters and a gauge."""

    def __init__(self, sink: MetricsSink):
        self.sink = sink
        self._hits = 0
        self._misses = 0

    def update(self, cache_stats: Mapping[str, Any]) -> tuple[int, int]:
        """Export the change since the last call; returns ``(new hits, new misses)``."""
        hits, misses = int(cache_stats.get("hits", 0)), int(cache_stats.get("misses", 0))
        new_hits, new_misses = max(0, hits - self._hits), max(0, misses - self._misses)
        self.sink.inc("zipvl_encoder_cache_hits_total", new_hits)
        self.sink.inc("zipvl_encoder_cache_misses_total", new_misses)
        self.sink.set("zipvl_encoder_cache_entries", int(cache_stats.get("size", 0)))
        self._hits, self._misses = hits, misses
        return new_hits, new_misses


ROUTER_OUTCOMES = ("fits", "overflow", "no_kv_info", "held_back")


class RouterCountersExporter:
    """Turns a ``KVPackingRouter.telemetry()`` dict (cumulative counters) into counter deltas and a gauge."""

    def __init__(self, sink: MetricsSink):
        self.sink = sink
        self._last: dict[str, float] = {}

    def _delta(self, key: str, value: float) -> float:
        previous = self._last.get(key, 0.0)
        self._last[key] = value
        return max(0.0, value - previous)

    def update(self, telemetry_dict: Mapping[str, Any]) -> None:
        counters = telemetry_dict.get("counters", {})
        for outcome in ROUTER_OUTCOMES:
            self.sink.inc(
                "zipvl_router_decisions_total",
                self._delta(outcome, float(counters.get(outcome, 0))),
                {"outcome": outcome},
            )
        by_rank: dict[str, float] = {}
        for rank, count in (counters.get("chosen_rank") or {}).items():
            rank = int(rank)
            label = "unranked" if rank < 0 else str(rank) if rank < 3 else "3+"
            by_rank[label] = by_rank.get(label, 0.0) + float(count)
        for label, count in by_rank.items():
            self.sink.inc("zipvl_router_routed_total", self._delta(f"rank:{label}", count), {"rank": label})
        self.sink.inc(
            "zipvl_router_predicted_kv_bytes_total",
            self._delta("predicted", float(counters.get("predicted_bytes_total", 0))),
        )
        held = telemetry_dict.get("held_bytes") or {}
        self.sink.set("zipvl_router_held_kv_bytes", float(sum(held.values())))


HTTP_ROUTES = ("/v1/chat/completions", "/v1/models", "/health", "/v1/stats")


def route_label(path: str) -> str:
    """A bounded label for an HTTP path (unknown paths are ``other``: no label per URL)."""
    if path in HTTP_ROUTES:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    return "other"


def record_http_request(sink: MetricsSink, path: str, status_code: int, seconds: float) -> None:
    """Ingress metrics of one answered HTTP request."""
    route = route_label(path)
    sink.inc("zipvl_http_requests_total", 1, {"route": route, "status_code": str(status_code)})
    sink.observe("zipvl_e2e_request_latency_seconds", max(0.0, seconds), {"route": route})


# --------------------------------------------------------------------------------------------- logs

REQUEST_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("zipvl_request_id", default=None)
"""The request id of the request this code runs for (set by the HTTP middleware)."""

_request_id_fallback: Callable[[], str | None] | None = None


def current_request_id() -> str | None:
    """The running request's id: :data:`REQUEST_ID`, else the fallback installed by the deployment."""
    value = REQUEST_ID.get()
    if value is None and _request_id_fallback is not None:
        try:
            value = _request_id_fallback()
        except Exception:  # logging must never fail
            value = None
    return value or None


class bind_request_id:  # noqa: N801 - used like a function: ``with bind_request_id(rid):``
    """Set :data:`REQUEST_ID` inside a ``with`` block."""

    __slots__ = ("request_id", "_token")

    def __init__(self, request_id: str | None):
        self.request_id = request_id
        self._token: contextvars.Token | None = None

    def __enter__(self) -> None:
        self._token = REQUEST_ID.set(self.request_id)

    def __exit__(self, *exc_info: object) -> None:
        REQUEST_ID.reset(self._token)


class RequestIdLogFilter(logging.Filter):
    """Adds ``record.request_id`` (the running request's id, or ``-``) to every record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", None):
            record.request_id = current_request_id() or "-"
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
"""Format of :func:`configure_local_logging`: every line carries the request id."""

PACKAGE_LOGGERS = ("zipvl_ray", "deployments")


class ForwardingHandler(logging.Handler):
    """Hands records to another logger's handlers (Ray Serve's replica logger in deployments)."""

    def __init__(self, target: logging.Logger):
        super().__init__()
        self.target = target

    def emit(self, record: logging.LogRecord) -> None:
        self.target.handle(record)


def configure_replica_logging(
    *,
    request_id_source: Callable[[], str | None] | None = None,
    serve_logger_name: str = "ray.serve",
    level: str | None = None,
) -> None:
    """Send the package's log records to Serve's replica logger, stamped with the request id.

    Serve's logger writes the replica log file (``logs/serve/replica_<app>_<deployment>_<id>.log``,
    text or JSON per ``logging_config``) and adds the request id of Serve's request context to each
    line written while a request runs; Serve propagates that id (the ``x-request-id`` header) through
    handle calls, so ingress, vision and LLM lines of one request carry the same id. Idempotent.

    Parameters
    ----------
    request_id_source : callable, optional
        Returns the running request's id where :data:`REQUEST_ID` is unset (Serve's request context).
    serve_logger_name : str
    level : str, optional
        Level of the package loggers (default ``ZIPVL_LOG_LEVEL``, else INFO).
    """
    global _request_id_fallback
    if request_id_source is not None:
        _request_id_fallback = request_id_source
    target = logging.getLogger(serve_logger_name)
    level = (level or os.environ.get(LOG_LEVEL_ENV) or "INFO").upper()
    for name in PACKAGE_LOGGERS:
        package_logger = logging.getLogger(name)
        package_logger.setLevel(level)
        if not any(isinstance(h, ForwardingHandler) for h in package_logger.handlers):
            handler = ForwardingHandler(target)
            handler.addFilter(RequestIdLogFilter())
            package_logger.addHandler(handler)
        package_logger.propagate = False


def configure_local_logging(level: str = "INFO", stream: Any = None) -> logging.Handler:
    """A stderr handler (or ``stream``) on the package loggers writing :data:`LOG_FORMAT` lines."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(RequestIdLogFilter())
    for name in PACKAGE_LOGGERS:
        package_logger = logging.getLogger(name)
        package_logger.setLevel(level)
        package_logger.addHandler(handler)
    return handler


# --------------------------------------------------------------------------------------------- Serve glue
# Used only by the deployments (they run inside Serve replicas); Ray Serve is imported lazily here.


def serve_request_id() -> str | None:
    """The request id of Ray Serve's request context (the ``x-request-id``), or None outside a request."""
    from ray.serve import context

    request_id = context._get_serve_request_context().request_id
    return request_id or None


def in_serve_replica() -> bool:
    """True inside a Ray Serve replica (False where tests construct deployment classes directly)."""
    try:
        from ray import serve

        serve.get_replica_context()
    except Exception:
        return False
    return True


def replica_metrics_sink(stage: Stage) -> ServeMetricsSink | None:
    """A :class:`ServeMetricsSink` when metrics are on and this runs in a Serve replica, else None."""
    if not metrics_enabled() or not in_serve_replica():
        return None
    return ServeMetricsSink(stage)


#: Every finish reason ``zipvl_llm_requests_total`` counts (its series exist from a replica's start).
FINISH_REASONS = ("stop", "length", "error", "abort", "refused", "unavailable")


def initial_counter_series(stage: Stage) -> list[tuple[str, dict[str, str]]]:
    """The counter series a replica of ``stage`` creates at 0 when it starts: every counter without labels
    and ``zipvl_llm_requests_total`` per finish reason. A series that first appears at 1 hides its first
    event from ``rate()`` / ``increase()`` (an alert on the first error of a new replica would not fire).

    The ``zipvl_router_*`` counters are left out: they exist only where a ``KVPackingRouter`` routes (its
    exporter creates them), so that their absence says Serve's default router is in use."""
    series = [
        (m.name, {})
        for m in METRICS
        if m.stage == stage
        and m.kind == "counter"
        and not m.tag_keys
        and not m.name.startswith("zipvl_router_")
    ]
    if stage == "llm":
        series += [("zipvl_llm_requests_total", {"finish_reason": reason}) for reason in FINISH_REASONS]
    return series


def initialise_counters(sink: MetricsSink, stage: Stage) -> None:
    """Create :func:`initial_counter_series` at 0 in ``sink``."""
    for name, tags in initial_counter_series(stage):
        sink.inc(name, 0, tags or None)


def setup_replica(stage: Stage) -> ServeMetricsSink | None:
    """What every deployment's constructor does: replica logging with request ids, and its metrics sink
    (with its counters created at 0).

    Outside a replica (a test constructing the class) it changes nothing and returns None.
    """
    if not in_serve_replica():
        return None
    configure_replica_logging(request_id_source=serve_request_id)
    sink = replica_metrics_sink(stage)
    if sink is not None:
        initialise_counters(sink, stage)
    return sink


__all__ = [
    "EXPORTER_IMPORT_PATH",
    "EXPORTER_KINDS",
    "METRICS",
    "REQUEST_ID",
    "EncoderCacheExporter",
    "EngineStatsExporter",
    "InMemoryMetricsSink",
    "MetricSpec",
    "MetricsSink",
    "RequestIdLogFilter",
    "RequestTiming",
    "RouterCountersExporter",
    "ServeMetricsSink",
    "TelemetrySettings",
    "bind_request_id",
    "build_span_processors",
    "configure_local_logging",
    "configure_replica_logging",
    "current_request_id",
    "instrument_method",
    "memory_exporter",
    "read_span_files",
    "in_serve_replica",
    "replica_metrics_sink",
    "serve_request_id",
    "setup_replica",
    "record_engine_spans",
    "record_finished_request",
    "record_http_request",
    "span",
    "span_processors",
    "start_span",
    "tracing_active",
    "use_span",
    "use_tracer_provider",
]
