"""Text-model variants ZipVL's attention or the paged engine would serve differently from the stock
forward are refused with a message, not served with silently different answers (review 2026-12-06:
a Mistral backbone with a 32-token window gave other tokens than stock at tau = 1; dynamic RoPE made a
request's logits depend on what the engine packed with it)."""

from __future__ import annotations

import copy

import pytest
from transformers import LlavaForConditionalGeneration, MistralConfig

from zipvl_ray.attention import enable_zipvl, sliding_window_of
from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLM
from zipvl_ray.models.builtin import build_tiny_llava


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_llava()


def with_mistral_backbone(base, sliding_window):
    config = copy.deepcopy(base.config)
    text = config.text_config
    config.text_config = MistralConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.hidden_size,
        intermediate_size=text.intermediate_size,
        num_hidden_layers=text.num_hidden_layers,
        num_attention_heads=text.num_attention_heads,
        num_key_value_heads=text.num_key_value_heads,
        head_dim=text.head_dim,
        max_position_embeddings=4096,
        sliding_window=sliding_window,
        pad_token_id=text.pad_token_id,
        eos_token_id=text.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()


def test_a_sliding_window_smaller_than_the_context_is_refused(tiny):
    model = with_mistral_backbone(tiny[0], sliding_window=32)
    assert sliding_window_of(model) == 32
    with pytest.raises(ValueError, match="sliding-window attention \\(a window of 32 tokens\\)"):
        enable_zipvl(model, ZipVLConfig(tau=1.0))


@pytest.mark.parametrize("window", [None, 4096])
def test_no_window_or_one_as_long_as_the_context_is_served(tiny, window):
    model = with_mistral_backbone(tiny[0], sliding_window=window)
    assert sliding_window_of(model) is None
    enable_zipvl(model, ZipVLConfig(tau=1.0))


def test_builtin_models_have_no_window():
    from zipvl_ray.models import builtin_model_names, load_model

    for name in builtin_model_names():
        assert sliding_window_of(load_model(name)[0]) is None, name


@pytest.mark.parametrize(
    ("rope", "refused"),
    [
        ({"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0}, True),
        (
            {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0] * 8,
                "long_factor": [4.0] * 8,
                "original_max_position_embeddings": 64,
            },
            True,
        ),
        ({"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}, False),
    ],
)
def test_the_engine_refuses_rope_scaling_that_depends_on_the_batch(tiny, rope, refused):
    base, processor = tiny
    config = copy.deepcopy(base.config)
    config.text_config.rope_parameters = rope
    config.text_config.max_position_embeddings = 64
    model = type(base)._from_config(config).eval()
    enable_zipvl(model, ZipVLConfig(tau=1.0))  # the reference path serves it
    engine = EngineConfig(kv_cache_bytes=4 << 20, max_model_len=256)
    if refused:
        with pytest.raises(ValueError, match="past 256 tokens is not supported by the paged engine"):
            LLM(model, processor=processor, engine=engine)
    else:
        LLM(model, processor=processor, engine=engine)
    # Within the original context (64 positions) the frequencies never change: served.
    LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=64))


def test_a_max_model_len_beyond_the_models_context_is_refused(tiny, monkeypatch):
    """Positions past ``max_position_embeddings`` (times a RoPE scaling factor) were never trained: the
    engine refuses to start rather than degrade answers silently, unless the user opts in."""
    from zipvl_ray.engine.model_runner import ALLOW_LONG_MAX_MODEL_LEN_ENV, model_context_length

    base, processor = tiny
    config = copy.deepcopy(base.config)
    config.text_config.max_position_embeddings = 64
    model = type(base)._from_config(config).eval()
    enable_zipvl(model, ZipVLConfig(tau=1.0))
    assert model_context_length(model) == 64
    with pytest.raises(ValueError, match="max_model_len 65 is longer than the model's context of 64 tokens"):
        LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=65))
    LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=64))
    monkeypatch.setenv(ALLOW_LONG_MAX_MODEL_LEN_ENV, "1")
    LLM(model, processor=processor, engine=EngineConfig(kv_cache_bytes=4 << 20, max_model_len=65))

    config.text_config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    config.text_config.rope_parameters["original_max_position_embeddings"] = 32
    assert model_context_length(type(base)._from_config(config)) == 128  # 32 x 4 over 64


def test_dense_layers_beyond_the_model_are_refused(tiny):
    from zipvl_ray.attention import set_zipvl_config

    model = copy.deepcopy(tiny[0])
    with pytest.raises(ValueError, match=r"dense_layers \[4, 9\] are beyond the text model's 4 layers"):
        enable_zipvl(model, ZipVLConfig(dense_layers=[0, 4, 9]))
    enable_zipvl(model, ZipVLConfig(dense_layers=[3]))
    with pytest.raises(ValueError, match="beyond the text model"):
        set_zipvl_config(model, ZipVLConfig(dense_layers=[7]))
