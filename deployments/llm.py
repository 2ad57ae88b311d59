"""The LLM stage: one engine per replica, streaming outputs, abort on disconnect, stats for routing.

The engine class is injected (``AsyncLLMEngine`` by default, a fake in tests); it is built with
``load_vision=False`` because image features arrive precomputed from the vision stage. The ingress
calls ``handle.options(stream=True).generate.remote(request, features, routing_hints=...)``: the
features argument is the vision stage's ``DeploymentResponse``, which Serve resolves here, so the
tensors never pass through the ingress; ``routing_hints`` is a plain dict for the request router.

Telemetry: each request runs in a ``zipvl.llm.generate`` span (under Serve's span of the handle call);
when it finishes, its ``zipvl.llm.queue``, ``zipvl.llm.prefill`` (ZipVL attributes) and
``zipvl.llm.decode`` spans are built from the engine's timestamps (the engine runs in a background
thread). Per-request metrics are recorded at finish, the engine's KV and queue gauges every
``ZIPVL_METRICS_INTERVAL_S`` and after each request; one log line per request carries the request id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from zipvl_ray import telemetry
from zipvl_ray.api.local import ENGINE_UNAVAILABLE, make_encoded_prompt, stream_with_abort
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.types import (  # noqa: F401 (POOL_OVERFLOW_ERROR: re-exported)
    POOL_OVERFLOW_ERROR,
    EngineDeadError,
    RequestError,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
    needs_more_than_the_pool,
    pool_overflow_message,
)
from zipvl_ray.routing.replica_stats import autoscaling_stats, routing_stats

logger = logging.getLogger(__name__)

LLM_DEPLOYMENT = "LLMServer"


@dataclass
class GenerateRequest:
    """What the ingress sends the LLM stage besides the image features.

    Attributes
    ----------
    request_id : str
    token_ids : list[int]
        The prompt with expanded image placeholders.
    sampling : SamplingParams
    zipvl : dict or None
        Per-request ZipVL overrides (``tau``, ``max_keep_ratio``, ``enabled``).
    stream : bool
        False: send only the final output (the client waits for the whole answer anyway), which
        saves one object-store hop per token.
    completion_id : str or None
        The client's completion id when ``request_id`` is another (a retry runs under an id of its own);
        spans and log lines carry it, so that a request is found by the id its client saw.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    zipvl: dict[str, Any] | None = None
    stream: bool = True
    completion_id: str | None = None


def _described(request: GenerateRequest) -> str:
    """The completion id, and the engine's id when a retry runs under another."""
    if request.completion_id and request.completion_id != request.request_id:
        return f"{request.completion_id} (engine id {request.request_id})"
    return request.request_id


@dataclass
class StreamError:
    """Sent instead of an output when the engine refuses the request (the ingress maps it to HTTP 4xx).

    Attributes
    ----------
    status_code : int
    message : str
    code : str
    """

    status_code: int
    message: str
    code: str = "invalid_request"


def slim_output(output: RequestOutput) -> RequestOutput:
    """What crosses the process boundary: deltas only until the final output, which carries everything.

    Cumulative ``token_ids`` / ``text`` / ``logprobs`` in every update would make a stream of n tokens cost
    O(n^2).
    """
    if output.finished:
        return output
    logprobs = None if output.logprobs is None else []  # the deltas are in delta_logprobs
    return dataclasses.replace(output, token_ids=[], text="", logprobs=logprobs, metrics=RequestMetrics())


@serve.deployment(name=LLM_DEPLOYMENT)
class LLMServer:
    """Serve deployment wrapping one engine.

    Parameters
    ----------
    engine_cls : type
        Has ``from_pretrained(model, *, dtype, device, zipvl, engine, load_vision)`` returning an object
        with ``generate``, ``abort``, ``stats`` and ``shutdown`` (the ``AsyncLLMEngine`` contract).
    model : str
        Built-in name, local path or hub id.
    dtype, device : str, optional
    zipvl : ZipVLConfig
        Server-side ZipVL defaults.
    engine : EngineConfig
    """

    #: Metrics sink and engine-stats exporter (None outside a replica or with metrics off).
    _metrics: telemetry.MetricsSink | None = None
    _stats_exporter: telemetry.EngineStatsExporter | None = None
    _metrics_task: asyncio.Task | None = None

    def __init__(
        self,
        engine_cls: type,
        model: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
    ):
        self.engine = engine_cls.from_pretrained(
            model, dtype=dtype, device=device, zipvl=zipvl, engine=engine, load_vision=False
        )
        self._metrics = telemetry.setup_replica("llm")
        if self._metrics is not None:
            self._stats_exporter = telemetry.EngineStatsExporter(self._metrics)
            with contextlib.suppress(RuntimeError):  # no running loop: nothing refreshes the gauges
                self._metrics_task = asyncio.get_running_loop().create_task(self._refresh_gauges())

    async def _refresh_gauges(self) -> None:
        interval = telemetry.metrics_interval_s()
        while True:
            self._export_engine_stats()
            await asyncio.sleep(interval)

    def _export_engine_stats(self) -> None:
        if self._stats_exporter is not None:
            try:
                self._stats_exporter.update(self.engine.stats())
            except Exception:  # metrics must never break serving
                logger.exception("exporting engine stats failed")

    async def generate(
        self,
        request: GenerateRequest,
        image_features: list[Any] | None = None,
        routing_hints: dict[str, Any] | None = None,
    ) -> AsyncIterator[RequestOutput | StreamError]:
        """Stream one request's outputs; a refused request yields one :class:`StreamError`.

        Cancellation (the ingress closed the stream because its client went away) aborts the request
        in the engine, which frees its KV blocks.
        """
        prompt = make_encoded_prompt(request.token_ids, image_features or [])
        span = telemetry.start_span("zipvl.llm.generate")
        if telemetry.recording(span):
            span.set_attributes(
                {
                    telemetry.ATTR_REQUEST_ID: telemetry.current_request_id() or "",
                    telemetry.ATTR_COMPLETION_ID: request.completion_id or request.request_id,
                    "zipvl.engine_request_id": request.request_id,
                    "zipvl.prompt_tokens": len(request.token_ids),
                    "zipvl.images": len(image_features or []),
                    "zipvl.max_tokens": request.sampling.max_tokens,
                    "zipvl.stream": request.stream,
                }
            )
        timing = telemetry.RequestTiming()
        final: RequestOutput | None = None
        error: BaseException | str | None = None
        try:
            # ``aclosing``: closing this generator closes the engine's stream now, so the abort has
            # happened when ``aclose()`` returns (the event loop's finalizer would close it later).
            async with contextlib.aclosing(
                stream_with_abort(self.engine, request.request_id, prompt, request.sampling, request.zipvl)
            ) as outputs:
                async for output in outputs:
                    timing.observe(output)
                    if output.finished:
                        if needs_more_than_the_pool(output):
                            # Nothing was generated and nothing ever could be on this replica: the
                            # client's request is too large, not a server failure (HTTP 400), and is
                            # counted as refused like any other invalid request.
                            message = pool_overflow_message(self.engine.stats().kv_bytes_capacity)
                            error = RequestError(message)
                            yield StreamError(status_code=400, message=message, code="kv_capacity_exceeded")
                            continue  # the engine's last output: the stream ends here
                        final = output
                    if request.stream or output.finished:
                        yield slim_output(output)
        except RequestError as exc:
            error = exc
            yield StreamError(status_code=400, message=str(exc))
        except EngineDeadError as exc:  # this replica's engine has stopped: another replica may serve it
            error = exc
            yield StreamError(status_code=503, message=str(exc), code=ENGINE_UNAVAILABLE)
        except BaseException as exc:  # cancelled (client gone) or failed: recorded, then re-raised
            if not isinstance(error, RequestError):  # a refusal already yielded stays a refusal
                error = exc
            raise
        finally:
            self._request_done(request, span, timing, final, error)

    def _request_done(
        self,
        request: GenerateRequest,
        span: Any,
        timing: telemetry.RequestTiming,
        final: RequestOutput | None,
        error: BaseException | str | None,
    ) -> None:
        """Spans, metrics and the log line of a request that ended (finished, refused or cancelled)."""
        try:
            if final is not None:
                telemetry.record_engine_spans(span, final, timing)
                if telemetry.recording(span):
                    span.set_attributes(
                        {
                            "zipvl.output_tokens": len(final.token_ids),
                            "zipvl.finish_reason": final.finish_reason or "unknown",
                        }
                    )
                if self._metrics is not None:
                    telemetry.record_finished_request(self._metrics, final, timing)
                m = final.metrics
                logger.info(
                    "request %s finished (%s): %d prompt tokens (%d image), %d output tokens, "
                    "ttft %s, mean kept ratio %.3f, KV %d of %d dense bytes",
                    _described(request),
                    final.finish_reason,
                    m.prompt_tokens,
                    m.image_tokens,
                    len(final.token_ids),
                    f"{m.ttft_s:.3f} s" if m.ttft_s is not None else "n/a",
                    m.mean_kept_ratio,
                    m.kv_bytes,
                    m.kv_bytes_dense,
                )
                # The engine completed the request: a consumer closing the stream afterwards is no error.
                error = (final.error or "engine error") if final.finish_reason == "error" else None
            else:
                if isinstance(error, RequestError):
                    reason, error = "refused", telemetry.ClientError(str(error))
                elif isinstance(error, EngineDeadError):  # refused: this replica's engine had stopped
                    reason = "unavailable"
                elif error is None or telemetry.span_outcome(error) == "cancelled":
                    reason, error = "abort", "aborted"
                else:  # the engine or the features failed (an OOM moving them to the device...)
                    reason = "error"
                if self._metrics is not None:
                    self._metrics.inc("zipvl_llm_requests_total", 1, {"finish_reason": reason})
                logger.info("request %s ended without a result (%s)", _described(request), reason)
            self._export_engine_stats()
        except Exception:  # telemetry must never break serving
            logger.exception("recording telemetry of request %s failed", request.request_id)
        finally:
            telemetry.end_span(span, error=error)

    async def abort(self, request_id: str) -> None:
        """Abort a request running on this replica."""
        await self.engine.abort(request_id)

    def stats(self) -> dict[str, Any]:
        """This replica's engine statistics (``EngineStats.to_dict()``)."""
        return self.engine.stats().to_dict()

    async def ready(self) -> bool:
        """Answers once the engine is loaded (the constructor returned)."""
        return True

    def check_health(self) -> None:
        """Serve's periodic health check: delegates to the engine's ``check_health`` when it has one."""
        check = getattr(self.engine, "check_health", None)
        if check is not None:
            check()

    def record_routing_stats(self) -> dict[str, Any]:
        """KV geometry, use and kept fractions for the request router (polled by the controller)."""
        # Stamped with the time up to which the snapshot holds every accepted request (an injected engine
        # without ``stats_time`` is taken as current).
        # The stamp first: a request accepted between the two reads is then in the snapshot but not
        # promised by the stamp (counted twice for a moment), never promised but missing.
        stats_time = getattr(self.engine, "stats_time", None)
        stamp = stats_time() if stats_time is not None else None
        return routing_stats(self.engine.stats(), now=stamp)

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Numeric KV and queue metrics for the autoscaling policy."""
        return autoscaling_stats(self.engine.stats())

    def __del__(self):
        task = getattr(self, "_metrics_task", None)
        if task is not None:
            task.cancel()
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
