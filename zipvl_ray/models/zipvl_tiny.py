"""``zipvl-tiny``: the architecture of the trained built-in model (LLaVA-1.5 layout, 1.8M parameters).

The trained weights live in ``zipvl_ray/checkpoints/zipvl-tiny/`` (written by ``python -m
zipvl_ray.train``); this module builds the *untrained* model with the same sizes, tokenizer and
processor as the random ``tiny-llava`` built-in, only larger:

* vision: CLIP tower, 112 x 112 input, 14-pixel patches -> 64 tokens per picture or video frame
  (the class token is dropped), hidden 64, 2 layers of 4 heads;
* projector: 2-layer GELU MLP 64 -> 128 -> 128;
* text: LLaMA, 8 layers, hidden 128, 4 query heads and 2 key-value heads of 32, MLP 384;
* byte-level tokenizer (ids 0-255 are bytes) plus whole-word tokens for the task vocabulary
  (:data:`WORD_TOKENS`), and the ``USER: ... ASSISTANT: `` chat template; a video is sent as one
  ``<image>`` per frame.

Eight text layers leave room for a FastV-style baseline (two dense layers, then pruning) to reach
the token budgets ZipVL reaches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from zipvl_ray.data.scenes import COLOURS, PLURALS, SHAPES
from zipvl_ray.models.builtin import LLAVA_CHAT_TEMPLATE, TinySpec, _finish, _text_kwargs, llava_processor
from zipvl_ray.models.tokenizer import byte_tokenizer

#: Name under which :func:`zipvl_ray.models.load_model` finds the trained checkpoint.
ZIPVL_TINY_NAME = "zipvl-tiny"

#: Sizes of ``zipvl-tiny``.
ZIPVL_TINY_SPEC = TinySpec(
    hidden_size=128,
    num_layers=8,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=384,
    vision_hidden=64,
    vision_layers=2,
    vision_heads=4,
    image_size=112,
)


#: Whole-word tokens added on top of the 256 bytes, as a BPE vocabulary would have them: the
#: vocabulary of the synthetic tasks and of the chat template. Any other text stays byte-level.
WORD_TOKENS: tuple[str, ...] = (
    *SHAPES,
    *PLURALS.values(),
    *COLOURS,
    "colour",
    "shape",
    "object",
    "frame",
    "left",
    "What",
    "How many",
    "In which",
    "USER",
    "ASSISTANT",
)


#: The built-in LLaVA template, except that the generation prompt ends in ``"ASSISTANT: "`` (with the
#: space), so the last prompt token produces the answer's first word: the token ZipVL always keeps.
ZIPVL_TINY_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE.replace(
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}",
    "{% if add_generation_prompt %}ASSISTANT: {% endif %}",
)
assert ZIPVL_TINY_CHAT_TEMPLATE != LLAVA_CHAT_TEMPLATE


def zipvl_tiny_tokenizer():
    """The byte-level tokenizer of the built-in models plus ``<image>`` and :data:`WORD_TOKENS`.

    Ids 0-255 are bytes, so every text round-trips (up to NFC normalisation); the added words are matched longest first
    ("triangles" is one token, not "triangle" + "s").
    """
    tokenizer = byte_tokenizer(["<image>"])
    tokenizer.add_tokens(list(WORD_TOKENS))
    return tokenizer


def build_untrained_zipvl_tiny(spec: TinySpec = ZIPVL_TINY_SPEC, *, seed: int = 0):
    """The untrained ``zipvl-tiny`` (random weights from ``seed``) and its offline processor.

    Same layout and processor as the random ``tiny-llava`` built-in
    (:func:`zipvl_ray.models.builtin.build_tiny_llava`), with the sizes of ``spec`` and the tokenizer
    of :func:`zipvl_tiny_tokenizer`.

    Returns
    -------
    (transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor)
    """
    tokenizer = zipvl_tiny_tokenizer()
    text = LlamaConfig(
        **_text_kwargs(spec, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id),
        initializer_range=spec.extra.get("initializer_range", 0.02),
    )
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=14,
        projection_dim=spec.vision_hidden,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration._from_config(copy.deepcopy(config))
    side = spec.image_size
    processor = llava_processor(tokenizer, side, ZIPVL_TINY_CHAT_TEMPLATE)
    return _finish(model, processor, seed)


def save_checkpoint(model, processor, path: str | Path) -> list[Path]:
    """Write ``model`` (safetensors + config) and ``processor`` files to ``path``; return the files written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return sorted(p for p in path.iterdir() if p.is_file())
