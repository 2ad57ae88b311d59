"""Shared fixtures: tiny models, images, prompts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import pytest
import torch
from PIL import Image

TINY_ARCHS = ["tiny-llava", "tiny-llava-next", "tiny-qwen2-vl", "tiny-qwen2.5-vl"]
#: An end-of-sequence id no model has: reference generations run their full length and, unlike with
#: ``min_new_tokens``, EOS is not forbidden (the engine with ``ignore_eos`` may pick it).
NO_EOS = 10**9


def make_image(seed: int, size: tuple[int, int] = (100, 140)) -> Image.Image:
    """A deterministic random RGB image of ``size`` = (height, width)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))


def chat(text: str, n_images: int = 1) -> list[dict]:
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def greedy(model, inputs, cache=None, steps=16):
    """Greedy ``model.generate`` of exactly ``steps`` tokens: ``(sequences, logits (B, steps, vocab))``."""
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=steps,
            eos_token_id=NO_EOS,  # never stop, never forbid a token (min_new_tokens would forbid EOS)
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            past_key_values=cache,
        )
    return out.sequences, torch.stack(out.logits, dim=1)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def images():
    return [make_image(i) for i in range(4)]
