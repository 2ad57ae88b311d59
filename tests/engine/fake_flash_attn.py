"""A pure-torch stand-in for the ``flash_attn`` package (the two functions the engine calls).

It follows flash-attn 2's documented signatures and tensor layouts, so the engine's flash code
paths (packed varlen prefill, paged decode with per-layer block tables) can be checked on CPU
against the SDPA paths. It is a test double of an optional GPU dependency, never a backend.
"""

import torch
import torch.nn.functional as F


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False, **_
):
    """q: (total_q, H, d); k, v: (total_k, Hkv, d); cu_seqlens: int32 (batch + 1,)."""
    assert cu_seqlens_q.dtype == torch.int32 and torch.equal(cu_seqlens_q, cu_seqlens_k)
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        assert stop - start <= max_seqlen_q
        o = F.scaled_dot_product_attention(
            q[start:stop].transpose(0, 1),
            k[start:stop].transpose(0, 1),
            v[start:stop].transpose(0, 1),
            is_causal=causal,
            scale=softmax_scale,
            enable_gqa=q.shape[1] != k.shape[1],
        )
        out[start:stop] = o.transpose(0, 1)
    return out


def flash_attn_with_kvcache(
    q,
    k_cache,
    v_cache,
    k=None,
    v=None,
    cache_seqlens=None,
    block_table=None,
    softmax_scale=None,
    causal=False,
    **_,
):
    """q: (B, Sq, H, d); k_cache, v_cache: (num_blocks, page, Hkv, d); block_table: int32 (B, max_blocks).

    With ``causal`` and ``Sq > 1`` the mask is aligned to the bottom right, as flash-attn documents: query
    ``i`` sees the first ``seqlen - Sq + i + 1`` keys."""
    assert k is None and v is None  # the engine writes the new token itself
    assert block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    page = k_cache.shape[1]
    assert page % 256 == 0, "Paged KV cache block size must be divisible by 256"
    outs = []
    for b in range(q.shape[0]):
        n = int(cache_seqlens[b])
        blocks = block_table[b, : -(-n // page)].long()
        keys = k_cache[blocks].reshape(-1, *k_cache.shape[2:])[:n]
        values = v_cache[blocks].reshape(-1, *v_cache.shape[2:])[:n]
        sq = q.shape[1]
        mask = None
        if causal and sq > 1:
            mask = torch.ones(sq, n, dtype=torch.bool).tril(diagonal=n - sq)
        o = F.scaled_dot_product_attention(
            q[b].transpose(0, 1),
            keys.transpose(0, 1),
            values.transpose(0, 1),
            attn_mask=mask,
            scale=softmax_scale,
            enable_gqa=q.shape[2] != k_cache.shape[2],
        )
        outs.append(o.transpose(0, 1))
    return torch.stack(outs)
