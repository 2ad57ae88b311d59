"""An in-process :class:`~zipvl_ray.api.server.InferenceBackend`: one engine and one vision encoder, no Ray.

Serves the same HTTP API as the Ray Serve application from a single process (``uvicorn`` on
``build_openai_app(LocalBackend(engine, encoder), processor, settings)``), which is handy for debugging and
is what the Ray-free API tests run against (with fake engines).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from zipvl_ray.api.errors import APIError
from zipvl_ray.engine import EncodedPrompt
from zipvl_ray.engine.types import (
    EngineDeadError,
    RequestError,
    RequestOutput,
    SamplingParams,
    needs_more_than_the_pool,
    pool_overflow_message,
)
from zipvl_ray.multimodal import PreparedPrompt
from zipvl_ray.routing.footprint import RoutingHints

#: The error code of a request refused because the engine has stopped (HTTP 503; the Ray ingress retries it).
ENGINE_UNAVAILABLE = "engine_unavailable"


def make_encoded_prompt(token_ids: list[int], image_features: list[Any]) -> EncodedPrompt:
    """The engine's prompt form for a split deployment: token ids + precomputed image features."""
    return EncodedPrompt(token_ids=list(token_ids), image_features=list(image_features))


async def stream_with_abort(
    engine: Any, request_id: str, prompt: Any, sampling: SamplingParams, zipvl: dict | None
):
    """Iterate ``engine.generate(...)``; if the consumer stops early (disconnect, cancel), abort the request.

    The abort runs when the generator is closed or cancelled before the final output, so the
    request's KV blocks are freed whatever way the client left. An engine whose stream aborts on its
    own when closed (``aborts_on_close``, as :class:`~zipvl_ray.engine.AsyncLLMEngine`) is only closed:
    a second abort would wait behind a step for nothing.
    """
    outputs = engine.generate(request_id, prompt, sampling, zipvl)
    finished = refused = False
    try:
        async for output in outputs:
            finished = output.finished
            yield output
            if finished:
                return
    except (RequestError, EngineDeadError):
        refused = True  # never queued (a bad request, an id in use, no engine): nothing of ours to abort
        raise
    finally:
        if not finished and not refused and not getattr(engine, "aborts_on_close", False):
            await asyncio.shield(engine.abort(request_id))
        await asyncio.shield(outputs.aclose())


class LocalBackend:
    """Vision encoding and generation in this process.

    Parameters
    ----------
    engine : AsyncLLMEngine-like
        ``generate(request_id, prompt, sampling, zipvl)``, ``abort(request_id)``, ``stats()``.
    encoder : VisionEncoder-like, optional
        ``encode(images) -> features`` and ``cache_stats()``; needed only for requests with images.
    """

    def __init__(self, engine: Any, encoder: Any | None = None):
        self.engine = engine
        self.encoder = encoder

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
        features: list[Any] = []
        if prompt.images:
            if self.encoder is None:
                raise APIError(
                    "this server has no vision encoder: send text only",
                    param="messages",
                    code="images_not_supported",
                )
            features = await asyncio.to_thread(self.encoder.encode, prompt.images)
        encoded = make_encoded_prompt(prompt.token_ids, features)
        try:
            # ``aclosing``: closing this generator closes the engine's stream (and aborts) before returning.
            async with contextlib.aclosing(
                stream_with_abort(self.engine, request_id, encoded, sampling, zipvl)
            ) as outputs:
                async for output in outputs:
                    if needs_more_than_the_pool(output):  # the client's request is too large: 400, as on Ray
                        raise APIError(
                            pool_overflow_message(self.engine.stats().kv_bytes_capacity),
                            code="kv_capacity_exceeded",
                        )
                    yield output
        except EngineDeadError as exc:  # shut down, or its thread failed: not the client's fault
            raise APIError(
                str(exc), status_code=503, code=ENGINE_UNAVAILABLE, headers={"Retry-After": "1"}
            ) from None

    async def health(self) -> dict[str, str | None]:
        """The engine's and the encoder's own health checks (``check_health``, when they have one)."""
        stages: dict[str, str | None] = {"llm": _health_of(self.engine)}
        if self.encoder is not None:
            stages["vision"] = _health_of(self.encoder)
        return stages

    async def stats(self) -> dict[str, Any]:
        vision = [self.encoder.cache_stats()] if self.encoder is not None else []
        return {"llm": [self.engine.stats().to_dict()], "vision": vision}


def _health_of(component: Any) -> str | None:
    """None when ``component.check_health()`` passes (or it has none), else why it failed."""
    check = getattr(component, "check_health", None)
    if check is None:
        return None
    try:
        check()
    except Exception as exc:  # noqa: BLE001 - any failure is the stage's reason
        return f"{type(exc).__name__}: {exc}"[:300]
    return None
