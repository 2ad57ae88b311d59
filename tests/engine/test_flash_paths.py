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


def test_a_replay_under_paged_flash_writes_the_decoded_kv(tiny_llava, fake_flash, monkeypatch):
    """Under paged flash-attn a replay chunk attends through ``flash_attn_with_kvcache`` (causal, aligned to
    the bottom right, no score matrix): the KV it writes is the KV the decode steps wrote, and the answer
    is the one an uninterrupted run gives."""
    import torch

    from zipvl_ray.engine import LLMEngine

    model, processor = tiny_llava
    prompt, sampling = mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=24, ignore_eos=True)

    def engine():
        eng = LLMEngine(
            model,
            processor,
            zipvl=ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8),
            engine=EngineConfig(kv_cache_bytes=16 << 20, block_size=256),
        )
        eng.runner.backend, eng.runner.paged_flash = "flash", True
        eng.add_request("r", prompt, sampling)
        return eng

    def held(eng):
        runner = eng.runner
        return [
            runner.pool.gather(runner.kv.layer_slots("r", layer, 0, length))
            for layer, length in enumerate(runner.kv.seqs["r"].lengths)
        ]

    uninterrupted = engine()
    while uninterrupted.has_unfinished():
        outs = uninterrupted.step()
    expected = outs[-1].token_ids

    eng = engine()
    while len(eng.sequences["r"].output_token_ids) < 14:
        eng.step()
    decoded = held(eng)
    seq = eng.scheduler.preempt_newest()
    chunks = []
    real = fake_flash_attn.flash_attn_with_kvcache

    def spy(q, *args, **kwargs):
        chunks.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(fake_flash_attn, "flash_attn_with_kvcache", spy)
    eng.step()
    assert seq.num_fed == 13 and set(chunks) == {13}  # one 13-token chunk per layer, through flash
    for (k_dec, v_dec), (k_rep, v_rep) in zip(decoded, held(eng), strict=True):
        torch.testing.assert_close(k_rep, k_dec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_rep, v_dec, rtol=1e-4, atol=1e-4)
    while eng.has_unfinished():
        outs = eng.step()
    assert outs[-1].token_ids == expected


def test_an_interval_of_one_compresses_nothing_and_keeps_the_flash_paths(tiny_llava, fake_flash, monkeypatch):
    """``decode_compress_interval: 1`` would re-score a window of one token (a no-op): it must not send
    decode and replay to the gather path (where a replay chunk's scores are materialised) under paged
    flash-attn. Every attention goes through flash_attn_with_kvcache, and the answer is unchanged."""
    from zipvl_ray.engine import LLMEngine

    model, processor = tiny_llava
    prompt, sampling = mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=20, ignore_eos=True)
    config = ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8, decode_compress_interval=1)

    def run(flash):
        eng = LLMEngine(
            model, processor, zipvl=config, engine=EngineConfig(kv_cache_bytes=16 << 20, block_size=256)
        )
        if flash:
            eng.runner.backend, eng.runner.paged_flash = "flash", True
        eng.add_request("r", prompt, sampling)
        while len(eng.sequences["r"].output_token_ids) < 10:
            eng.step()
        eng.scheduler.preempt_newest()
        while eng.has_unfinished():
            outs = eng.step()
        return outs[-1].token_ids

    calls = []
    real = fake_flash_attn.flash_attn_with_kvcache
    monkeypatch.setattr(
        fake_flash_attn,
        "flash_attn_with_kvcache",
        lambda q, *a, **k: (calls.append(q.shape[1]), real(q, *a, **k))[1],
    )
    gathered = []
    import zipvl_ray.kv.pool as pool_module

    real_gather = pool_module.KVPool.gather_blocks
    monkeypatch.setattr(
        pool_module.KVPool,
        "gather_blocks",
        lambda self, *a, **k: (gathered.append(1), real_gather(self, *a, **k))[1],
    )
    with_flash = run(flash=True)
    assert calls and 9 in calls and not gathered  # decode steps (1) and the 9-token replay, all through flash
    assert with_flash == run(flash=False)
