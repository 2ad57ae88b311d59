"""The scheduler with small fake sequences and a real block manager (no model)."""

import torch

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.scheduler import Scheduler
from zipvl_ray.engine.sequence import Sequence
from zipvl_ray.engine.types import SamplingParams
from zipvl_ray.kv import KVCacheManager, KVLayout

BLOCK = 4
LAYERS = 2


def make_seq(request_id: str, prompt: int, max_tokens: int, generated: int = 0) -> Sequence:
    seq = Sequence(
        request_id=request_id,
        prompt_token_ids=list(range(prompt)),
        image_features=[],
        positions=torch.arange(prompt),
        next_position=prompt,
        sampling=SamplingParams(max_tokens=max_tokens),
        zipvl=ZipVLConfig(),
    )
    seq.output_token_ids = list(range(generated))
    return seq


def dense_predict(seq: Sequence, decode_tokens: int) -> int:
    """Every prompt token kept in every layer, block-rounded (what the engine predicts at r = 1)."""
    layout_block_bytes = 1
    return LAYERS * -(-(seq.num_prompt_tokens + decode_tokens) // BLOCK) * layout_block_bytes


def make_scheduler(num_blocks: int, headroom: int = 4) -> Scheduler:
    layout = KVLayout(num_layers=LAYERS, num_kv_heads=1, head_dim=1, block_size=BLOCK, dtype=torch.float32)
    kv = KVCacheManager(layout, num_blocks=num_blocks, max_num_seqs=8, max_model_len=256)
    block_bytes = layout.block_bytes
    config = EngineConfig(
        kv_cache_bytes=num_blocks * block_bytes, decode_headroom_tokens=headroom, max_num_seqs=8
    )
    return Scheduler(config, kv, lambda seq, n: dense_predict(seq, n) * block_bytes)


def test_headroom_is_capped_by_what_is_left_to_generate():
    scheduler = make_scheduler(64, headroom=4)
    assert scheduler.headroom(make_seq("a", 8, max_tokens=100)) == 4
    assert scheduler.headroom(make_seq("b", 8, max_tokens=2)) == 2


def test_a_preempted_sequence_reserves_the_tokens_it_will_replay():
    scheduler = make_scheduler(64, headroom=4)
    seq = make_seq("a", 8, max_tokens=40, generated=20)  # preempted after 20 tokens: num_fed = 0
    assert seq.replay_backlog() == 19  # the last one is fed by the next decode step, as for any sequence
    assert scheduler.headroom(seq) == 19 + 4
    seq.num_fed = 19  # replay done
    assert seq.replay_backlog() == 0 and scheduler.headroom(seq) == 4


def test_admission_counts_the_replay_backlog():
    # 8 prompt tokens + 4 headroom fit in 3 blocks per layer (6 of 8); with 19 tokens to replay they need 8 per
    # layer (16 > 8): a fresh request is admitted next to a running one, the preempted one waits.
    for generated, admitted in [(0, True), (20, False)]:
        scheduler = make_scheduler(8, headroom=4)
        scheduler.kv.open("running")
        for layer in range(LAYERS):
            scheduler.kv.allocate_tokens("running", layer, 1)
        scheduler.running.append(make_seq("running", 1, max_tokens=1, generated=1))
        scheduler.add(make_seq("a", 8, max_tokens=40, generated=generated))
        batch = scheduler._admit()
        assert [s.request_id for s in batch] == (["a"] if admitted else [])


def _saturated_scheduler(num_blocks: int, running_tokens: int, waiting_prompt: int) -> Scheduler:
    """One running sequence holding ``running_tokens`` per layer, one waiting prompt."""
    scheduler = make_scheduler(num_blocks, headroom=4)
    scheduler.kv.open("running")
    for layer in range(LAYERS):
        scheduler.kv.allocate_tokens("running", layer, running_tokens)
    scheduler.running.append(make_seq("running", running_tokens, max_tokens=40, generated=1))
    scheduler.add(make_seq("a", waiting_prompt, max_tokens=40))
    return scheduler


def test_admission_skips_the_reservation_sum_only_when_nothing_could_fit(monkeypatch):
    """The shortcut decides as the full rule: with the pool too full for the waiting prompt even without
    any headroom, nothing is admitted and the per-sequence reservation sum is not computed; otherwise it
    is, and admission follows it."""
    calls = []
    original = Scheduler.reserved_bytes
    monkeypatch.setattr(Scheduler, "reserved_bytes", lambda self: calls.append(1) or original(self))
    # 16 blocks = 8 per layer; 24 running tokens hold 6; a 12-token prompt needs 3 more: never fits
    full = _saturated_scheduler(16, running_tokens=24, waiting_prompt=12)
    assert full._admit() == [] and calls == []
    # an 8-token prompt needs 2 (fits without headroom) but 3 with it, beside the running one's growth
    # into a 7th block per layer (6 + 3 > 8): the sum is computed and says no
    tight = _saturated_scheduler(16, running_tokens=24, waiting_prompt=8)
    assert tight._admit() == [] and calls == [1]
    # with room to spare it is admitted
    roomy = _saturated_scheduler(32, running_tokens=24, waiting_prompt=8)
    assert [s.request_id for s in roomy._admit()] == ["a"] and calls == [1, 1]
    # nothing waiting: nothing to compute
    idle = _saturated_scheduler(32, running_tokens=24, waiting_prompt=8)
    idle.waiting.clear()
    assert idle._admit() == [] and calls == [1, 1]


def test_reserved_bytes_matches_a_per_layer_sum():
    """The array form of the reservation equals the sum over (sequence, layer) of the blocks ``headroom``
    more tokens would add, for random lengths, replay backlogs and a running sequence holding no KV."""
    gen = torch.Generator().manual_seed(1)
    scheduler = make_scheduler(512, headroom=4)
    kv = scheduler.kv
    for i in range(7):
        seq = make_seq(f"s{i}", 8, max_tokens=int(torch.randint(1, 30, (1,), generator=gen)))
        seq.output_token_ids = list(
            range(int(torch.randint(0, seq.sampling.max_tokens, (1,), generator=gen)))
        )
        seq.num_fed = int(torch.randint(0, max(1, len(seq.output_token_ids)), (1,), generator=gen))
        scheduler.running.append(seq)
        if i == 3:
            continue  # running but holding nothing (e.g. being preempted): reserves nothing
        kv.open(seq.request_id)
        for layer in range(LAYERS):
            n = int(torch.randint(0, 11, (1,), generator=gen))
            if n:
                kv.allocate_tokens(seq.request_id, layer, n)
    expected = 0
    for seq in scheduler.running:
        if seq.request_id in kv.seqs:
            held = kv.seqs[seq.request_id]
            future = sum(-(-(n + scheduler.headroom(seq)) // BLOCK) for n in held.lengths)
            expected += future - held.num_blocks
    assert expected > 0
    assert scheduler.reserved_bytes() == expected * kv.layout.block_bytes
    scheduler.running.clear()
    assert scheduler.reserved_bytes() == 0
