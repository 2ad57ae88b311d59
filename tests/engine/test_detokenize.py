"""The engine's detokenization shortcut: the same text as ``tokenizer.decode`` on every built-in tokenizer."""

from __future__ import annotations

import random

import pytest

from zipvl_ray.engine.llm_engine import fast_decode
from zipvl_ray.models import load_processor

from ..conftest import TINY_ARCHS


@pytest.mark.parametrize("model", [*TINY_ARCHS, "zipvl-tiny"])
def test_fast_decode_equals_decode(model):
    tokenizer = load_processor(model).tokenizer
    decode = fast_decode(tokenizer)
    assert decode != tokenizer.decode  # the shortcut is taken for these tokenizers
    rng = random.Random(0)
    vocab = len(tokenizer)
    cases = [[], [0], list(range(min(vocab, 300)))]
    cases += [[rng.randrange(vocab) for _ in range(rng.randrange(1, 40))] for _ in range(50)]
    cases += [tokenizer.encode("Hello, world! A red square at (3, 4).", add_special_tokens=False)]
    for ids in cases:
        for skip in (True, False):
            assert decode(ids, skip_special_tokens=skip) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_a_tokenizer_with_its_own_decode_keeps_it():
    tokenizer = load_processor("tiny-llava").tokenizer

    class Custom(type(tokenizer)):
        def decode(self, token_ids, skip_special_tokens=False, **kwargs):
            return "custom"

    tokenizer.__class__ = Custom
    assert fast_decode(tokenizer)([1, 2], skip_special_tokens=True) == "custom"


def test_a_decode_replaced_on_the_instance_is_kept():
    tokenizer = load_processor("tiny-llava").tokenizer
    tokenizer.decode = lambda ids, **kwargs: "patched"
    assert fast_decode(tokenizer)([1, 2], skip_special_tokens=True) == "patched"


def test_anything_else_uses_its_decode():
    class Plain:
        def decode(self, ids, skip_special_tokens=False):
            return ",".join(map(str, ids))

    assert fast_decode(Plain())([1, 2], skip_special_tokens=True) == "1,2"
