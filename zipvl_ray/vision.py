"""The vision stage: image pixels -> features for the language model, with an LRU encoder cache.

It runs the model's vision tower + projector only, so it can live in its own Ray Serve deployment
while the LLM stage runs without a vision tower. Features are keyed by the image's content hash, so a
repeated image (the same frame in many requests, a re-sent chat history) is encoded once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from zipvl_ray.models.adapters import VLMAdapter
from zipvl_ray.multimodal import ImageInput


@dataclass
class ImageFeatures:
    """One image as the language model sees it.

    Attributes
    ----------
    embeds : torch.Tensor
        ``(num_tokens, hidden_size)`` of the language model, CPU by default.
    num_tokens : int
    content_hash : str
        The encoder-cache key (:func:`zipvl_ray.multimodal.image_content_hash`).
    grid_thw : tuple[int, int, int] or None
        Qwen2(.5)-VL's (temporal, height, width) patch grid, needed for M-RoPE positions.
    """

    embeds: torch.Tensor
    num_tokens: int
    content_hash: str
    grid_thw: tuple[int, int, int] | None = None


def _nbytes(features: ImageFeatures) -> int:
    return features.embeds.numel() * features.embeds.element_size()


def cache_key(image: ImageInput) -> str:
    """The encoder-cache key of an image: its content hash, the digest of the ingress processor's settings
    and the token layout it gave the image (token count, Qwen's patch grid). The picture alone is not
    enough: ingress replicas with other processor settings (a rolling update, another ``min_pixels`` or
    ``image_mean``) prepare the same picture into other pixels or another number of tokens, and a cached
    feature of the old preprocessing would be wrong for the new request."""
    grid = "x".join(map(str, image.grid_thw)) if image.grid_thw is not None else "-"
    return f"{image.content_hash}:{image.preprocessing}:{image.num_tokens}:{grid}"


def _owned(embeds: torch.Tensor) -> torch.Tensor:
    """``embeds`` as a tensor that owns exactly its own bytes.

    A vision tower returns one tensor per batch and the adapter splits it into views; ``.to(device)``
    is a no-op when the device already matches. A view kept in the cache would keep the whole batch's
    storage alive (the byte bound would count a fraction of what is held), and a pickled view ships
    the whole storage (every other request's features of the batch) to the LLM replica.
    """
    if (
        embeds.untyped_storage().nbytes() != embeds.numel() * embeds.element_size()
        or not embeds.is_contiguous()
    ):
        return embeds.clone(memory_format=torch.contiguous_format)
    return embeds


class EncoderCache:
    """A thread-safe LRU map ``key -> ImageFeatures`` (key: :func:`cache_key`) with hit / miss counters.

    Parameters
    ----------
    capacity : int
        Most entries (0 disables the cache).
    max_bytes : int, optional
        Most bytes of features held (None: entries only). Features vary by two orders of magnitude in
        size (64 tokens of a tiny model vs ~3,000 x 4,096 of an anyres LLaVA-NeXT image, 24 MB in bf16),
        so a count alone does not bound memory; a feature larger than the whole budget is not kept.
    """

    def __init__(self, capacity: int = 256, max_bytes: int | None = None):
        self.capacity = capacity
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.bytes = 0

    def get(self, key: str, *, count: bool = True) -> ImageFeatures | None:
        """The cached features of ``key`` (most recently used now), or None; counted as a hit or a miss
        unless ``count`` is False (the caller counts once its lookups have served: :meth:`count`)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += int(count)
                return None
            self._items.move_to_end(key)
            self.hits += int(count)
            return item

    def count(self, hits: int, misses: int) -> None:
        """Add lookups made with ``count=False``."""
        with self._lock:
            self.hits += hits
            self.misses += misses

    def put(self, key: str, value: ImageFeatures) -> None:
        size = _nbytes(value)
        if self.capacity <= 0 or (self.max_bytes is not None and size > self.max_bytes):
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= _nbytes(old)
            self._items[key] = value
            self.bytes += size
            while len(self._items) > self.capacity or (
                self.max_bytes is not None and self.bytes > self.max_bytes
            ):
                _, evicted = self._items.popitem(last=False)
                self.bytes -= _nbytes(evicted)

    def stats(self) -> dict:
        with self._lock:
            total = self.hits + self.misses
            return {
                "hits": self.hits,
                "misses": self.misses,
                "size": len(self._items),
                "capacity": self.capacity,
                "bytes": self.bytes,
                "max_bytes": self.max_bytes,
                "hit_rate": self.hits / total if total else 0.0,
            }


class VisionEncoder:
    """Encodes :class:`~zipvl_ray.multimodal.ImageInput` s into :class:`ImageFeatures`.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        The VLM; only its vision tower + projector are used (the language model may be dropped).
    cache_size : int
        Entries of the LRU encoder cache (0 disables it).
    cache_max_bytes : int, optional
        Most bytes of features the cache holds (None: bounded by entries only).
    output_device : str
        Where the returned features live (``"cpu"`` for shipping them to another process).
    """

    def __init__(
        self, model, *, cache_size: int = 256, cache_max_bytes: int | None = None, output_device: str = "cpu"
    ):
        self.adapter = VLMAdapter(model)
        self.cache = EncoderCache(cache_size, cache_max_bytes)
        self.output_device = output_device

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype=None,
        device=None,
        cache_size: int = 256,
        cache_max_bytes: int | None = None,
        output_device: str = "cpu",
    ) -> VisionEncoder:
        """Load ``model`` (built-in name, local path or hub id) and keep only its vision tower + projector."""
        from zipvl_ray.models import load_model

        vlm, _processor = load_model(model, dtype=dtype, device=device)
        adapter = VLMAdapter(vlm)
        adapter.drop_language_model()
        return cls(vlm, cache_size=cache_size, cache_max_bytes=cache_max_bytes, output_device=output_device)

    def encode(self, images: list[ImageInput]) -> list[ImageFeatures]:
        """Features of every image, in order; cache misses are encoded in one batched forward.

        The cache is looked up once per distinct image of the call (the same new image three times is
        one miss, encoded once), and every returned feature owns its memory (see :func:`_owned`).
        """
        found: dict[str, ImageFeatures | None] = {}
        for image in images:
            if (key := cache_key(image)) not in found:
                found[key] = self.cache.get(key, count=False)
        todo = {key: im for im in images if found[(key := cache_key(im))] is None}
        # Counted once the call has served: a forward that raises counts nothing (its images are looked
        # up again when the batch's requests are retried one by one, and would count twice).
        counted = (len(found) - len(todo), len(todo))
        if todo:
            embeds = self.adapter.encode_images(list(todo.values()))
            for (key, image), emb in zip(todo.items(), embeds, strict=True):
                feature = ImageFeatures(
                    embeds=_owned(emb.detach().to(self.output_device)),
                    num_tokens=image.num_tokens,
                    content_hash=image.content_hash,
                    grid_thw=image.grid_thw,
                )
                self.cache.put(key, feature)
                found[key] = feature
        self.cache.count(*counted)
        return [found[cache_key(image)] for image in images]  # type: ignore[misc]

    def cache_stats(self) -> dict:
        return self.cache.stats()
