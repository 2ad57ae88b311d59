"""The block manager and the pool with small fake sequences (no model)."""

import pytest
import torch

from zipvl_ray.kv import KVCacheManager, KVLayout, KVPool, OutOfBlocks


@pytest.fixture
def layout():
    return KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)


def test_layout_bytes(layout):
    assert layout.token_bytes == 2 * 2 * 4 * 4
    assert layout.block_bytes == 4 * layout.token_bytes
    assert KVPool(layout, 5).nbytes == 5 * layout.block_bytes == KVPool(layout, 5).capacity_bytes


def test_prefill_allocation_is_per_layer(layout):
    kv = KVCacheManager(layout, num_blocks=20, max_num_seqs=4, max_model_len=64)
    kv.open("a")
    for layer, kept in enumerate([9, 1, 4]):
        slots = kv.allocate_tokens("a", layer, kept)
        assert slots.shape == (kept,) and len(set(slots.tolist())) == kept
    assert kv.seqs["a"].num_blocks == 3 + 1 + 1  # ceil(9/4) + ceil(1/4) + ceil(4/4)
    assert kv.used_bytes == 5 * layout.block_bytes
    kv.check_consistency()


def test_append_allocates_only_at_block_boundaries(layout):
    kv = KVCacheManager(layout, num_blocks=20, max_num_seqs=4, max_model_len=64)
    kv.open("a")
    for layer, kept in enumerate([4, 3, 1]):
        kv.allocate_tokens("a", layer, kept)
    assert kv.blocks_to_append(["a"]) == 1  # only layer 0 is full
    slots = kv.append_slots(["a"])
    assert slots.shape == (3, 1)
    assert kv.seqs["a"].lengths == [5, 4, 2]
    assert kv.blocks_to_append(["a"]) == 1  # now layer 1 is full
    kv.check_consistency()


def test_free_returns_everything_and_blocks_are_reused(layout):
    kv = KVCacheManager(layout, num_blocks=6, max_num_seqs=2, max_model_len=64)
    kv.open("a")
    kv.allocate_tokens("a", 0, 8)
    kv.allocate_tokens("a", 1, 8)
    used = set(kv.seqs["a"].tables[0] + kv.seqs["a"].tables[1])
    assert kv.free("a") == 4 and kv.num_used_blocks == 0
    kv.open("b")
    kv.allocate_tokens("b", 0, 16)
    assert set(kv.seqs["b"].tables[0]) & used  # freed blocks serve the next request
    kv.check_consistency()


def test_out_of_blocks(layout):
    kv = KVCacheManager(layout, num_blocks=2, max_num_seqs=2, max_model_len=64)
    kv.open("a")
    with pytest.raises(OutOfBlocks):
        kv.allocate_tokens("a", 0, 9)
    kv.allocate_tokens("a", 0, 8)
    with pytest.raises(OutOfBlocks):
        kv.append_slots(["a"])
    assert not kv.can_append(["a"])


def test_pool_roundtrip_and_gather_index(layout):
    pool = KVPool(layout, 10)
    kv = KVCacheManager(layout, num_blocks=10, max_num_seqs=4, max_model_len=64)
    data = {}
    for sid, n in [("a", 6), ("b", 2)]:
        kv.open(sid)
        slots = kv.allocate_tokens(sid, 1, n)
        keys = torch.randn(n, 2, 4)
        pool.write(slots, keys, -keys)
        data[sid] = keys
    lengths = [kv.seqs[s].lengths[1] for s in ("a", "b")]
    slots, valid = kv.gather_index(["a", "b"], 1, lengths)
    k, v = pool.gather(slots)
    assert valid.tolist() == [[True] * 6, [True] * 2 + [False] * 4]
    torch.testing.assert_close(k[0], data["a"])
    torch.testing.assert_close(k[1, :2], data["b"])
    torch.testing.assert_close(v[0], -data["a"])
    table = kv.block_table(["a", "b"], 1, 6)
    assert table.dtype == torch.int32 and table.shape == (2, 2)


def test_truncate_frees_trailing_blocks(layout):
    kv = KVCacheManager(layout, num_blocks=10, max_num_seqs=2, max_model_len=64)
    kv.open("a")
    kv.allocate_tokens("a", 0, 10)
    assert kv.truncate("a", 0, 5) == 1
    assert kv.seqs["a"].lengths[0] == 5 and len(kv.seqs["a"].tables[0]) == 2
    kv.check_consistency()


def test_rows_are_limited_by_max_num_seqs(layout):
    kv = KVCacheManager(layout, num_blocks=10, max_num_seqs=1, max_model_len=64)
    kv.open("a")
    with pytest.raises(OutOfBlocks):
        kv.open("b")
    kv.free("a")
    kv.open("b")


def test_invalid_lengths_are_refused_and_a_full_row_cannot_grow(layout):
    kv = KVCacheManager(layout, num_blocks=40, max_num_seqs=2, max_model_len=8)  # 3 blocks per layer row
    kv.open("a")
    with pytest.raises(ValueError, match="cannot allocate -3"):
        kv.allocate_tokens("a", 0, -3)
    for layer in range(layout.num_layers):
        kv.allocate_tokens("a", layer, 12)  # the whole row: 3 blocks of 4
    with pytest.raises(ValueError, match="0 <= new_length <= 12"):
        kv.truncate("a", 1, -1)
    used = kv.num_used_blocks
    with pytest.raises(OutOfBlocks, match="max_model_len"):
        kv.append_slots(["a"])
    assert kv.num_used_blocks == used and kv.seqs["a"].lengths == [12, 12, 12]  # nothing changed
    kv.check_consistency()
