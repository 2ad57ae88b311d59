"""A runnable demo of the main job: ZipVL generation on the built-in model, with what it saved.

``python -m zipvl_ray.demo [--model tiny-llava] [--tau 0.975] [--max-new-tokens 24]``
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image

from zipvl_ray.cache import ZipVLCache
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.models import load_model


def demo_image(size: int = 336, seed: int = 0) -> Image.Image:
    """A synthetic picture: coloured squares on a grey background."""
    rng = np.random.default_rng(seed)
    pixels = np.full((size, size, 3), 128, dtype=np.uint8)
    for _ in range(6):
        x, y = rng.integers(0, size - 48, 2)
        pixels[y : y + 48, x : x + 48] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="tiny-llava")
    parser.add_argument("--tau", type=float, default=0.975)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--images", type=int, default=4, help="images in the prompt (a short 'video')")
    args = parser.parse_args(argv)

    model, processor = load_model(args.model, zipvl=ZipVLConfig(tau=args.tau))
    content = [{"type": "image"} for _ in range(args.images)]
    content.append({"type": "text", "text": "What changes between these frames?"})
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    inputs = processor(
        text=[prompt], images=[demo_image(seed=i) for i in range(args.images)], return_tensors="pt"
    )
    cache = ZipVLCache(model)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs, past_key_values=cache, max_new_tokens=args.max_new_tokens, do_sample=False
        )
    elapsed = time.perf_counter() - start
    stats = cache.stats()
    text = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    print(
        f"model {args.model}: {stats.prompt_tokens[0]} prompt tokens, {args.images} images, {elapsed:.2f} s"
    )
    print("kept ratio per layer:", [round(r, 3) for r in stats.kept_ratio_per_layer()])
    print(
        f"KV held {stats.kv_bytes} B vs dense {stats.kv_bytes_dense} B ({stats.kv_bytes / stats.kv_bytes_dense:.1%})"
    )
    print("answer:", repr(text))


if __name__ == "__main__":
    main()
