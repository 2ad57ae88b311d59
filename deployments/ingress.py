"""The ingress: the OpenAI-compatible HTTP API (FastAPI via ``@serve.ingress``) in front of the two stages.

It does CPU work only (images, chat template, placeholders, tokens: :class:`zipvl_ray.api.server.ChatPreparer`)
and forwards with Serve handles: pixels to the vision stage, then token ids + the vision stage's
*response* (not its result) to the LLM stage, so image features go from the vision replica to the
LLM replica without passing through here. Closing a stream (the client went away) cancels the LLM
call, which aborts the request and frees its KV.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import ray
from ray import serve
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from deployments.llm import GenerateRequest, StreamError
from zipvl_ray.api.errors import APIError
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


def load_processor(model: str):
    """The served model's processor, without loading its weights when that can be avoided.

    Built-in models are built whole (they are tiny); checkpoints and hub ids load only the processor.
    """
    from zipvl_ray import models

    if hasattr(models, "load_processor"):
        return models.load_processor(model)
    if model in models.BUILTIN_MODELS or model in models.builtin_model_names():
        return models.load_model(model)[1]
    from transformers import AutoProcessor

    local = models.CHECKPOINT_DIR / model
    processor = AutoProcessor.from_pretrained(str(local) if (local / "config.json").exists() else model)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


class RayServeBackend:
    """:class:`~zipvl_ray.api.server.InferenceBackend` over the vision and LLM deployments' handles."""

    def __init__(self, vision: DeploymentHandle, llm: DeploymentHandle, *, health_timeout_s: float = 5.0):
        self.vision = vision
        self.llm = llm
        self.health_timeout_s = health_timeout_s
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
        # Chained: the LLM replica receives the vision stage's result directly.
        features = self.vision.encode.remote(prompt.images) if prompt.images else None
        request = GenerateRequest(
            request_id=request_id,
            token_ids=list(prompt.token_ids),
            sampling=sampling,
            zipvl=zipvl,
            stream=stream,
        )
        outputs = self.llm.options(stream=True).generate.remote(
            request, features, routing_hints=hints.to_dict()
        )
        finished = False
        try:
            async for item in outputs:
                if isinstance(item, StreamError):
                    finished = True
                    raise APIError(item.message, status_code=item.status_code, code=item.code)
                finished = item.finished
                yield item
                if finished:
                    return
        except (BackPressureError, DeploymentUnavailableError) as exc:
            raise unavailable_error(exc) from None
        finally:
            if not finished:
                outputs.cancel()

    async def _ping(self, handle: DeploymentHandle) -> str | None:
        try:
            await asyncio.wait_for(_awaitable(handle.ready.remote()), timeout=self.health_timeout_s)
        except TimeoutError:
            return f"no answer within {self.health_timeout_s} s"
        except Exception as exc:  # a dead or failing stage: report, do not raise
            return f"{type(exc).__name__}"
        return None

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
        if not replicas:
            one = await _awaitable(handle.stats.remote())
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
        return {"llm": llm, "vision": vision}


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


async def _awaitable(response):
    return await response


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
        self.processor = PromptProcessor((processor_loader or load_processor)(processor_source))
        self.backend = RayServeBackend(vision, llm, health_timeout_s=settings.health_timeout_s)

    def __serve_build_asgi_app__(self):
        return build_openai_app(self.backend, self.processor, self.settings)
