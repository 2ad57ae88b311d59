"""Prompt preparation gives what the model's processor gives, image by image."""

import pytest

from zipvl_ray.models import BUILTIN_MODELS
from zipvl_ray.multimodal import PromptError, PromptProcessor, image_content_hash

from .conftest import TINY_ARCHS, chat, make_image


@pytest.mark.parametrize("name", TINY_ARCHS)
@pytest.mark.parametrize("n_images", [0, 1, 3])
def test_prepare_matches_the_processor(name, n_images):
    _, processor = BUILTIN_MODELS[name]()
    pp = PromptProcessor(processor)
    images = [make_image(i, (80 + 30 * i, 140 - 20 * i)) for i in range(n_images)]
    messages = chat("What is in these pictures?", n_images)
    prepared = pp.prepare(messages, images)
    expected = processor(text=[pp.render(messages)], images=images or None, return_tensors="pt")["input_ids"][
        0
    ].tolist()
    assert prepared.token_ids == expected
    assert prepared.num_image_tokens == sum(1 for t in expected if t == processor.image_token_id)


def test_placeholder_count_must_match():
    _, processor = BUILTIN_MODELS["tiny-llava"]()
    pp = PromptProcessor(processor)
    with pytest.raises(PromptError, match="2 images"):
        pp.prepare(chat("x", 1), [make_image(0), make_image(1)])
    with pytest.raises(PromptError, match="empty"):
        pp.prepare("", [])


def test_content_hash_depends_on_pixels_and_size():
    a, b = make_image(0), make_image(1)
    assert image_content_hash(a) == image_content_hash(make_image(0))
    assert image_content_hash(a) != image_content_hash(b)
    assert image_content_hash(a) != image_content_hash(a.resize((10, 10)))


@pytest.mark.parametrize("name", TINY_ARCHS)
@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "L", "P"])
def test_pixels_match_the_processor_for_every_accepted_mode(name, mode):
    """Transparent pixels are composited onto white as the models' own processors do (dropping the alpha
    channel would show what lies under it: black here)."""
    import numpy as np
    import torch
    from PIL import Image

    _, processor = BUILTIN_MODELS[name]()
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 255, (60, 90, 4), dtype=np.uint8)
    rgba[:, :45, 3] = 0  # the left half is transparent, with black underneath
    rgba[:, :45, :3] = 0
    image = Image.fromarray(rgba, "RGBA")
    image = image.convert(mode) if mode != "PA" else image.convert("RGBA").convert("PA")
    ours = PromptProcessor(processor).preprocess_image(image).pixel_values
    expected = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours, expected)


class _BosTokenizer:
    """A tokenizer that adds a BOS (id 1) unless told not to; one id per character otherwise."""

    bos_token = "<s>"

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if text.startswith(self.bos_token) else []
        rest = text[len(self.bos_token) :] if ids else text
        return {"input_ids": ([1] if add_special_tokens else []) + ids + [ord(c) for c in rest]}


@pytest.mark.parametrize(("rendered", "expected"), [("<s>[INST] hi", [1]), ("[INST] hi", [1])])
def test_a_template_that_writes_the_bos_gets_one_bos(rendered, expected):
    _, processor = BUILTIN_MODELS["tiny-llava"]()
    pp = PromptProcessor(processor)
    pp.tokenizer = _BosTokenizer()
    ids = pp.expand(rendered, [])
    assert ids[:1] == expected and ids[1] != 1


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_a_colour_keyed_rgb_png_is_composited_and_hashed_apart_from_its_plain_twin(name):
    """An RGB PNG may mark one colour transparent (``tRNS``). The image processor composites it onto white;
    ``to_rgb`` passed such an image through, so its content hash was its plain twin's and the encoder cache
    served one request the other's features (a review: whichever came first decided both answers)."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    _, processor = BUILTIN_MODELS[name]()
    pixels = np.random.default_rng(1).integers(1, 255, (56, 84, 3), dtype=np.uint8)
    pixels[:, :40] = 0  # the left part black: the keyed colour
    plain = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    plain.save(buffer, "PNG", transparency=(0, 0, 0))
    keyed = Image.open(buffer)
    keyed.load()
    assert keyed.mode == "RGB" and keyed.info["transparency"] == (0, 0, 0)
    pp = PromptProcessor(processor)
    ours_plain, ours_keyed = pp.preprocess_image(plain), pp.preprocess_image(keyed)
    assert ours_plain.content_hash != ours_keyed.content_hash
    expected = processor.image_processor(images=[keyed], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(ours_keyed.pixel_values, expected)
