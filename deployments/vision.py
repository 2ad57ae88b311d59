"""The vision stage: preprocessed images -> image features (CPU tensors), batched across requests.

The encoder class is injected (``zipvl_ray.vision.VisionEncoder`` by default, a fake in tests). It
loads only the vision tower + projector and keeps an LRU cache keyed by image content hash.
A :class:`~deployments.batching.BusyBatcher` gathers the images of concurrent requests into one
forward (the cache misses of the batch are encoded together): an idle encoder starts on a request at
once, and the requests that arrive while a forward runs form the next batch (Serve's ``@serve.batch``
batches by time window instead, so every lone request waited the whole window; see
``deployments/batching.py``). The forward runs in a worker thread so the replica keeps accepting
requests meanwhile. Features come back on the CPU: with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in
every process (set by the app builder) the LLM replica reads them from the object store without a copy.

Telemetry: each request's ``encode`` call runs in a ``zipvl.vision.encode`` span (under Serve's span of
the handle call) with the encoder-cache hits and misses of the batch it was encoded in; the cache
counters are exported as ``zipvl_encoder_cache_*`` metrics and one log line per request carries the
request id.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from ray import serve

from deployments.batching import BusyBatcher
from zipvl_ray import telemetry
from zipvl_ray.multimodal import ImageInput

logger = logging.getLogger(__name__)

VISION_DEPLOYMENT = "VisionEncoder"


@dataclass(frozen=True)
class BatchReport:
    """What one vision forward did, as reported to each request of the batch.

    Attributes
    ----------
    requests, images : int
        Requests and images in the batch.
    cache_hits, cache_misses : int
        Encoder-cache hits and misses of the batch's images.
    encode_s : float
        Seconds the encoder took (cache lookups and the forward).
    """

    requests: int
    images: int
    cache_hits: int
    cache_misses: int
    encode_s: float


VISION_AUTOSCALING_METRIC_NAMES = ("pending_images", "pending_requests")
"""Keys of :meth:`VisionEncoderServer.record_autoscaling_stats`: images and requests this replica has
accepted and not answered yet (queued for a batch or in the running forward). ``QueueLengthPolicy``'s
``metric`` for the vision stage must be one of them (checked when the app is built)."""


@serve.deployment(name=VISION_DEPLOYMENT)
class VisionEncoderServer:
    """Serve deployment wrapping one vision encoder.

    Parameters
    ----------
    encoder_cls : type
        Has ``from_pretrained(model, *, dtype, device, cache_size)`` returning an object with
        ``encode(images) -> features`` and ``cache_stats()`` (the ``VisionEncoder`` contract).
    model : str
        Built-in name, local path or hub id.
    dtype, device : str, optional
    cache_size : int
        Entries of the encoder's LRU cache.
    cache_max_bytes : int, optional
        Bytes of features the cache may hold (None: entries only).
    max_batch_size : int
        Most requests gathered into one forward.
    batch_wait_timeout_s : float
        How long a batch that is not full waits for more requests before its forward starts (0: an idle
        encoder starts at once; the requests that arrive during a forward join the next one anyway).
    unhealthy_after_failed_batches : int
        Serve's health check fails once this many encoder forwards in a row have raised (a persistent
        device fault); a successful forward resets the count.
    """

    def __init__(
        self,
        encoder_cls: type,
        model: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        cache_size: int = 256,
        cache_max_bytes: int | None = None,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.0,
        unhealthy_after_failed_batches: int = 3,
    ):
        self.unhealthy_after_failed_batches = unhealthy_after_failed_batches
        self.consecutive_failed_batches = 0
        self.last_batch_error: str | None = None
        extra = {"cache_max_bytes": cache_max_bytes} if cache_max_bytes is not None else {}
        self.encoder = encoder_cls.from_pretrained(
            model, dtype=dtype, device=device, cache_size=cache_size, **extra
        )
        self._batcher = BusyBatcher(self._encode_batch, max_batch_size, batch_wait_timeout_s)
        self.batches = 0
        self.requests = 0
        self.images = 0
        self.max_batch_requests = 0
        self.pending_images = 0
        self.pending_requests = 0
        sink = telemetry.setup_replica("vision")
        self._cache_exporter = telemetry.EncoderCacheExporter(sink) if sink is not None else None

    async def encode(self, images: list[ImageInput]) -> list[Any]:
        """Features of ``images`` (one request's), in order."""
        if not images:
            return []
        span = telemetry.start_span("zipvl.vision.encode", attributes={"zipvl.images": len(images)})
        self.pending_images += len(images)
        self.pending_requests += 1
        try:
            result = await self._batcher.submit(images)
            if isinstance(result, Exception):  # this request's own images failed, not its batch's
                raise result
        except BaseException as exc:
            telemetry.end_span(span, error=exc)
            raise
        finally:
            self.pending_images -= len(images)
            self.pending_requests -= 1
        features, report = result
        if report is not None:
            logger.info(
                "encoded %d images in a batch of %d requests (%d cache hits, %d misses) in %.1f ms",
                len(images),
                report.requests,
                report.cache_hits,
                report.cache_misses,
                report.encode_s * 1e3,
            )
            if telemetry.recording(span):
                span.set_attributes(
                    {
                        "zipvl.encoder_cache.hits": report.cache_hits,
                        "zipvl.encoder_cache.misses": report.cache_misses,
                        "zipvl.vision.batch_requests": report.requests,
                        "zipvl.vision.batch_images": report.images,
                        "zipvl.vision.encode_s": report.encode_s,
                    }
                )
        if telemetry.recording(span):
            span.set_attribute("zipvl.image_tokens", sum(f.num_tokens for f in features))
        telemetry.end_span(span)
        return features

    def _encode_timed(self, flat: list[ImageInput]) -> tuple[list[Any], int, int, float]:
        """``encoder.encode(flat)`` plus the cache hits and misses it caused and its duration."""
        before = self.encoder.cache_stats()
        started = time.perf_counter()
        features = self.encoder.encode(flat)
        elapsed = time.perf_counter() - started
        after = self.encoder.cache_stats()
        return features, after["hits"] - before["hits"], after["misses"] - before["misses"], elapsed

    async def _encode_batch(
        self, requests: list[list[ImageInput]]
    ) -> list[tuple[list[Any], BatchReport] | Exception]:
        """Each request's features with the report of the batch that encoded them (returned with them, so a
        request cancelled while its batch runs leaves nothing behind), or the exception its own images
        raised.

        When the batch's forward raises and the batch holds several requests, each request is encoded
        again on its own, so one request's bad input (or its out-of-memory) fails that request only. The
        batch counts as failed for the health check unless some request that needed the encoder (a cache
        miss) succeeded: answers served from the cache alone prove nothing about the device. The batching
        counters count the requests and images that were served.
        """
        flat = [image for images in requests for image in images]
        try:
            features, hits, misses, elapsed = await asyncio.to_thread(self._encode_timed, flat)
        except Exception as exc:
            if len(requests) == 1:
                self._record_failure(exc)
                raise
            logger.warning(
                "a vision batch of %d requests failed (%s: %s); encoding them one by one",
                len(requests),
                type(exc).__name__,
                str(exc)[:200],
            )
            outcomes = [await self._encode_alone(images) for images in requests]
            served = [r for r, o in zip(requests, outcomes, strict=True) if not isinstance(o, Exception)]
            device_ok = any(not isinstance(o, Exception) and o[1].cache_misses > 0 for o in outcomes)
            if device_ok:
                self._record_success(served, [image for images in served for image in images])
            else:
                self._record_failure(next(o for o in outcomes if isinstance(o, Exception)))
                if served:  # answered from the cache: served, but no evidence the device works
                    self._count_served(served, [image for images in served for image in images])
            return outcomes
        self._record_success(requests, flat)
        report = BatchReport(len(requests), len(flat), hits, misses, elapsed)
        out, start = [], 0
        for images in requests:
            out.append(([_contiguous_cpu(f) for f in features[start : start + len(images)]], report))
            start += len(images)
        return out

    async def _encode_alone(self, images: list[ImageInput]) -> tuple[list[Any], BatchReport] | Exception:
        """One request's images in a forward of their own: its features and report, or its exception."""
        try:
            features, hits, misses, elapsed = await asyncio.to_thread(self._encode_timed, images)
        except Exception as exc:
            return exc
        return [_contiguous_cpu(f) for f in features], BatchReport(1, len(images), hits, misses, elapsed)

    def _record_failure(self, exc: BaseException) -> None:
        self.consecutive_failed_batches = getattr(self, "consecutive_failed_batches", 0) + 1
        self.last_batch_error = f"{type(exc).__name__}: {exc}"[:200]

    def _record_success(self, requests: list[list[ImageInput]], flat: list[ImageInput]) -> None:
        self.consecutive_failed_batches = 0
        self._count_served(requests, flat)

    def _count_served(self, requests: list[list[ImageInput]], flat: list[ImageInput]) -> None:
        self.batches += 1
        self.requests += len(requests)
        self.images += len(flat)
        self.max_batch_requests = max(self.max_batch_requests, len(requests))
        exporter = getattr(self, "_cache_exporter", None)
        if exporter is not None:
            exporter.update(self.encoder.cache_stats())

    def check_health(self) -> None:
        """Serve's periodic health check: fails while every recent encoder forward has raised."""
        failed = getattr(self, "consecutive_failed_batches", 0)
        if failed >= getattr(self, "unhealthy_after_failed_batches", 3):
            raise RuntimeError(f"the last {failed} encoder batches failed (last: {self.last_batch_error})")

    def stats(self) -> dict[str, Any]:
        """Encoder cache (hits, misses, size, capacity, hit_rate) and batching counters of this replica."""
        return {
            **self.encoder.cache_stats(),
            "batches": self.batches,
            "requests": self.requests,
            "images": self.images,
            "max_batch_requests": self.max_batch_requests,
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """The same as :meth:`stats`; lets ``GET /v1/stats`` read every replica (see the ingress)."""
        return self.stats()

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The vision stage's load for a custom ``QueueLengthPolicy(metric=...)``
        (:data:`VISION_AUTOSCALING_METRIC_NAMES`), floats only."""
        return {
            "pending_images": float(getattr(self, "pending_images", 0)),
            "pending_requests": float(getattr(self, "pending_requests", 0)),
        }

    async def ready(self) -> bool:
        """Answers once the encoder is loaded (the constructor returned)."""
        return True


def _contiguous_cpu(feature: Any) -> Any:
    """The feature with CPU, contiguous embeddings (a copy only when needed; cache entries are not touched)."""
    embeds = feature.embeds
    if embeds.device.type == "cpu" and embeds.is_contiguous():
        return feature
    return dataclasses.replace(feature, embeds=embeds.detach().to("cpu").contiguous())
