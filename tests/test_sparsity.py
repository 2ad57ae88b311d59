"""Invariants of the pure-torch ZipVL functions against brute-force references."""

import math

import pytest
import torch

from zipvl_ray.config import ZipVLConfig
from zipvl_ray.sparsity import (
    adaptive_count,
    attention_backend,
    attention_flops_reduction,
    gather_causal_attention,
    gather_positions,
    masked_dense_attention,
    probe_attention_scores,
    probe_block_size,
    probe_row_counts,
    select_important,
    select_probes,
    sparse_causal_attention,
    zipvl_select,
)


def rand_qkv(n=50, heads=4, kv_heads=2, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, n, dim, generator=g, dtype=dtype)
    k = torch.randn(kv_heads, n, dim, generator=g, dtype=dtype)
    v = torch.randn(kv_heads, n, dim, generator=g, dtype=dtype)
    return q, k, v


def full_causal_attention_map(q, k, scaling):
    group = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(group, 0)
    logits = (q.double() @ kk.double().transpose(1, 2)) * scaling
    n = q.shape[1]
    logits.masked_fill_(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(logits, -1)  # (H, n, n)


@pytest.mark.parametrize("n", [1, 5, 128, 300])
def test_probes_recent_plus_random(n):
    probes = select_probes(n, 64, 64, seed=3, layer_idx=2)
    if n <= 128:
        assert probes.tolist() == list(range(n))
    else:
        assert probes.numel() == 128
        assert probes.tolist()[-64:] == list(range(n - 64, n))
        assert bool((probes[:64] < n - 64).all())
        assert bool((probes[1:] > probes[:-1]).all())  # ascending, no duplicates


def test_probes_are_seedable_and_deterministic():
    a = select_probes(1000, 64, 64, seed=1, layer_idx=0)
    assert torch.equal(a, select_probes(1000, 64, 64, seed=1, layer_idx=0))
    assert not torch.equal(a, select_probes(1000, 64, 64, seed=2, layer_idx=0))
    assert not torch.equal(a, select_probes(1000, 64, 64, seed=1, layer_idx=1))


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2), (8, 1)])
def test_all_probe_scores_equal_exact_column_sums(heads, kv_heads):
    q, k, _ = rand_qkv(n=60, heads=heads, kv_heads=kv_heads)
    scaling = 16**-0.5
    probes = torch.arange(60)
    a = probe_attention_scores(q, k, probes, scaling)
    exact = full_causal_attention_map(q, k, scaling).sum(dim=(0, 1))
    torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-5)
    assert math.isclose(a.sum().item(), heads * 60, rel_tol=1e-5)


def test_probe_scores_chunked_over_probes_equal_unchunked():
    q, k, _ = rand_qkv(n=200, heads=8, kv_heads=4)
    probes = select_probes(200, 16, 16)
    full = probe_attention_scores(q, k, probes, 0.25)
    chunked = probe_attention_scores(q, k, probes, 0.25, chunk_bytes=1)
    torch.testing.assert_close(full, chunked)


def test_subset_probe_scores_equal_rows_of_the_exact_map():
    q, k, _ = rand_qkv(n=80)
    probes = torch.tensor([3, 10, 40, 79])
    a = probe_attention_scores(q, k, probes, 0.25)
    exact = full_causal_attention_map(q, k, 0.25)[:, probes].sum(dim=(0, 1))
    torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-6)


def brute_force_count(scores, tau):
    total = scores.sum().item()
    for p in range(1, scores.numel() + 1):
        if torch.sort(scores, descending=True).values[:p].sum().item() >= tau * total - 1e-6:
            return p
    return scores.numel()


@pytest.mark.parametrize("tau", [0.5, 0.9, 0.975, 0.999, 1.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adaptive_count_matches_brute_force(tau, seed):
    scores = torch.rand(97, generator=torch.Generator().manual_seed(seed)) ** 4
    expected = 97 if tau == 1.0 else brute_force_count(scores, tau)
    assert adaptive_count(scores, tau) == expected


@pytest.mark.parametrize("tau", [0.975, 0.9999, 0.99999])
def test_adaptive_count_is_exact_on_long_prompts_near_tau_one(tau):
    """The running sum is float64: in fp32 it drifted by a few tokens at n = 32K, tau = 0.99999."""
    scores = torch.rand(32_768, generator=torch.Generator().manual_seed(7)) ** 4
    ordered = torch.sort(scores.double(), descending=True).values.cumsum(0)
    expected = int(torch.searchsorted(ordered, ordered[-1] * tau).item()) + 1
    assert adaptive_count(scores, tau) == expected


def test_probe_row_counts():
    probes = torch.tensor([2, 5, 9])
    c = probe_row_counts(10, probes, num_heads=2)
    assert c.tolist() == [6, 6, 6, 4, 4, 4, 2, 2, 2, 2]
    assert probe_row_counts(4, torch.arange(4), 1, "causal_length").tolist() == [4, 3, 2, 1]


@pytest.mark.parametrize("p", [1, 5, 30, 50])
def test_selection_equals_brute_force_topk_of_normalized_scores(p):
    q, k, _ = rand_qkv(n=50)
    probes = torch.arange(50)
    normalized = probe_attention_scores(q, k, probes, 0.25) / probe_row_counts(50, probes, 4)
    kept, guard = select_important(normalized, p, keep_last=False)
    brute = sorted(sorted(range(50), key=lambda j: -normalized[j].item())[:p])
    assert kept.tolist() == brute and not guard


def test_keep_last_guard_adds_the_last_position():
    scores = torch.tensor([5.0, 4.0, 3.0, 0.1])
    kept, guard = select_important(scores, 2, keep_last=True)
    assert kept.tolist() == [0, 1, 3] and guard
    kept, guard = select_important(scores, 2, keep_last=True, limit=2)  # a hard budget: replace instead
    assert kept.tolist() == [0, 3] and guard
    kept, guard = select_important(torch.tensor([0.1, 4.0, 3.0, 5.0]), 2)
    assert kept.tolist() == [1, 3] and not guard


@pytest.mark.parametrize("kept", [[0, 3, 4, 9, 10, 29], list(range(30)), [29], list(range(0, 30, 2)) + [29]])
@pytest.mark.parametrize("group", [1, 2])
def test_sparse_attention_equals_masked_dense_attention(kept, group):
    q, k, v = rand_qkv(n=30, heads=4, kv_heads=4 // group)
    kept = torch.tensor(kept)
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    sparse = sparse_causal_attention(qt, kt, vt, kept, 0.25)
    # Independent reference: explicit softmax over the masked map, in float64.
    kk = kt.double().repeat_interleave(group, 1)
    vv = vt.double().repeat_interleave(group, 1)
    logits = torch.einsum("qhd,khd->hqk", qt.double(), kk) * 0.25
    keep = torch.zeros(30, dtype=torch.bool)
    keep[kept] = True
    allowed = torch.ones(30, 30, dtype=torch.bool).tril() & keep[None, :]
    logits = logits.masked_fill(~allowed, float("-inf"))
    ref = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1).nan_to_num(0.0), vv)
    torch.testing.assert_close(sparse[kept].double(), ref[kept], rtol=1e-5, atol=1e-6)
    assert bool((sparse[~keep] == 0).all())
    torch.testing.assert_close(sparse, masked_dense_attention(qt, kt, vt, kept, 0.25), rtol=1e-5, atol=1e-6)


def test_sparse_attention_bf16():
    q, k, v = rand_qkv(n=64, dtype=torch.bfloat16)
    kept = torch.arange(0, 64, 3)
    kept = torch.cat([kept, torch.tensor([63])]).unique()
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    a = sparse_causal_attention(qt, kt, vt, kept, 0.25)
    b = masked_dense_attention(qt.float(), kt.float(), vt.float(), kept, 0.25)
    torch.testing.assert_close(a.float(), b, rtol=2e-2, atol=2e-2)


def planted_qkv(n=400, heads=4, dim=32, important_frac=0.1, region=0.2, strength=6.0, seed=0):
    """Keys built so that a known 10% of the tokens (the first one, like an attention sink, and others
    early in the prompt, like image tokens) draw about 99% of the attention of every query."""
    g = torch.Generator().manual_seed(seed)
    n_imp, hi = int(n * important_frac), int(n * region)
    important = torch.cat(
        [torch.tensor([0]), torch.sort(torch.randperm(hi - 1, generator=g)[: n_imp - 1] + 1).values]
    )
    direction = torch.randn(dim, generator=g)
    direction /= direction.norm()
    k = 0.1 * torch.randn(1, n, dim, generator=g)
    k[0, important] += strength * direction
    q = 0.1 * torch.randn(heads, n, dim, generator=g) + strength * direction
    v = torch.randn(1, n, dim, generator=g)
    return q, k, v, important


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_planted_important_tokens_are_found_by_probes(seed):
    """tau = 0.975 may drop tokens worth up to 1.5% of the mass here; each planted token holds about
    2.5%, so ZipVL (64 recent + 64 random probes, not the full map) must keep all of them."""
    q, k, v, important = planted_qkv(seed=seed)
    n = q.shape[1]
    scaling = 32**-0.5
    mass = full_causal_attention_map(q, k, scaling).sum(dim=(0, 1))
    assert mass[important].sum() / mass.sum() >= 0.99  # the planted tokens hold 99% of the mass
    sel = zipvl_select(q, k, ZipVLConfig(tau=0.975, seed=seed), scaling, layer_idx=0)
    assert set(important.tolist()) <= set(sel.kept.tolist())
    assert sel.num_kept < 0.2 * n


def test_max_keep_ratio_caps_count():
    q, k, _ = rand_qkv(n=101)
    sel = zipvl_select(q, k, ZipVLConfig(tau=0.999, max_keep_ratio=0.3, probe_recent=8, probe_random=8), 0.25)
    assert sel.num_kept <= math.ceil(0.3 * 101) and sel.kept[-1].item() == 100
    sel = zipvl_select(q, k, ZipVLConfig(tau=0.5, min_keep_ratio=0.9), 0.25)
    assert sel.num_kept >= math.ceil(0.9 * 101)


def test_dense_layer_and_disabled_keep_everything():
    q, k, _ = rand_qkv(n=40)
    assert zipvl_select(q, k, ZipVLConfig(tau=0.5, dense_layers=[3]), 0.25, layer_idx=3).num_kept == 40
    assert zipvl_select(q, k, ZipVLConfig(tau=0.5, enabled=False), 0.25).num_kept == 40
    assert zipvl_select(q, k, ZipVLConfig(tau=1.0), 0.25).num_kept == 40


def test_random_select_metric_keeps_same_count():
    q, k, _ = rand_qkv(n=200)
    a = zipvl_select(q, k, ZipVLConfig(tau=0.8, keep_last=False), 0.25)
    b = zipvl_select(q, k, ZipVLConfig(tau=0.8, keep_last=False, select_metric="random"), 0.25)
    assert a.num_kept == b.num_kept and not torch.equal(a.kept, b.kept)


def test_backend_choice_on_cpu():
    assert attention_backend(torch.device("cpu"), torch.bfloat16) == "sdpa"
    with pytest.raises(RuntimeError, match="flash"):
        attention_backend(torch.device("cpu"), torch.bfloat16, "flash")


def test_flops_reduction():
    assert attention_flops_reduction([50, 50], 100) == pytest.approx(0.75)
    assert attention_flops_reduction([100], 100) == 0.0


# ---------------------------------------------------------------------------------------------------
# Fast-path helpers (performance work): same values as the plain operations, whatever the layout
# ---------------------------------------------------------------------------------------------------


def token_major(t):
    """``(H, n, d)`` values stored token-major, as transformers' projections leave them."""
    return t.transpose(0, 1).contiguous().transpose(0, 1)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_gather_positions_equals_index_select(dim, layout):
    t = torch.randn(6, 40, 8)
    if layout == "transposed":
        t = token_major(t)
    index = torch.tensor([0, 3, 5] if dim == 0 else [1, 2, 17, 39])
    assert torch.equal(gather_positions(t, index, dim), t.index_select(dim, index))


@pytest.mark.parametrize("chunk_bytes", [1, 3 * 4 * 4 * 300, 2**30])
def test_probe_scores_blocks_and_layouts_match_the_exact_map(chunk_bytes):
    q, k, _ = rand_qkv(n=300, heads=4, kv_heads=2)
    probes = select_probes(300, 16, 24, seed=1)
    exact = full_causal_attention_map(q, k, 0.25)[:, probes].sum(dim=(0, 1))
    for qq, kk in ((q, k), (token_major(q), token_major(k))):
        a = probe_attention_scores(qq, kk, probes, 0.25, chunk_bytes=chunk_bytes)
        torch.testing.assert_close(a.double(), exact, rtol=1e-5, atol=1e-5)


def test_probe_block_size():
    cpu = torch.device("cpu")
    assert probe_block_size(16, 16384, cpu, 2**40) == 8  # about 128 score rows per block on CPU
    assert probe_block_size(16, 16384, cpu, 1) == 1  # never below one probe
    assert probe_block_size(16, 1000, torch.device("meta"), 16 * 1000 * 4 * 5) == 5  # elsewhere: bytes only


@pytest.mark.parametrize("kept", [[0, 3, 4, 9, 29], list(range(30))])
def test_gather_causal_attention_returns_kept_rows_and_kv(kept):
    q, k, v = rand_qkv(n=30, heads=4, kv_heads=2)
    qt, kt, vt = (
        token_major(q).transpose(0, 1),
        token_major(k).transpose(0, 1),
        token_major(v).transpose(0, 1),
    )
    kept = torch.tensor(kept)
    out_kept, k_kept, v_kept = gather_causal_attention(qt, kt, vt, kept, 0.25)
    full = sparse_causal_attention(qt, kt, vt, kept, 0.25)
    torch.testing.assert_close(out_kept, full[kept])
    assert torch.equal(k_kept, kt[kept]) and torch.equal(v_kept, vt[kept])


@pytest.mark.parametrize("n, tau, exact", [(25, 0.28, 7), (50, 0.56, 28), (100, 0.07, 7), (10, 0.3, 3)])
def test_the_count_over_tied_scores_is_the_exact_one(n, tau, exact):
    """Equal scores: the mass of ``k`` tokens is ``k / n``, so the count is ``ceil(tau * n)`` exactly; the
    rounding of ``total * tau`` used to ask for one token more when ``tau * n`` is whole (a review)."""
    assert adaptive_count(torch.ones(n), tau) == exact


def test_a_last_position_tied_with_the_lowest_pick_is_kept_without_the_guard():
    """``topk`` picks freely among ties; when the last position ties with the lowest pick, it takes that
    place: ``p`` tokens, no guard (it used to add a ``p + 1``-th token and count a guard firing)."""
    kept, guard = select_important(torch.ones(10), 3)
    assert kept.tolist()[-1] == 9 and kept.numel() == 3 and not guard
    scores = torch.tensor([5.0, 4.0, 3.0, 1.0, 1.0])
    kept, guard = select_important(scores, 3)  # the last is below the third pick: the guard adds it
    assert kept.tolist() == [0, 1, 2, 4] and guard
