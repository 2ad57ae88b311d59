"""The engine's flash-attn code paths, run on CPU through a pure-torch stand-in of flash_attn."""

import sys

import pytest

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLM, SamplingParams

from . import fake_flash_attn
from .conftest import mixed_prompts


@pytest.fixture
def fake_flash(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn)


def generate(tiny_llava, block_size, flash: bool):
    model, processor = tiny_llava
    llm = LLM(
        model,
        processor=processor,
        zipvl=ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8),
        engine=EngineConfig(kv_cache_bytes=16 << 20, block_size=block_size),
    )
    runner = llm.engine.runner
    if flash:  # what attention_backend() picks on CUDA with flash-attn installed
        runner.backend = "flash"
        runner.paged_flash = block_size % 256 == 0
    outs = llm.generate(mixed_prompts(), SamplingParams(max_tokens=8, ignore_eos=True))
    assert llm.stats().kv_bytes_used == 0
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("block_size", [16, 256])
def test_flash_paths_give_the_sdpa_tokens(tiny_llava, fake_flash, block_size):
    """block_size 16: flash varlen prefill + gather decode; 256: flash varlen prefill + paged flash decode."""
    assert generate(tiny_llava, block_size, flash=True) == generate(tiny_llava, block_size, flash=False)
