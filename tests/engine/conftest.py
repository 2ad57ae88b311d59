"""Helpers: the reference path (model.generate + ZipVLCache) to compare the engine against."""

import pytest
import torch

from zipvl_ray.cache import ZipVLCache
from zipvl_ray.models import load_model

from ..conftest import NO_EOS, chat, make_image

TEXTS = [
    "Describe the picture.",
    "What is the colour of the large square?",
    "Hi",
    "Count the circles in all frames",
]


def mixed_prompts(n_images=(0, 1, 2, 3), seed=0):
    """Chat prompts with different lengths and 0-3 images each."""
    return [
        {
            "messages": chat(TEXTS[i % len(TEXTS)] * (1 + i % 2), k),
            "images": [make_image(seed + 10 * i + j) for j in range(k)],
        }
        for i, k in enumerate(n_images)
    ]


def reference_tokens(model, processor, prompt, config, max_new_tokens):
    text = processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=prompt["images"] or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            past_key_values=ZipVLCache(model, config),
            max_new_tokens=max_new_tokens,
            eos_token_id=NO_EOS,  # never stop, never forbid a token (min_new_tokens would forbid EOS)
            do_sample=False,
        )
    return out[0, inputs["input_ids"].shape[1] :].tolist()


@pytest.fixture(scope="module")
def tiny_llava():
    return load_model("tiny-llava")
