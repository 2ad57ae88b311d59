"""The ingress: the OpenAI-compatible HTTP API (FastAPI via ``@serve.ingress``) in front of the two stages.

It does CPU work only (images, chat template, placeholders, tokens: :class:`zipvl_ray.api.server.ChatPreparer`)
and forwards with Serve handles: pixels to the vision stage, then token ids + the vision stage's
*response* (not its result) to the LLM stage, so image features go from the vision replica to the
LLM replica without passing through here. Closing a stream (the client went away) cancels the LLM
call, which aborts the request and frees its KV.

Telemetry (:func:`build_ingress_app`): the request id middleware (ids on log lines; Serve's proxy
returns the ``x-request-id`` header), ``zipvl_http_requests_total`` / ``zipvl_e2e_request_latency_seconds``,
preprocessing spans (``zipvl.ingress.preprocess`` with image decode, image preprocessing, chat template
and tokenize children) and a ``zipvl.ingress.generate`` span that is current while the handle calls are
made, so Serve propagates the trace to the vision and LLM replicas. The KV-packing router lives in
this process (it routes the LLM handle's calls): its counters are exported from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.llm import GenerateRequest, StreamError
from zipvl_ray import telemetry
from zipvl_ray.api.errors import APIError
from zipvl_ray.api.local import ENGINE_UNAVAILABLE
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.engine.types import RequestOutput, SamplingParams
from zipvl_ray.multimodal import PreparedPrompt, PromptProcessor
from zipvl_ray.routing.footprint import RoutingHints

logger = logging.getLogger(__name__)

INGRESS_DEPLOYMENT = "OpenAIIngress"

#: Serve names replica actors ``SERVE_REPLICA::<app>#<deployment>#<id>`` (``ReplicaID.to_full_id_str``).
REPLICA_ACTOR_PREFIX = "SERVE_REPLICA::"
#: How long the replica list used by ``GET /v1/stats`` is reused.
REPLICA_LIST_TTL_S = 2.0
#: Times a request is sent again when its replica died before the first output reached the client.
REPLICA_FAILURE_RETRIES = 2


def load_processor(model: str):
    """The served model's processor: :func:`zipvl_ray.models.load_processor` (no checkpoint weights)."""
    from zipvl_ray.models import load_processor as load

    return load(model)


class RayServeBackend:
    """:class:`~zipvl_ray.api.server.InferenceBackend` over the vision and LLM deployments' handles.

    A replica that dies under a request (its actor killed, its node lost) fails the handle call with a
    ``RayActorError``; a replica whose engine has stopped refuses it (a ``StreamError`` with code
    ``engine_unavailable``; its health check fails, and Serve replaces it). When no output has reached the caller yet (always the case for a non-streamed
    request, whose only output is the final one), the request runs again, up to
    ``replica_failure_retries`` times, on the replicas Serve still has; otherwise the caller gets an
    :class:`APIError` 503 (``replica_failed``, ``Retry-After``) that the HTTP layer answers in OpenAI's
    format (as the response, or as the last event of a started stream).
    """

    def __init__(
        self,
        vision: DeploymentHandle,
        llm: DeploymentHandle,
        *,
        health_timeout_s: float = 5.0,
        replica_failure_retries: int = REPLICA_FAILURE_RETRIES,
    ):
        self.vision = vision
        self.llm = llm
        self.health_timeout_s = health_timeout_s
        self.replica_failure_retries = replica_failure_retries
        self._replicas: dict[str, tuple[float, list[tuple[str, Any]]]] = {}

    async def generate(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        zipvl: dict[str, Any] | None,
        hints: RoutingHints,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        span = telemetry.start_span("zipvl.ingress.generate")
        if telemetry.recording(span):
            span.set_attributes(
                {
                    telemetry.ATTR_REQUEST_ID: telemetry.current_request_id() or "",
                    telemetry.ATTR_COMPLETION_ID: request_id,
                    "zipvl.prompt_tokens": prompt.num_tokens,
                    "zipvl.image_tokens": prompt.num_image_tokens,
                    "zipvl.images": len(prompt.images),
                    "zipvl.max_tokens": sampling.max_tokens,
                    "zipvl.stream": stream,
                }
            )
        request = GenerateRequest(
            request_id=request_id,
            token_ids=list(prompt.token_ids),
            sampling=sampling,
            zipvl=zipvl,
            stream=stream,
            completion_id=request_id,
        )
        finished = False
        error: BaseException | str | None = None
        last: RequestOutput | None = None
        outputs = features = None
        try:
            for attempt in range(self.replica_failure_retries + 1):
                # The span is current while the calls are made: Serve propagates it to the replicas.
                with telemetry.use_span(span):
                    # Chained: the LLM replica receives the vision stage's result directly.
                    features = self.vision.encode.remote(prompt.images) if prompt.images else None
                    outputs = self.llm.options(stream=True).generate.remote(
                        request, features, routing_hints=hints.to_dict()
                    )
                try:
                    async for item in outputs:
                        if isinstance(item, StreamError):
                            if item.code == ENGINE_UNAVAILABLE:  # that replica's engine stopped
                                raise EngineUnavailable(item.message)
                            finished = True
                            raise APIError(item.message, status_code=item.status_code, code=item.code)
                        finished = item.finished
                        last = item
                        yield item
                        if finished:
                            return
                    # A stream that ends without a finished output: the handler reports it to the client
                    # (engine_error), and the span and the log say the same (not "the client went away").
                    error = "the LLM stage ended the stream without a result"
                    return
                except Exception as exc:
                    if not is_replica_failure(exc):
                        raise
                    if last is None and attempt < self.replica_failure_retries:
                        # Nothing reached the client yet: run the request again on a live replica. An
                        # unreachable replica may still be running the first attempt: cancel it, and give
                        # the retry its own engine id (the same id on the same replica would be refused).
                        logger.warning(
                            "chat completion %s: a replica failed before the first output (%s); retrying",
                            request_id,
                            type(exc).__name__,
                        )
                        cancel_quietly(outputs)
                        if features is not None:
                            cancel_quietly(features)
                        request = dataclasses.replace(request, request_id=f"{request_id}-retry{attempt + 1}")
                        if telemetry.recording(span):
                            span.add_event(
                                "zipvl.retry", {"attempt": attempt + 1, "reason": type(exc).__name__}
                            )
                        continue
                    raise replica_failure_error(exc) from None
        except (BackPressureError, DeploymentUnavailableError) as exc:
            error = exc
            raise unavailable_error(exc) from None
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not finished and outputs is not None:
                cancel_quietly(outputs)
                if features is not None:  # a client that left during the encode: stop it too
                    cancel_quietly(features)
            _end_generate(span, request_id, prompt, last, error)

    async def _ping(self, handle: DeploymentHandle) -> str | None:
        """None when a replica of the stage passes its health check, else why not.

        Asked of the replica actors directly, as Serve's controller does: a routed call (``ready``) waits
        behind ``max_ongoing_requests``, so a stage saturated by requests would read as down exactly at
        peak load. Through the handle only when the actors cannot be listed.
        """
        try:
            replicas = await asyncio.to_thread(self._list_replicas, handle)
        except Exception:  # the listing is best effort
            replicas = []
        if not replicas:
            response = handle.ready.remote()
            try:
                await asyncio.wait_for(_awaitable(response), timeout=self.health_timeout_s)
            except TimeoutError:
                cancel_quietly(response)  # or it would stay queued in the router for good
                return f"no answer within {self.health_timeout_s} s"
            except Exception as exc:  # a dead or failing stage: report, do not raise
                return f"{type(exc).__name__}"
            return None

        async def check(actor: Any) -> None:
            await asyncio.wait_for(_awaitable(actor.check_health.remote()), timeout=self.health_timeout_s)

        pending = {asyncio.ensure_future(check(actor)) for _, actor in replicas}
        first_error: BaseException | None = None
        try:
            for done in asyncio.as_completed(pending):
                try:
                    await done
                    return None  # one healthy replica is enough
                except Exception as exc:  # starting, failing or gone: look at the others
                    first_error = first_error or exc
        finally:
            for task in pending:
                task.cancel()
        if isinstance(first_error, TimeoutError):
            return f"no answer within {self.health_timeout_s} s"
        return f"{type(first_error).__name__}"

    async def health(self) -> dict[str, str | None]:
        vision, llm = await asyncio.gather(self._ping(self.vision), self._ping(self.llm))
        return {"vision": vision, "llm": llm}

    def _list_replicas(self, handle: DeploymentHandle) -> list[tuple[str, Any]]:
        """``(replica id, actor handle)`` of the deployment's live replicas (blocking GCS calls: run in a thread)."""
        key = f"{handle.app_name}#{handle.deployment_name}#"
        cached = self._replicas.get(key)
        if cached is not None and time.monotonic() - cached[0] < REPLICA_LIST_TTL_S:
            return cached[1]
        prefix = REPLICA_ACTOR_PREFIX + key
        replicas = []
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["name"].startswith(prefix):
                try:
                    actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                except ValueError:  # gone since the listing
                    continue
                replicas.append((entry["name"][len(prefix) :], actor))
        replicas.sort(key=lambda item: item[0])
        self._replicas[key] = (time.monotonic(), replicas)
        return replicas

    async def _replica_stats(self, handle: DeploymentHandle) -> list[dict[str, Any]]:
        """Every replica's ``record_routing_stats()``, read from the replica actors directly.

        A handle call reaches one replica; to report each, this lists the deployment's replica actors
        by their Serve name and calls the method Serve's controller polls. Falls back to one replica
        through the handle if the actors cannot be listed.
        """
        try:
            replicas = await asyncio.to_thread(self._list_replicas, handle)
        except Exception:  # the listing is best effort; stats still come from one replica
            replicas = []
        if not replicas:  # through the handle: it may wait behind busy replicas, so not for ever
            try:
                one = await asyncio.wait_for(_awaitable(handle.stats.remote()), self.health_timeout_s)
            except Exception as exc:
                return [{"replica": "unknown", "error": type(exc).__name__}]
            return [{"replica": "unknown", **one}]

        async def read(replica: str, actor: Any) -> dict[str, Any]:
            try:
                stats = await asyncio.wait_for(
                    _awaitable(actor.record_routing_stats.remote()), self.health_timeout_s
                )
                return {"replica": replica, **stats}
            except Exception as exc:  # a replica going away while we ask
                return {"replica": replica, "error": type(exc).__name__}

        return list(await asyncio.gather(*(read(replica, actor) for replica, actor in replicas)))

    async def stats(self) -> dict[str, Any]:
        llm, vision = await asyncio.gather(self._replica_stats(self.llm), self._replica_stats(self.vision))
        out: dict[str, Any] = {"llm": llm, "vision": vision}
        router = router_report(self.llm)
        if router is not None:
            out["router"] = router
        return out


def unavailable_error(exc: Exception) -> APIError:
    """Serve's backpressure / unavailable errors as an OpenAI error with status 503 and ``Retry-After``."""
    retry_after = getattr(exc, "retry_after_s", None) or 1.0
    if isinstance(exc, BackPressureError):
        message = "the service is at capacity (too many queued requests); retry later"
    else:
        message = "the service is not available right now; retry later"
    return APIError(
        message, status_code=503, code="overloaded", headers={"Retry-After": str(max(1, round(retry_after)))}
    )


def cancel_quietly(response: Any) -> None:
    """Cancel a handle call whatever state it is in.

    Ray 2.60's ``DeploymentResponseGenerator.cancel()`` fetches the routing result when the router
    runs in its own loop, so on a call that failed (backpressure, a dead replica) it raises that
    failure again: from a ``finally`` clause it would replace the error being reported.
    """
    with contextlib.suppress(Exception):  # the call already failed or finished: nothing left to cancel
        response.cancel()


def log_auth_state(api_keys: Collection[Any], auth: Any) -> None:
    """Say at start whether API keys are checked: a missing or misnamed key source with ``auth.required``
    off opens every route, which deserves a warning, not silence."""
    if api_keys:
        logger.info("API-key authentication is on (%d keys)", len(api_keys))
        return
    logger.warning(
        "API-key authentication is OFF: every route is open (no key found in env %r or file %r; set "
        "auth.required: true to refuse to start without keys)",
        auth.api_keys_env,
        auth.api_keys_file,
    )


class EngineUnavailable(Exception):
    """An LLM replica answered that its engine has stopped (its health check will fail and Serve replace
    it): a replica failure, retried on another replica like a dead actor."""


def is_replica_failure(exc: BaseException) -> bool:
    """True when ``exc`` says a replica (or an actor it depended on) died or became unreachable, or that
    its engine has stopped (:class:`EngineUnavailable`).

    Looks along the chain of causes: Ray's ``RayTaskError`` carries one in ``cause``, and Serve's router
    wraps the death of an *upstream* actor (the vision replica whose result the LLM call takes as an
    argument) in a ``RayServeException`` whose ``__cause__`` is the ``ActorDiedError``.
    """
    from ray.exceptions import RayActorError

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        if isinstance(current, RayActorError | EngineUnavailable):
            return True
        seen.add(id(current))
        cause = getattr(current, "cause", None)
        current = cause if isinstance(cause, BaseException) else current.__cause__
    return False


def replica_failure_error(exc: BaseException) -> APIError:
    """A replica died under a request that already streamed output: 503, retry the request."""
    return APIError(
        "the model replica serving this request failed; retry the request "
        f"({type(getattr(exc, 'cause', None) or exc).__name__})",
        status_code=503,
        code="replica_failed",
        headers={"Retry-After": "1"},
    )


async def _awaitable(response):
    return await response


def _end_generate(
    span: Any,
    request_id: str,
    prompt: PreparedPrompt,
    last: RequestOutput | None,
    error: BaseException | str | None,
) -> None:
    """The log line and the end of the ``zipvl.ingress.generate`` span of one request."""
    finished = last is not None and last.finished
    if finished and last.finish_reason == "error":
        error = last.error or "engine error"
    elif finished:
        error = None  # a consumer closing the stream after the end is no error
    elif error is None:
        error = "the client went away"
    if telemetry.recording(span) and last is not None:
        span.set_attribute("zipvl.finish_reason", last.finish_reason or "unfinished")
        if finished:
            span.set_attribute("zipvl.output_tokens", len(last.token_ids))
    logger.info(
        "chat completion %s: %d prompt tokens (%d image tokens, %d images), %s",
        request_id,
        prompt.num_tokens,
        prompt.num_image_tokens,
        len(prompt.images),
        f"finished ({last.finish_reason}, {len(last.token_ids)} tokens)"
        if finished
        else f"ended early ({type(error).__name__ if isinstance(error, BaseException) else error})",
    )
    telemetry.end_span(span, error=error)


def find_request_router(handle: DeploymentHandle) -> Any | None:
    """The request router instance behind ``handle`` in this process, or None (not created yet).

    Ray 2.60 keeps it at ``handle._router._asyncio_router._request_router`` (private, read defensively;
    the ``request_router`` property is avoided because it creates the router as a side effect).
    """
    router = getattr(handle, "_router", None)
    asyncio_router = getattr(router, "_asyncio_router", router)
    return getattr(asyncio_router, "_request_router", None)


def router_report(handle: DeploymentHandle) -> dict[str, Any] | None:
    """This process's request router of ``handle`` as JSON: counters, holds and held bytes per replica.

    None when the router does not exist yet or reports nothing (Serve's default router).
    """
    report = getattr(find_request_router(handle), "telemetry", None)
    if report is None:
        return None
    try:
        data = report()
    except Exception:  # stats must never fail because of the router
        logger.exception("reading the request router's report failed")
        return None
    counters = dict(data.get("counters", {}))
    counters["chosen_rank"] = {str(k): v for k, v in counters.get("chosen_rank", {}).items()}
    return {
        "counters": counters,
        "num_holds": data.get("num_holds", 0),
        "held_bytes": {str(k): v for k, v in data.get("held_bytes", {}).items()},
    }


def instrument_preparation(preparer: Any, processor: PromptProcessor) -> None:
    """Spans of the ingress's CPU work, on the instances (call only when tracing is on).

    ``zipvl.ingress.preprocess`` (the whole preparation) with children ``zipvl.ingress.image_decode``
    (fetch, check and decode every image), ``zipvl.ingress.image_preprocess`` (per image: resize,
    normalise), ``zipvl.ingress.chat_template`` and ``zipvl.ingress.tokenize`` (placeholder expansion
    and tokenization).
    """
    telemetry.instrument_method(
        preparer,
        "prepare",
        "zipvl.ingress.preprocess",
        attributes=lambda chat: {
            telemetry.ATTR_REQUEST_ID: telemetry.current_request_id() or "",
            telemetry.ATTR_COMPLETION_ID: chat.request_id,
            "zipvl.prompt_tokens": chat.prompt.num_tokens,
            "zipvl.image_tokens": chat.prompt.num_image_tokens,
            "zipvl.images": len(chat.prompt.images),
            "zipvl.max_tokens": chat.sampling.max_tokens,
        },
    )
    telemetry.instrument_method(
        preparer,
        "load_images",
        "zipvl.ingress.image_decode",
        attributes=lambda images: {"zipvl.images": len(images)},
    )
    telemetry.instrument_method(
        processor,
        "preprocess_image",
        "zipvl.ingress.image_preprocess",
        attributes=lambda image: {"zipvl.image_tokens": image.num_tokens},
    )
    telemetry.instrument_method(
        processor,
        "render",
        "zipvl.ingress.chat_template",
        attributes=lambda text: {"zipvl.prompt_chars": len(text)},
    )
    telemetry.instrument_method(
        processor,
        "expand",
        "zipvl.ingress.tokenize",
        attributes=lambda ids: {"zipvl.prompt_tokens": len(ids)},
    )


def fastapi_telemetry_options(behind_serve_proxy: bool) -> dict[str, Any] | None:
    """FastAPI's ``telemetry=`` option for the ingress app (FastAPI >= 0.16x traces natively).

    FastAPI parents its server span on the request's ``traceparent`` header, not on the current
    context: behind Serve that starts a second trace per request (or hangs the ingress's spans under
    the client's span beside Serve's). Serve's replica span is the request's span there, so FastAPI's
    own spans are switched off; an in-process app keeps them (FastAPI's server span is the root).
    """
    return {"tracing": False} if behind_serve_proxy else None


def build_ingress_app(
    backend: Any,
    processor: PromptProcessor,
    settings: ServingSettings,
    *,
    behind_serve_proxy: bool = True,
    metrics: telemetry.MetricsSink | None = None,
    api_keys: Collection[str] | None = None,
):
    """The ingress's ASGI app: :func:`build_openai_app` plus request ids, metrics and spans.

    Parameters
    ----------
    backend : InferenceBackend
    processor : PromptProcessor
    settings : ServingSettings
    behind_serve_proxy : bool
        Serve's proxy starts the trace and returns ``x-request-id``; False for an in-process app, where
        the middleware sets the header and FastAPI's own server span starts the trace.
    metrics : MetricsSink, optional
        Where ``zipvl_http_requests_total`` and ``zipvl_e2e_request_latency_seconds`` go.
    api_keys : collection of str, optional
        Accepted API keys; default: those ``settings.auth`` names, read from this process.
    """
    observer = None
    if metrics is not None:

        def observer(path: str, status: int, seconds: float) -> None:
            telemetry.record_http_request(metrics, path, status, seconds)

    app = build_openai_app(
        backend,
        processor,
        settings,
        telemetry=fastapi_telemetry_options(behind_serve_proxy),
        api_keys=api_keys,
        request_id_header=not behind_serve_proxy,
        request_observer=observer,
        watch_disconnect=not behind_serve_proxy,
    )
    if telemetry.tracing_active():
        instrument_preparation(app.state.preparer, processor)
    return app


@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class OpenAIIngress:
    """Serve ingress deployment: builds the FastAPI app of :mod:`zipvl_ray.api.server` on its replica.

    Parameters
    ----------
    vision, llm : DeploymentHandle
        The vision and LLM deployments (bound by the app builder).
    settings : ServingSettings
    processor_source : str
        Model whose processor prepares prompts (the served model).
    processor_loader : callable, optional
        ``name -> processor``; :func:`load_processor` by default.
    """

    def __init__(
        self,
        vision: DeploymentHandle,
        llm: DeploymentHandle,
        settings: ServingSettings,
        processor_source: str,
        processor_loader: Callable[[str], Any] | None = None,
    ):
        self.settings = settings
        # Read the API keys first: a required but missing key source fails the deploy (fail closed).
        self.api_keys = settings.auth.load_keys()
        log_auth_state(self.api_keys, settings.auth)
        self.processor = PromptProcessor((processor_loader or load_processor)(processor_source))
        self.backend = RayServeBackend(vision, llm, health_timeout_s=settings.health_timeout_s)
        self._metrics = telemetry.setup_replica("ingress")
        self._router_task: asyncio.Task | None = None
        if self._metrics is not None:
            with contextlib.suppress(RuntimeError):  # no running loop outside a replica
                self._router_task = asyncio.get_running_loop().create_task(self._export_router_counters())

    async def _export_router_counters(self) -> None:
        """Export the LLM handle's KV-packing router counters (once the router exists, if it is one)."""
        exporter = telemetry.RouterCountersExporter(self._metrics)
        interval = telemetry.metrics_interval_s()
        while True:
            await asyncio.sleep(interval)
            router = find_request_router(self.backend.llm)
            report = getattr(router, "telemetry", None)
            if report is None:
                continue
            try:
                exporter.update(report())
            except Exception:  # metrics must never break serving
                logger.exception("exporting router counters failed")

    def __serve_build_asgi_app__(self):
        return build_ingress_app(
            self.backend, self.processor, self.settings, metrics=self._metrics, api_keys=self.api_keys
        )

    def __del__(self):
        task = getattr(self, "_router_task", None)
        if task is not None:
            task.cancel()
