"""The LLM stage: one engine per replica, streaming outputs, abort on disconnect, stats for routing.

The engine class is injected (``AsyncLLMEngine`` by default, a fake in tests); it is built with
``load_vision=False`` because image features arrive precomputed from the vision stage. The ingress
calls ``handle.options(stream=True).generate.remote(request, features, routing_hints=...)``: the
features argument is the vision stage's ``DeploymentResponse``, which Serve resolves here, so the
tensors never pass through the ingress; ``routing_hints`` is a plain dict for the request router.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ray import serve

from zipvl_ray.api.local import make_encoded_prompt, stream_with_abort
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.types import RequestError, RequestMetrics, RequestOutput, SamplingParams
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
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    zipvl: dict[str, Any] | None = None
    stream: bool = True


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

    Cumulative ``token_ids`` / ``text`` in every update would make a stream of n tokens cost O(n^2).
    """
    if output.finished:
        return output
    return dataclasses.replace(output, token_ids=[], text="", metrics=RequestMetrics())


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
        try:
            async for output in stream_with_abort(
                self.engine, request.request_id, prompt, request.sampling, request.zipvl
            ):
                if request.stream or output.finished:
                    yield slim_output(output)
        except RequestError as exc:
            yield StreamError(status_code=400, message=str(exc))

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
        return routing_stats(self.engine.stats())

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Numeric KV and queue metrics for the autoscaling policy."""
        return autoscaling_stats(self.engine.stats())

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
