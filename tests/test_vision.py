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


def test_the_cache_is_bounded_by_bytes_too():
    """Features of 100 fp32 values are 400 bytes: a 1,000-byte budget holds two of them, whatever the count."""
    cache = EncoderCache(capacity=100, max_bytes=1000)
    feat = lambda h, n=100: ImageFeatures(torch.zeros(n, 1), n, h)  # noqa: E731
    for key in "abc":
        cache.put(key, feat(key))
    assert cache.get("a") is None and cache.get("b") is not None and cache.get("c") is not None
    assert cache.stats()["bytes"] == 800 and cache.stats()["size"] == 2
    cache.put("b", feat("b"))  # replacing an entry does not count it twice
    assert cache.stats()["bytes"] == 800
    cache.put("huge", feat("huge", 300))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get("huge") is None and cache.stats()["size"] == 2


def test_the_encoder_passes_its_byte_budget_to_the_cache():
    encoder = VisionEncoder.from_pretrained("tiny-llava", cache_size=8, cache_max_bytes=12345)
    assert encoder.cache_stats()["max_bytes"] == 12345


def test_cached_features_own_their_memory_and_repeats_in_one_call_are_one_miss():
    """The tower returns one tensor per batch, split into views: a cached view would keep the whole batch's
    storage alive behind a byte bound that counts only its slice, and a pickled view would ship every
    other image's features of the batch. Each feature must own exactly its own bytes."""
    import pickle

    for name in TINY_ARCHS:
        encoder = VisionEncoder.from_pretrained(name, cache_size=16)
        processor = load_model(name)[1]
        images = [make_image(i) for i in range(4)]
        prepared = PromptProcessor(processor).prepare(chat("x", 4), images).images
        for feature in encoder.encode(prepared):
            nbytes = feature.embeds.numel() * feature.embeds.element_size()
            assert feature.embeds.untyped_storage().nbytes() == nbytes, name
            assert len(pickle.dumps(feature.embeds)) < nbytes + 2048, name
        held = sum(f.embeds.untyped_storage().nbytes() for f in encoder.cache._items.values())
        assert encoder.cache_stats()["bytes"] == held

    encoder = VisionEncoder.from_pretrained("tiny-llava", cache_size=16)
    (image,) = PromptProcessor(load_model("tiny-llava")[1]).prepare(chat("x", 1), [make_image(7)]).images
    out = encoder.encode([image, image, image])
    assert out[0] is out[1] is out[2]
    stats = encoder.cache_stats()
    assert (stats["misses"], stats["hits"], stats["size"]) == (1, 0, 1)


def test_a_cached_feature_is_reused_only_for_the_same_token_layout():
    """Ingress replicas with other processor settings (a rolling update) prepare the same picture into
    another number of tokens: the cache must not hand back the old layout's features."""
    import dataclasses

    encoder = VisionEncoder.from_pretrained("tiny-qwen2-vl", cache_size=16)
    processor = load_model("tiny-qwen2-vl")[1]
    picture = make_image(3, (112, 112))
    (small,) = PromptProcessor(processor).prepare(chat("x", 1), [picture]).images
    processor.image_processor.size = {"shortest_edge": 224 * 224, "longest_edge": 224 * 224}
    (large,) = PromptProcessor(processor).prepare(chat("x", 1), [picture]).images
    assert small.content_hash == large.content_hash and small.num_tokens != large.num_tokens
    first, second = encoder.encode([small])[0], encoder.encode([large])[0]
    assert (first.num_tokens, second.num_tokens) == (small.num_tokens, large.num_tokens)
    assert second.embeds.shape[0] == large.num_tokens
    assert encoder.encode([dataclasses.replace(small)])[0] is first  # same layout: a hit
    assert encoder.cache_stats()["hits"] == 1 and encoder.cache_stats()["misses"] == 2


def test_a_cached_feature_is_reused_only_for_the_same_preprocessing():
    """Same picture, same token count, other normalisation (a corrected processor config rolled out to
    some ingress replicas): other pixels, so the cache must not hand back the old pixels' features."""
    import copy

    model, processor = load_model("tiny-llava")
    encoder = VisionEncoder(model, cache_size=16)
    picture = make_image(4, (90, 120))
    (old,) = PromptProcessor(processor).prepare(chat("x", 1), [picture]).images
    corrected = copy.deepcopy(processor)
    corrected.image_processor.image_mean = [0.5, 0.5, 0.5]
    corrected.image_processor.image_std = [0.5, 0.5, 0.5]
    (new,) = PromptProcessor(corrected).prepare(chat("x", 1), [picture]).images
    assert old.num_tokens == new.num_tokens and not torch.equal(old.pixel_values, new.pixel_values)
    encoder.encode([old])
    served = encoder.encode([new])[0].embeds
    truth = VisionEncoder(model, cache_size=0).encode([new])[0].embeds
    torch.testing.assert_close(served, truth)
    assert encoder.cache_stats()["misses"] == 2


def test_the_preprocessing_digest_names_the_image_processor_class():
    """A PIL and a torchvision image processor serialise to the same settings but resize differently:
    replicas with and without torchvision must not share cached features."""
    import copy

    _, processor = load_model("tiny-llava")
    twin = copy.deepcopy(processor)
    settings = processor.image_processor.to_json_string()
    other_class = type(  # as LlavaImageProcessorPil does: the same "image_processor_type" in its JSON
        "LlavaImageProcessorOtherBackend",
        (type(processor.image_processor),),
        {"to_json_string": lambda self: settings},
    )
    twin.image_processor.__class__ = other_class
    assert twin.image_processor.to_json_string() == processor.image_processor.to_json_string()
    assert PromptProcessor(twin).preprocessing_digest != PromptProcessor(processor).preprocessing_digest
    assert (
        PromptProcessor(copy.deepcopy(processor)).preprocessing_digest
        == PromptProcessor(processor).preprocessing_digest
    )


def test_a_forward_that_raises_counts_no_lookup():
    """A batch whose forward raises is encoded again request by request (deployments/vision.py): its
    lookups used to count as misses twice (a review: 4 distinct images, 2 encoded, 8 misses exported).
    Lookups count once the call has served."""
    import pytest

    encoder = VisionEncoder.from_pretrained("tiny-llava", cache_size=8)
    _, processor = load_model("tiny-llava")
    images = PromptProcessor(processor).prepare(chat("x", 2), [make_image(3), make_image(4)]).images
    real = encoder.adapter.encode_images
    encoder.adapter.encode_images = lambda batch: (_ for _ in ()).throw(RuntimeError("out of memory"))
    with pytest.raises(RuntimeError):
        encoder.encode(images)
    assert (encoder.cache_stats()["hits"], encoder.cache_stats()["misses"]) == (0, 0)
    encoder.adapter.encode_images = real
    encoder.encode(images[:1])
    encoder.encode(images)
    assert (encoder.cache_stats()["hits"], encoder.cache_stats()["misses"]) == (1, 2)
