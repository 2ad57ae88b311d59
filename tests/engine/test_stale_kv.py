"""Whatever a freed KV block last held cannot reach another request's attention (decode's block gather)."""

from __future__ import annotations

import pytest

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLMEngine, SamplingParams

from .conftest import mixed_prompts


@pytest.mark.parametrize(
    "zipvl", [ZipVLConfig(enabled=False), ZipVLConfig(max_keep_ratio=0.35)], ids=["dense", "r0.35"]
)
def test_non_finite_stale_blocks_do_not_leak(tiny_llava, zipvl):
    """The pool starts full of NaN (as if freed blocks held an overflowed request's KV): the tokens are those
    of a clean pool. Decode gathers whole blocks, so the unused tail of each sequence's last block and the
    padding blocks of shorter sequences are read; they must be zeroed, since a boolean mask does not stop
    ``0 x nan``."""
    model, processor = tiny_llava
    prompts = mixed_prompts()
    sampling = SamplingParams(max_tokens=6, ignore_eos=True)
    config = EngineConfig(kv_cache_bytes=4 << 20, max_model_len=1024, block_size=16)

    def run(poison: bool) -> list[list[int]]:
        engine = LLMEngine(model, processor, zipvl=zipvl, engine=config)
        if poison:
            engine.runner.pool.keys.fill_(float("nan"))
            engine.runner.pool.values.fill_(float("nan"))
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, sampling)
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.token_ids
        return [done[f"r{i}"] for i in range(len(prompts))]

    assert run(poison=True) == run(poison=False)
