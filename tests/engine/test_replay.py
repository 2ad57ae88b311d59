"""A preempted sequence's generated tokens are fed back in one forward (a replay), which must write the KV
that its decode steps wrote: the invariant behind "a preempted request returns exactly its tokens"."""

import pytest
import torch

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine import LLMEngine, SamplingParams
from zipvl_ray.kv import OutOfBlocks
from zipvl_ray.models import load_model

from ..conftest import TINY_ARCHS
from .conftest import mixed_prompts

CONFIGS = {
    "dense": ZipVLConfig(tau=1.0),
    "tau0.9": ZipVLConfig(tau=0.9, probe_recent=8, probe_random=8),
    "max_keep_ratio0.3": ZipVLConfig(max_keep_ratio=0.3),
    "decode_compress4": ZipVLConfig(tau=0.6, probe_recent=8, probe_random=8, decode_compress_interval=4),
    "decode_compress4_dense0": ZipVLConfig(
        tau=0.6, probe_recent=8, probe_random=8, decode_compress_interval=4, dense_layers=[0]
    ),
}
GENERATED = 14  # 13 fed back: three compression boundaries at interval 4, and a partial chunk


@pytest.fixture(scope="module", params=TINY_ARCHS)
def arch(request):
    return load_model(request.param)


def held_kv(engine, request_id):
    """Per layer, the keys and values ``request_id`` holds, ``(L_l, Hkv, d)`` each."""
    runner = engine.runner
    seq = runner.kv.seqs[request_id]
    return [
        runner.pool.gather(runner.kv.layer_slots(request_id, layer, 0, length))
        for layer, length in enumerate(seq.lengths)
    ]


def run_until(engine, request_id, generated):
    while len(engine.sequences[request_id].output_token_ids) < generated:
        engine.step()


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_a_replay_writes_the_kv_its_decode_steps_wrote(arch, config_name):
    model, processor = arch
    engine = LLMEngine(
        model, processor, zipvl=CONFIGS[config_name], engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    engine.add_request("r", mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=40, ignore_eos=True))
    run_until(engine, "r", GENERATED)
    seq = engine.sequences["r"]
    assert seq.num_fed == GENERATED - 1
    decoded = held_kv(engine, "r")
    lengths = list(engine.runner.kv.seqs["r"].lengths)
    tokens = list(seq.output_token_ids)

    assert engine.scheduler.preempt_newest() is seq and seq.num_fed == 0
    engine.step()  # the recomputed prefill, and the replay in the same step
    assert seq.num_fed == GENERATED - 1 and seq.output_token_ids == tokens  # nothing sampled, nothing left
    assert engine.runner.kv.seqs["r"].lengths == lengths
    for (k_dec, v_dec), (k_rep, v_rep) in zip(decoded, held_kv(engine, "r"), strict=True):
        torch.testing.assert_close(k_rep, k_dec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_rep, v_dec, rtol=1e-4, atol=1e-4)
    assert engine.stats().replayed_tokens == GENERATED - 1
    engine.runner.kv.check_consistency()


def test_a_replay_out_of_blocks_falls_back_to_the_decode_steps(tiny_llava, monkeypatch):
    """When the pool cannot hold the whole backlog at once, the decode steps feed the rest back one by one
    (and preempt if they must), as before replays existed: the answer is unchanged."""
    model, processor = tiny_llava
    prompt, sampling = mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=20, ignore_eos=True)

    def answer(refuse_replays):
        engine = LLMEngine(
            model, processor, zipvl=CONFIGS["tau0.9"], engine=EngineConfig(kv_cache_bytes=8 << 20)
        )
        if refuse_replays:

            def extend_slots(seq_id, num_tokens):
                raise OutOfBlocks("refused by the test")

            monkeypatch.setattr(engine.runner.kv, "extend_slots", extend_slots)
        engine.add_request("r", prompt, sampling)
        run_until(engine, "r", 8)
        engine.scheduler.preempt_newest()
        outs = []
        while engine.has_unfinished():
            outs += engine.step()
        assert engine.stats().replayed_tokens == (0 if refuse_replays else 7)
        return outs[-1].token_ids

    assert answer(refuse_replays=True) == answer(refuse_replays=False)


def test_a_long_backlog_is_replayed_over_several_steps():
    """At most ``max_num_batched_tokens`` replayed tokens per step (a prefill's worth): the rest continues at
    the next steps, which still write the KV the decode steps wrote."""
    model, processor = load_model("tiny-llava")
    engine = LLMEngine(
        model,
        processor,
        zipvl=CONFIGS["tau0.9"],
        engine=EngineConfig(kv_cache_bytes=8 << 20, max_num_batched_tokens=16),
    )
    engine.add_request("r", mixed_prompts(n_images=(0,))[0], SamplingParams(max_tokens=60, ignore_eos=True))
    run_until(engine, "r", 41)
    decoded, tokens = held_kv(engine, "r"), list(engine.sequences["r"].output_token_ids)
    seq = engine.scheduler.preempt_newest()
    fed = []
    for _ in range(3):
        engine.step()
        fed.append(seq.num_fed)
    # 40 to feed back: 16 in the prefill step; each decode step replays 16, then 7, and feeds one more
    # itself (as it did before replays), sampling once the backlog is gone.
    assert fed == [16, 33, 41]
    assert seq.output_token_ids[:41] == tokens and len(seq.output_token_ids) == 42
    for (k_dec, v_dec), (k_rep, v_rep) in zip(decoded, held_kv(engine, "r"), strict=True):
        torch.testing.assert_close(k_rep[: len(k_dec)], k_dec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_rep[: len(v_dec)], v_dec, rtol=1e-4, atol=1e-4)


def test_a_replay_that_runs_out_of_blocks_partway_leaves_the_rest_to_the_decode_steps(
    tiny_llava, monkeypatch
):
    """Chunks already replayed stay; the rest is fed back by the decode steps; the answer is unchanged."""
    model, processor = tiny_llava
    prompt, sampling = mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=24, ignore_eos=True)
    reference = LLMEngine(
        model, processor, zipvl=CONFIGS["tau0.9"], engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    reference.add_request("r", prompt, sampling)
    while reference.has_unfinished():
        outs = reference.step()
    expected = outs[-1].token_ids

    engine = LLMEngine(model, processor, zipvl=CONFIGS["tau0.9"], engine=EngineConfig(kv_cache_bytes=8 << 20))
    monkeypatch.setattr(engine.runner, "max_replay_tokens", lambda seq: 3)
    real_extend, calls = engine.runner.kv.extend_slots, []

    def extend_slots(seq_id, num_tokens):
        calls.append(num_tokens)
        if len(calls) > 2:
            raise OutOfBlocks("refused by the test")
        return real_extend(seq_id, num_tokens)

    monkeypatch.setattr(engine.runner.kv, "extend_slots", extend_slots)
    engine.add_request("r", prompt, sampling)
    run_until(engine, "r", 12)
    seq = engine.scheduler.preempt_newest()
    engine.step()
    assert seq.num_fed == 6 and engine.stats().replayed_tokens == 6  # two chunks of 3, then refused
    while engine.has_unfinished():
        outs = engine.step()
    assert outs[-1].token_ids == expected
    engine.runner.kv.check_consistency()


@pytest.mark.parametrize("config_name", ["dense", "tau0.9"])
def test_in_bf16_a_replay_matches_decode_up_to_rounding(config_name):
    """A c-token forward rounds differently from c one-token forwards: in bf16 the replayed KV is the decoded
    KV to bf16 precision (about one unit in the last place), with the same lengths. (Under decode compression
    a near-tie can then keep another token: docs/engine.md says so.)"""
    model, processor = load_model("tiny-llava", dtype=torch.bfloat16)
    engine = LLMEngine(
        model, processor, zipvl=CONFIGS[config_name], engine=EngineConfig(kv_cache_bytes=8 << 20)
    )
    engine.add_request("r", mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=40, ignore_eos=True))
    run_until(engine, "r", GENERATED)
    decoded, lengths = held_kv(engine, "r"), list(engine.runner.kv.seqs["r"].lengths)
    engine.scheduler.preempt_newest()
    engine.step()
    assert engine.runner.kv.seqs["r"].lengths == lengths
    for (k_dec, v_dec), (k_rep, v_rep) in zip(decoded, held_kv(engine, "r"), strict=True):
        assert k_rep.dtype == torch.bfloat16
        torch.testing.assert_close(k_rep, k_dec, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(v_rep, v_dec, rtol=2e-2, atol=2e-2)


def test_replay_chunks_are_cut_to_the_score_budget(tiny_llava, monkeypatch):
    """``REPLAY_SCORE_BYTES`` bounds ``heads x chunk x layer length x 4``: a budget for 5 tokens replays a
    13-token backlog in chunks of 5, 5 and 3, which still write the decoded KV."""
    model, processor = tiny_llava
    engine = LLMEngine(model, processor, zipvl=CONFIGS["tau0.9"], engine=EngineConfig(kv_cache_bytes=8 << 20))
    engine.add_request("r", mixed_prompts(n_images=(2,))[0], SamplingParams(max_tokens=40, ignore_eos=True))
    run_until(engine, "r", GENERATED)
    decoded = held_kv(engine, "r")
    longest = max(engine.runner.kv.seqs["r"].lengths)  # kept + 13 fed: what the replay will reach
    seq = engine.scheduler.preempt_newest()
    heads = engine.runner.geometry.num_heads
    monkeypatch.setattr(engine.runner, "REPLAY_SCORE_BYTES", 4 * heads * longest * 5)
    chunks, real_replay = [], engine.runner.replay
    monkeypatch.setattr(engine.runner, "replay", lambda s, n: (chunks.append(n), real_replay(s, n)))
    engine.step()
    assert chunks == [5, 5, 3] and seq.num_fed == GENERATED - 1
    for (k_dec, v_dec), (k_rep, v_rep) in zip(decoded, held_kv(engine, "r"), strict=True):
        torch.testing.assert_close(k_rep, k_dec, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(v_rep, v_dec, rtol=1e-4, atol=1e-4)
