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


def test_block_gather_equals_token_gather(layout):
    """Decode reads whole blocks: the same tokens at the same offsets as the token-level gather, valid
    marking exactly the held ones, whatever order the blocks came in (freed and reused in between)."""
    pool = KVPool(layout, 32)
    kv = KVCacheManager(layout, num_blocks=32, max_num_seqs=4, max_model_len=64)
    kv.open("tmp")
    kv.allocate_tokens("tmp", 0, 12)
    for sid, n in [("a", 7), ("b", 2), ("c", 9)]:
        kv.open(sid)
        slots = kv.allocate_tokens(sid, 2, n)
        pool.write(slots, torch.randn(n, 2, 4), torch.randn(n, 2, 4))
    kv.free("tmp")  # its blocks come back in another order
    kv.open("d")
    pool.write(kv.allocate_tokens("d", 2, 11), torch.randn(11, 2, 4), torch.randn(11, 2, 4))
    new = kv.append_slots(["a", "b", "c", "d"])  # one more token in every layer of each
    pool.write(new[2], torch.randn(4, 2, 4), torch.randn(4, 2, 4))
    ids = ["a", "b", "c", "d"]
    lengths = kv.lengths(ids)[2]
    slots, valid = kv.gather_index(ids, 2, lengths)
    k_tok, v_tok = pool.gather(slots)
    tables, valid_blocks = kv.gather_blocks_index(ids, 2, lengths)
    k_blk, v_blk = pool.gather_blocks(tables)
    assert tables.shape == (4, 3) and k_blk.shape == (4, 12, 2, 4)
    assert valid_blocks[:, : valid.shape[1]].tolist() == valid.tolist()
    assert not valid_blocks[:, valid.shape[1] :].any()
    for b, n in enumerate(lengths):
        torch.testing.assert_close(k_blk[b, :n], k_tok[b, :n])
        torch.testing.assert_close(v_blk[b, :n], v_tok[b, :n])


def test_block_gather_reuses_and_grows_its_workspace(layout):
    """``gather_blocks`` writes into a workspace the pool keeps (no fresh buffer per decode layer): a
    smaller gather reuses it, a larger one grows it, and every result reads the right blocks."""
    pool = KVPool(layout, 8)
    pool.keys.copy_(torch.randn_like(pool.keys))
    pool.values.copy_(torch.randn_like(pool.values))
    big = torch.tensor([[0, 1, 2], [3, 4, 5]])
    k, v = pool.gather_blocks(big)
    torch.testing.assert_close(k, pool.keys[big.reshape(-1)].view(2, 3 * 4, 2, 4))
    torch.testing.assert_close(v, pool.values[big.reshape(-1)].view(2, 3 * 4, 2, 4))
    storage = k.untyped_storage().data_ptr()
    small = torch.tensor([[7], [6]])
    k2, v2 = pool.gather_blocks(small)
    assert k2.untyped_storage().data_ptr() == storage  # reused
    torch.testing.assert_close(k2, pool.keys[[7, 6]].view(2, 4, 2, 4))
    torch.testing.assert_close(v2, pool.values[[7, 6]].view(2, 4, 2, 4))
    larger = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    k3, _ = pool.gather_blocks(larger)
    torch.testing.assert_close(k3, pool.keys.view(2, 4 * 4, 2, 4))


def test_block_gather_zeroes_what_no_token_holds(layout):
    """With ``valid``, positions past a sequence's length read zeros, whatever the pool held there."""
    pool = KVPool(layout, 8)
    pool.keys.fill_(float("nan"))
    pool.values.fill_(float("inf"))
    tables = torch.tensor([[0, 1], [2, 3]])
    valid = torch.arange(8)[None, :] < torch.tensor([[5], [8]])
    k, v = pool.gather_blocks(tables, valid)
    assert k[0, 5:].eq(0).all() and v[0, 5:].eq(0).all()
    assert k[0, :5].isnan().all() and v[1].isinf().all()  # held positions are read as they are


def test_append_slots_layout(layout):
    """``append_slots`` returns ``(num_layers, B)``: the slot each layer's new token goes to, right after
    the layer's last token (a fresh block exactly when the last one was full)."""
    kv = KVCacheManager(layout, num_blocks=20, max_num_seqs=4, max_model_len=64)
    for sid, kept in [("a", [4, 3, 1]), ("b", [2, 8, 5])]:
        kv.open(sid)
        for layer, n in enumerate(kept):
            kv.allocate_tokens(sid, layer, n)
    before = {sid: [list(t) for t in kv.seqs[sid].tables] for sid in ("a", "b")}
    slots = kv.append_slots(["a", "b"])
    assert slots.shape == (3, 2) and slots.dtype == torch.long
    for b, (sid, kept) in enumerate([("a", [4, 3, 1]), ("b", [2, 8, 5])]):
        for layer, n in enumerate(kept):
            table = kv.seqs[sid].tables[layer]
            if n % layout.block_size == 0:
                assert len(table) == len(before[sid][layer]) + 1
            assert (
                slots[layer, b] == table[n // layout.block_size] * layout.block_size + n % layout.block_size
            )
        assert kv.seqs[sid].lengths == [n + 1 for n in kept]
    kv.check_consistency()


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn])
def test_layout_bytes_follow_the_dtype(dtype):
    """Token and block bytes from the dtype's item size (read without allocating a tensor), as a tensor of
    that dtype in the pool holds them."""
    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=4, block_size=4, dtype=dtype)
    assert layout.element_size == torch.empty((), dtype=dtype).element_size()
    pool = KVPool(layout, num_blocks=2)
    assert pool.keys.element_size() == layout.element_size
    assert pool.nbytes == 2 * layout.block_bytes == 2 * 4 * layout.token_bytes


def _reference_append(kv: KVCacheManager, seq_ids: list[str]) -> tuple[list[list[int]], list[int]]:
    """What one decode append must do, one (sequence, layer) at a time: the slot of each new token
    (``[layer][b]``) and the blocks it takes from the free list, in order."""
    free = list(kv.allocator._free)
    slots = [[0] * len(seq_ids) for _ in range(kv.layout.num_layers)]
    taken = []
    for b, sid in enumerate(seq_ids):
        seq = kv.seqs[sid]
        for layer, (length, table) in enumerate(zip(seq.lengths, seq.tables, strict=True)):
            block = table[-1] if length % kv.block_size else free.pop()
            if not length % kv.block_size:
                taken.append(block)
            slots[layer][b] = block * kv.block_size + length % kv.block_size
    return slots, taken


def test_append_slots_matches_a_per_token_reference(layout):
    """The vectorized decode append gives every (sequence, layer) the slot and the block a loop over them
    gives, in the same allocation order, over random lengths (empty layers, full blocks, partial ones)."""
    gen = torch.Generator().manual_seed(0)
    kv = KVCacheManager(layout, num_blocks=200, max_num_seqs=8, max_model_len=64)
    ids = [f"s{i}" for i in range(6)]
    for sid in ids:
        kv.open(sid)
        for layer in range(layout.num_layers):
            n = int(torch.randint(0, 13, (1,), generator=gen))
            if n:
                kv.allocate_tokens(sid, layer, n)
    for _ in range(9):  # across block boundaries
        before = [list(kv.seqs[s].lengths) for s in ids]
        expected_slots, expected_blocks = _reference_append(kv, ids)
        assert kv.blocks_to_append(ids) == len(expected_blocks)
        slots = kv.append_slots(ids)
        assert slots.tolist() == expected_slots
        assert [kv.seqs[s].lengths for s in ids] == [[n + 1 for n in row] for row in before]
        for b, sid in enumerate(ids):
            for layer in range(layout.num_layers):
                table = kv.seqs[sid].tables[layer]
                assert kv.block_tables[layer, kv.seqs[sid].row, : len(table)].tolist() == table
                assert slots[layer, b] // kv.block_size == table[-1]
        kv.check_consistency()


def test_append_slots_refuses_past_max_model_len_before_changing_anything(layout):
    kv = KVCacheManager(layout, num_blocks=50, max_num_seqs=2, max_model_len=8)  # 3 blocks per layer
    for sid, n in [("a", 4), ("b", 12)]:
        kv.open(sid)
        for layer in range(layout.num_layers):
            kv.allocate_tokens(sid, layer, n)
    free, lengths = kv.num_free_blocks, [list(kv.seqs[s].lengths) for s in "ab"]
    with pytest.raises(OutOfBlocks, match="'b' would exceed max_model_len"):
        kv.append_slots(["a", "b"])
    assert kv.num_free_blocks == free and [kv.seqs[s].lengths for s in "ab"] == lengths


def test_append_slots_edge_cases(layout):
    """An empty batch gives an empty ``(layers, 0)`` slot tensor; a sequence named twice is refused before
    anything changes (it would take a block per layer twice)."""
    kv = KVCacheManager(layout, num_blocks=20, max_num_seqs=2, max_model_len=64)
    empty = kv.append_slots([])
    assert empty.shape == (layout.num_layers, 0) and empty.dtype == torch.long
    assert kv.lengths([]) == [[] for _ in range(layout.num_layers)]
    kv.open("a")
    for layer in range(layout.num_layers):
        kv.allocate_tokens("a", layer, 4)
    free = kv.num_free_blocks
    with pytest.raises(ValueError, match="twice"):
        kv.append_slots(["a", "a"])
    assert kv.num_free_blocks == free and kv.seqs["a"].lengths == [4] * layout.num_layers
    assert kv.lengths(["a"]) == [[4]] * layout.num_layers


def test_extend_gives_the_slots_that_appends_would_and_is_all_or_nothing(layout):
    """``extend_slots(c)`` (a preempted sequence's replay) grows every layer as ``c`` appends would (the
    same lengths and block counts; block ids may differ) and returns the slots of the new positions, in
    order; out of blocks it changes nothing."""
    appended = KVCacheManager(layout, num_blocks=20, max_num_seqs=4, max_model_len=64)
    extended = KVCacheManager(layout, num_blocks=20, max_num_seqs=4, max_model_len=64)
    for kv in (appended, extended):
        kv.open("a")
        for layer, kept in enumerate([4, 3, 1]):
            kv.allocate_tokens("a", layer, kept)
    for _ in range(6):
        appended.append_slots(["a"])
    at_once = extended.extend_slots("a", 6)
    assert at_once.shape == (3, 6)
    assert extended.seqs["a"].lengths == appended.seqs["a"].lengths == [10, 9, 7]
    assert (
        [len(t) for t in extended.seqs["a"].tables]
        == [len(t) for t in appended.seqs["a"].tables]
        == [3, 3, 2]
    )
    for layer, start in enumerate([4, 3, 1]):
        assert torch.equal(at_once[layer], extended.layer_slots("a", layer, start, start + 6))
    assert len(set(at_once.reshape(-1).tolist())) == 18
    extended.check_consistency()

    before = ([list(t) for t in extended.seqs["a"].tables], list(extended.seqs["a"].lengths))
    free = extended.num_free_blocks
    with pytest.raises(OutOfBlocks, match="needs"):
        extended.extend_slots("a", 20)  # 5 more blocks in each of 3 layers, 12 free
    with pytest.raises(OutOfBlocks, match="max_model_len"):
        extended.extend_slots("a", 64)
    assert ([list(t) for t in extended.seqs["a"].tables], list(extended.seqs["a"].lengths)) == before
    assert extended.num_free_blocks == free
    extended.check_consistency()
