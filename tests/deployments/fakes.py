"""Fake engine and vision encoder with the real classes' interfaces, for serving tests on 2 CPU cores.

Their answers are deterministic functions of what reached them, so the tests can check the data path
end to end: the answer echoes the tail of the prompt text (each request gets its own), a digest of
the image features (so a cached encoding must give the same answer), the effective ``tau`` and, when
sampling, characters drawn from the request's seed. They hold "KV bytes" while a request runs, free
them on finish or abort, and report them in ``stats()`` like the real engine.

The token delay (seconds per generated token) comes from ``ZIPVL_FAKE_TOKEN_DELAY_S`` so Ray tests
can slow streams down enough to disconnect in the middle.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
from typing import Any

import torch

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.types import EngineStats, RequestError, RequestMetrics, RequestOutput, SamplingParams
from zipvl_ray.models.tokenizer import byte_tokenizer
from zipvl_ray.vision import ImageFeatures

TOKEN_DELAY_ENV = "ZIPVL_FAKE_TOKEN_DELAY_S"
#: Hidden size of the fake features.
FAKE_HIDDEN = 8
NUM_LAYERS = 4
#: Bytes one token costs in one layer (K + V).
BYTES_PER_TOKEN_LAYER = 256
#: Kept fraction of the fake ZipVL per layer (before tau and max_keep_ratio caps).
LAYER_KEEP = [0.4, 0.5, 0.6, 0.7]
CAPACITY_BYTES = 64 * 1024 * 1024


def features_digest(features: list[Any]) -> str:
    """A short digest of image features (what the fake's answer shows of the images)."""
    digest = hashlib.blake2b(digest_size=4)
    for feature in features:
        digest.update(f"{feature.num_tokens}:{float(feature.embeds.double().sum()):.6f};".encode())
    return digest.hexdigest()


class FakeVisionEncoder:
    """``VisionEncoder``'s interface: features derived from the pixels, an LRU-less cache with counters."""

    def __init__(self, cache_size: int = 256):
        self.capacity = cache_size
        self._cache: dict[str, ImageFeatures] = {}
        self.hits = 0
        self.misses = 0
        self.batch_sizes: list[int] = []

    @classmethod
    def from_pretrained(cls, model: str, *, dtype=None, device=None, cache_size: int = 256, **_: Any):
        return cls(cache_size=cache_size)

    def encode(self, images: list[Any]) -> list[ImageFeatures]:
        self.batch_sizes.append(len(images))
        out = []
        for image in images:
            cached = self._cache.get(image.content_hash)
            if cached is not None:
                self.hits += 1
                out.append(cached)
                continue
            self.misses += 1
            value = float(image.pixel_values.double().mean())
            feature = ImageFeatures(
                embeds=torch.full((image.num_tokens, FAKE_HIDDEN), value),
                num_tokens=image.num_tokens,
                content_hash=image.content_hash,
                grid_thw=image.grid_thw,
            )
            if self.capacity > 0:
                self._cache[image.content_hash] = feature
            out.append(feature)
        return out

    def cache_stats(self) -> dict:
        total = self.hits + self.misses
        return {
            "hits": self.hits,
            "misses": self.misses,
            "size": len(self._cache),
            "capacity": self.capacity,
            "hit_rate": self.hits / total if total else 0.0,
        }


class FakeEngine:
    """``AsyncLLMEngine``'s interface with a deterministic answer and KV accounting.

    Parameters
    ----------
    zipvl : ZipVLConfig, optional
    engine : EngineConfig, optional
        Only ``max_model_len`` is used.
    token_delay_s : float, optional
        Seconds per generated token (default from ``ZIPVL_FAKE_TOKEN_DELAY_S``, else 0).
    """

    def __init__(
        self,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
        token_delay_s: float | None = None,
    ):
        self.zipvl = zipvl or ZipVLConfig()
        self.config = engine or EngineConfig()
        self.token_delay_s = (
            float(os.environ.get(TOKEN_DELAY_ENV, "0")) if token_delay_s is None else token_delay_s
        )
        self.tokenizer = byte_tokenizer(["<image>"])
        self.image_token_id = self.tokenizer.convert_tokens_to_ids("<image>")
        self._held: dict[str, int] = {}
        self.aborted: list[str] = []
        self.finished = 0
        self.received: list[dict[str, Any]] = []

    @classmethod
    def from_pretrained(
        cls, model: str, *, dtype=None, device=None, zipvl=None, engine=None, load_vision: bool = False
    ) -> FakeEngine:
        return cls(zipvl=zipvl, engine=engine)

    def answer(
        self, token_ids: list[int], features: list[Any], sampling: SamplingParams, config: ZipVLConfig
    ) -> str:
        """The full answer the fake gives (before max_tokens and stop strings)."""
        text = self.tokenizer.decode(
            [t for t in token_ids if t != self.image_token_id], skip_special_tokens=True
        )
        tau = config.tau if config.enabled else 1.0
        answer = f"echo:{text[-28:]}|img:{features_digest(features) if features else '-'}|tau:{tau:g}"
        if not sampling.greedy:
            rng = random.Random(sampling.seed)
            answer += "|" + "".join(rng.choice("abcdefghij") for _ in range(8))
        return answer

    def kept_tokens(self, n: int, config: ZipVLConfig) -> list[int]:
        if not config.enabled or config.tau >= 1.0:
            return [n] * NUM_LAYERS
        cap = 1.0 if config.max_keep_ratio is None else config.max_keep_ratio
        return [max(1, min(n, math.ceil(n * min(f, cap, config.tau)))) for f in LAYER_KEEP]

    async def generate(
        self, request_id: str, prompt: Any, sampling: SamplingParams | None = None, zipvl: dict | None = None
    ):
        sampling = sampling or SamplingParams()
        token_ids = list(prompt.token_ids)
        features = list(getattr(prompt, "image_features", []) or [])
        if request_id in self._held:
            raise RequestError(f"request id {request_id!r} is already in use")
        if len(token_ids) + sampling.max_tokens > self.config.max_model_len:
            raise RequestError(
                f"the prompt has {len(token_ids)} tokens and max_tokens is {sampling.max_tokens}: together more "
                f"than max_model_len ({self.config.max_model_len})"
            )
        placeholders = sum(1 for t in token_ids if t == self.image_token_id)
        if placeholders != sum(f.num_tokens for f in features):
            raise RequestError("image placeholders and image features disagree")
        config = self.zipvl.with_overrides(**(zipvl or {}))
        self.received.append({"request_id": request_id, "prompt_tokens": len(token_ids), "zipvl": zipvl})
        full = self.answer(token_ids, features, sampling, config)
        if sampling.ignore_eos:  # no end of answer: it goes on (repeated) until max_tokens, as a model would
            once = full
            while len(full.encode()) < sampling.max_tokens:
                full += " " + once
        kept = self.kept_tokens(len(token_ids), config)
        metrics = RequestMetrics(
            prompt_tokens=len(token_ids), image_tokens=placeholders, kept_tokens_per_layer=kept
        )
        self._held[request_id] = sum(kept) * BYTES_PER_TOKEN_LAYER
        stops = [full.find(s) for s in sampling.stop if s in full]
        if stops:
            full = full[: min(stops)]
        answer = full.encode()
        budget = answer[: sampling.max_tokens]
        reason = "length" if len(answer) > sampling.max_tokens else "stop"
        generated: list[int] = []
        finished = False
        try:
            for i in range(max(1, len(budget))):
                await asyncio.sleep(self.token_delay_s)
                if request_id not in self._held:  # aborted meanwhile
                    return
                delta = list(budget[i : i + 1])
                generated += delta
                self._held[request_id] += len(delta) * NUM_LAYERS * BYTES_PER_TOKEN_LAYER
                last = i >= len(budget) - 1
                if last:
                    self.finished += 1
                    metrics.kv_bytes = self._held[request_id]
                    metrics.kv_bytes_dense = (
                        (len(token_ids) + len(generated)) * NUM_LAYERS * BYTES_PER_TOKEN_LAYER
                    )
                    finished = True
                yield RequestOutput(
                    request_id=request_id,
                    token_ids=list(generated),
                    text=bytes(generated).decode("latin-1"),
                    delta_token_ids=delta,
                    delta_text=bytes(delta).decode("latin-1"),
                    finished=last,
                    finish_reason=reason if last else None,
                    metrics=metrics,
                )
                if last:
                    return
        finally:
            if not finished and request_id in self._held:
                await self.abort(request_id)
            self._held.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        if self._held.pop(request_id, None) is not None:
            self.aborted.append(request_id)

    def stats(self) -> EngineStats:
        used = sum(self._held.values())
        return EngineStats(
            kv_bytes_used=used,
            kv_bytes_capacity=CAPACITY_BYTES,
            block_size=16,
            block_bytes=16 * BYTES_PER_TOKEN_LAYER,
            num_layers=NUM_LAYERS,
            num_running=len(self._held),
            num_finished=self.finished,
            num_aborted=len(self.aborted),
            mean_kept_fraction=sum(LAYER_KEEP) / NUM_LAYERS,
            kept_fraction_per_layer=list(LAYER_KEEP),
        )

    def shutdown(self) -> None:
        self._held.clear()
