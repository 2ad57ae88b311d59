"""The vision stage: features equal the model's own, the LRU cache hits on repeated images."""

import torch

from zipvl_ray.models import load_model
from zipvl_ray.multimodal import PromptProcessor
from zipvl_ray.vision import EncoderCache, ImageFeatures, VisionEncoder

from .conftest import TINY_ARCHS, chat, make_image


def test_encoder_features_match_the_model_and_cache_hits():
    for name in TINY_ARCHS:
        encoder = VisionEncoder.from_pretrained(name, cache_size=4)
        model, processor = load_model(name)
        prepared = PromptProcessor(processor).prepare(chat("x", 2), [make_image(1), make_image(2, (160, 90))])
        features = encoder.encode(prepared.images)
        for image, feature in zip(prepared.images, features, strict=True):
            kwargs = {"pixel_values": image.pixel_values, **image.extra}
            expected = model.model.get_image_features(**kwargs, return_dict=True).pooler_output[0]
            torch.testing.assert_close(feature.embeds, expected, rtol=1e-5, atol=1e-5)
            assert feature.num_tokens == image.num_tokens and feature.embeds.device.type == "cpu"
        assert encoder.cache_stats()["misses"] == 2 and encoder.cache_stats()["hits"] == 0
        again = encoder.encode(prepared.images[::-1])
        assert encoder.cache_stats()["hits"] == 2 and again[0] is features[1]
        assert encoder.adapter.model.lm_head is None  # the language model was dropped


def test_lru_eviction_order():
    cache = EncoderCache(capacity=2)
    feat = lambda h: ImageFeatures(torch.zeros(1, 1), 1, h)  # noqa: E731
    cache.put("a", feat("a"))
    cache.put("b", feat("b"))
    assert cache.get("a") is not None  # a is now most recent
    cache.put("c", feat("c"))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.stats()["size"] == 2 and cache.stats()["hit_rate"] == 3 / 4
