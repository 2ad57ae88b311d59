"""The vision stage: preprocessed images -> image features (CPU tensors), batched across requests.

The encoder class is injected (``zipvl_ray.vision.VisionEncoder`` by default, a fake in tests). It
loads only the vision tower + projector and keeps an LRU cache keyed by image content hash.
``@serve.batch`` gathers the images of concurrent requests into one forward (the cache misses of
the batch are encoded together); the forward runs in a worker thread so the replica keeps accepting
requests meanwhile. Features come back on the CPU: with ``RAY_ENABLE_ZERO_COPY_TORCH_TENSORS=1`` in
every process (set by the app builder) the LLM replica reads them from the object store without a copy.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from ray import serve

from zipvl_ray.multimodal import ImageInput

VISION_DEPLOYMENT = "VisionEncoder"


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
    max_batch_size : int
        Most requests gathered into one forward.
    batch_wait_timeout_s : float
        How long the first request of a batch waits for others.
    """

    def __init__(
        self,
        encoder_cls: type,
        model: str,
        *,
        dtype: str | None = None,
        device: str | None = None,
        cache_size: int = 256,
        max_batch_size: int = 8,
        batch_wait_timeout_s: float = 0.005,
    ):
        self.encoder = encoder_cls.from_pretrained(model, dtype=dtype, device=device, cache_size=cache_size)
        self._encode_batch.set_max_batch_size(max_batch_size)
        self._encode_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)
        self.batches = 0
        self.requests = 0
        self.images = 0
        self.max_batch_requests = 0

    async def encode(self, images: list[ImageInput]) -> list[Any]:
        """Features of ``images`` (one request's), in order."""
        if not images:
            return []
        return await self._encode_batch(images)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _encode_batch(self, requests: list[list[ImageInput]]) -> list[list[Any]]:
        flat = [image for images in requests for image in images]
        features = await asyncio.to_thread(self.encoder.encode, flat)
        self.batches += 1
        self.requests += len(requests)
        self.images += len(flat)
        self.max_batch_requests = max(self.max_batch_requests, len(requests))
        out, start = [], 0
        for images in requests:
            out.append([_contiguous_cpu(f) for f in features[start : start + len(images)]])
            start += len(images)
        return out

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

    async def ready(self) -> bool:
        """Answers once the encoder is loaded (the constructor returned)."""
        return True


def _contiguous_cpu(feature: Any) -> Any:
    """The feature with CPU, contiguous embeddings (a copy only when needed; cache entries are not touched)."""
    embeds = feature.embeds
    if embeds.device.type == "cpu" and embeds.is_contiguous():
        return feature
    return dataclasses.replace(feature, embeds=embeds.detach().to("cpu").contiguous())
