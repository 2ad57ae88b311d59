"""Built-in tiny models: real transformers architectures with small random weights, built offline.

Each builder returns ``(model, processor)`` with a working processor (byte-level tokenizer, PIL
image processor, chat template), so every path of the project (reference generate, paged engine,
the separate vision stage, the HTTP service) runs on CPU in tests. Names:

=====================  ==========================================================
``tiny-llava``         LLaVA-1.5 layout: CLIP tower, 2-layer MLP projector, LLaMA
``tiny-llava-next``    LLaVA-NeXT: anyres tiles + image newline tokens
``tiny-qwen2-vl``      Qwen2-VL: native-resolution ViT, M-RoPE text model
``tiny-qwen2.5-vl``    Qwen2.5-VL: windowed ViT, M-RoPE text model
=====================  ==========================================================
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from zipvl_ray.models.tokenizer import byte_tokenizer

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] if message['content'] is string else "
    "message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}{{ '\\n' }}"
    "{% else %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}<|im_end|>{% endif %}{{ '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor for images only (no video processor, so no torchvision is needed)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a built-in model's text stack (shared by all architectures)."""

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 112  # LLaVA: CLIP input side; 112 / 14 = 8 -> 64 patches
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _text_kwargs(spec: TinySpec, vocab_size: int, eos: int, pad: int) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=65536,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def _finish(model, processor, seed):
    model.eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    return model, processor


def llava_processor(tokenizer, side: int, chat_template: str) -> LlavaProcessor:
    """A LLaVA-1.5 processor for ``side`` x ``side`` pictures (14-pixel patches, CLS dropped) on PIL."""
    return LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": side}, crop_size={"height": side, "width": side}
        ),
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def build_tiny_llava(spec: TinySpec = TinySpec(), *, seed: int = 0, next_variant: bool = False):
    """LLaVA-1.5 (or LLaVA-NeXT with ``next_variant``) with random weights and an offline processor."""
    tokenizer = byte_tokenizer(["<image>"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    vocab = len(tokenizer)
    text = LlamaConfig(**_text_kwargs(spec, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id))
    side = spec.image_size if not next_variant else spec.image_size // 2
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden,
        intermediate_size=spec.vision_hidden * 2,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=side,
        patch_size=14,
        projection_dim=spec.vision_hidden,
    )
    common = dict(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    if next_variant:
        pinpoints = [[side, side * 2], [side * 2, side], [side * 2, side * 2]]
        config = LlavaNextConfig(image_grid_pinpoints=pinpoints, **common)
        model = LlavaNextForConditionalGeneration._from_config(copy.deepcopy(config))
        image_processor = LlavaNextImageProcessorPil(
            size={"shortest_edge": side},
            crop_size={"height": side, "width": side},
            image_grid_pinpoints=pinpoints,
        )
        processor = LlavaNextProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=14,
            vision_feature_select_strategy="default",
            chat_template=LLAVA_CHAT_TEMPLATE,
            image_token="<image>",
            num_additional_image_tokens=1,
        )
    else:
        config = LlavaConfig(**common)
        model = LlavaForConditionalGeneration._from_config(copy.deepcopy(config))
        processor = llava_processor(tokenizer, side, LLAVA_CHAT_TEMPLATE)
    return _finish(model, processor, seed)


def build_tiny_qwen2_vl(spec: TinySpec = TinySpec(), *, seed: int = 0, v2_5: bool = False):
    """Qwen2-VL (or Qwen2.5-VL with ``v2_5``) with random weights and an offline image processor."""
    tokenizer = byte_tokenizer(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    ids = {
        t: tokenizer.convert_tokens_to_ids(t)
        for t in ["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"]
    }
    vocab = len(tokenizer)
    half = spec.head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    text = dict(
        **_text_kwargs(spec, vocab, tokenizer.eos_token_id, tokenizer.pad_token_id),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
    )
    vision = dict(
        depth=spec.vision_layers,
        hidden_size=spec.vision_hidden if v2_5 else spec.hidden_size,
        num_heads=spec.vision_heads,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
    )
    if v2_5:
        vision.update(
            intermediate_size=spec.vision_hidden * 2,
            out_hidden_size=spec.hidden_size,
            window_size=56,
            fullatt_block_indexes=[spec.vision_layers - 1],
        )
        config_cls, model_cls = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    else:
        vision.update(embed_dim=spec.vision_hidden, mlp_ratio=2)
        config_cls, model_cls = Qwen2VLConfig, Qwen2VLForConditionalGeneration
    config = config_cls(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_cls._from_config(copy.deepcopy(config))
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=56 * 56, max_pixels=spec.image_size * spec.image_size, patch_size=14, merge_size=2
    )
    processor = Qwen2VLImageProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_CHAT_TEMPLATE
    )
    return _finish(model, processor, seed)


BUILTIN_MODELS = {
    "tiny-llava": lambda **kw: build_tiny_llava(**kw),
    "tiny-llava-next": lambda **kw: build_tiny_llava(next_variant=True, **kw),
    "tiny-qwen2-vl": lambda **kw: build_tiny_qwen2_vl(**kw),
    "tiny-qwen2.5-vl": lambda **kw: build_tiny_qwen2_vl(v2_5=True, **kw),
}
