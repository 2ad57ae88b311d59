"""ZipVL's token selection and sparse attention, in plain torch.

Everything here works on one sequence at a time, without padding, in the layout transformers hands
to an attention function with the batch dimension removed: queries ``(num_heads, n, head_dim)``,
keys and values ``(num_kv_heads, n, head_dim)`` (grouped-query heads are not repeated). Nothing here
imports transformers; :mod:`zipvl_ray.attention` and the paged engine call these functions.

The steps follow ``docs/algorithm.md`` (and the paper, arXiv 2410.08584):

1. :func:`select_probes` - the last ``probe_recent`` positions plus ``probe_random`` random earlier ones;
2. :func:`probe_attention_scores` - causal softmax attention of the probes over all keys, in fp32,
   summed over heads and probe rows (the accumulated score ``a``);
3. :func:`probe_row_counts` - how many (probe row, head) pairs see each key (for normalization);
4. :func:`adaptive_count` - the fewest tokens whose accumulated score reaches ``tau`` of the total;
5. :func:`select_important` - the top-``p`` normalized scores, ascending, last position guaranteed;
6. :func:`sparse_causal_attention` - causal attention among the kept tokens only.

:func:`zipvl_select` chains 1-5 under a :class:`~zipvl_ray.config.ZipVLConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from zipvl_ray.config import ZipVLConfig

#: Upper bound (bytes) of the fp32 probe-score block materialised at once; larger inputs are
#: processed in chunks of consecutive probes (every head at once).
PROBE_SCORE_CHUNK_BYTES = 256 * 1024 * 1024

#: Score rows (probes x query heads) per block on CPU. A block of about 128 rows over 16K keys (8 MiB
#: in fp32) stays in the last-level cache between the matmul, the softmax and the column sum; one big
#: block is about 3.5x slower at 16K tokens (measured: ``docs/performance.md``).
PROBE_SCORE_CPU_ROWS = 128


@dataclass(frozen=True, slots=True)
class Selection:
    """The important set ZipVL chose for one sequence in one layer.

    Attributes
    ----------
    kept : torch.LongTensor
        Kept positions, shape ``(p,)``, strictly ascending, on the device of the inputs.
    n : int
        Number of candidate positions (prompt tokens of this sequence).
    adaptive_count : int
        The count ``p`` from the threshold before the ratio bounds were applied.
    guard_fired : bool
        True when the last position was not among the top-``p`` scores and was forced in.
    """

    kept: torch.Tensor
    n: int
    adaptive_count: int
    guard_fired: bool = False

    @property
    def num_kept(self) -> int:
        return int(self.kept.numel())

    @property
    def keep_ratio(self) -> float:
        return self.num_kept / max(self.n, 1)


def dense_selection(n: int, device: torch.device | str | None = None) -> Selection:
    """A selection that keeps all ``n`` positions (tau = 1, disabled ZipVL or a dense layer)."""
    return Selection(kept=torch.arange(n, device=device), n=n, adaptive_count=n)


@lru_cache(maxsize=64)
def _probe_generator_seed(seed: int, layer_idx: int, n: int) -> int:
    # A fixed mix of the three numbers so that each (seed, layer, length) has its own stream.
    return (seed * 1_000_003 + layer_idx * 7_919 + n * 104_729) % (2**63 - 1)


def select_probes(
    n: int,
    probe_recent: int,
    probe_random: int,
    *,
    seed: int = 0,
    layer_idx: int = 0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Probe query positions for an ``n``-token prompt.

    Parameters
    ----------
    n : int
        Prompt length.
    probe_recent, probe_random : int
        The last ``probe_recent`` positions are probes, plus ``probe_random`` positions drawn without
        replacement from ``[0, n - probe_recent)``. If ``n <= probe_recent + probe_random`` every
        position is a probe.
    seed, layer_idx : int
        Make the random draw deterministic per (seed, layer, n).
    device : torch.device, optional
        Device of the returned tensor.

    Returns
    -------
    torch.LongTensor
        Probe positions, shape ``(m,)``, strictly ascending.
    """
    if n <= probe_recent + probe_random:
        return torch.arange(n, device=device)
    n_old = n - probe_recent
    recent = torch.arange(n_old, n)
    if probe_random > 0:
        gen = torch.Generator().manual_seed(_probe_generator_seed(seed, layer_idx, n))
        random = torch.randperm(n_old, generator=gen)[:probe_random]
        probes = torch.cat([random.sort().values, recent])
    else:
        probes = recent
    return probes.to(device)


def gather_positions(tensor: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor.index_select(dim, index)`` for a 3-D tensor, reading whole rows of its memory layout.

    transformers hands over head-major views of token-major memory (``(H, n, d)`` whose stride along
    ``n`` is ``H * d``); ``index_select`` of such a non-contiguous view first copies the whole tensor
    (measured: 3 ms per layer at 2K tokens). Selecting on the contiguous transposed view avoids it; the
    result is returned as a view in the requested orientation.

    Parameters
    ----------
    tensor : torch.Tensor
        3-D, any strides.
    index : torch.LongTensor
        Shape ``(k,)``.
    dim : int
        0 or 1.

    Returns
    -------
    torch.Tensor
        Same as ``tensor.index_select(dim, index)`` (values and shape).
    """
    if not tensor.is_contiguous() and tensor.transpose(0, 1).is_contiguous():
        return tensor.transpose(0, 1).index_select(1 - dim, index).transpose(0, 1)
    return tensor.index_select(dim, index)


def probe_block_size(num_heads: int, n: int, device: torch.device, chunk_bytes: int) -> int:
    """Probes scored together by :func:`probe_attention_scores`.

    On CPU a block holds about :data:`PROBE_SCORE_CPU_ROWS` score rows (probes x heads), so that the
    matmul, the softmax and the column sum of one block work in cache. Elsewhere (CUDA) the block is
    as large as ``chunk_bytes`` allows. Never less than one probe.
    """
    per_probe = num_heads * n * 4
    limit = max(1, chunk_bytes // max(per_probe, 1))
    if device.type == "cpu":
        limit = min(limit, max(1, PROBE_SCORE_CPU_ROWS // max(num_heads, 1)))
    return limit


def probe_attention_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    probes: torch.Tensor,
    scaling: float,
    *,
    chunk_bytes: int = PROBE_SCORE_CHUNK_BYTES,
) -> torch.Tensor:
    """Accumulated causal attention of the probe queries on every key (paper Eq. 5-6).

    ``a_j = sum_{h, i} softmax_j(q_{h, probes_i} . k_{g(h), j} * scaling + causal(probes_i, j))``, in fp32.

    The probes are scored in blocks of consecutive (ascending) probes, all heads at once. A block only
    computes the keys its last probe can see (random probes early in the prompt skip most of the
    sequence) and masks the few keys between its first and last probe; the ``n x n`` map and the
    ``m x n`` causal bias are never built. On CPU the block's scores are normalised in place.

    Parameters
    ----------
    query : torch.Tensor
        Shape ``(num_heads, n, head_dim)``, post-RoPE, any strides.
    key : torch.Tensor
        Shape ``(num_kv_heads, n, head_dim)``, post-RoPE; ``num_heads`` is a multiple of it (GQA).
    probes : torch.LongTensor
        Probe positions, shape ``(m,)``, ascending.
    scaling : float
        Softmax scale (usually ``head_dim ** -0.5``).
    chunk_bytes : int
        Largest fp32 score block to materialise (``probes x num_heads x n x 4`` bytes, at least one
        probe); see :func:`probe_block_size`.

    Returns
    -------
    torch.Tensor
        Accumulated scores, shape ``(n,)``, fp32. They sum to ``num_heads * m``.
    """
    num_heads, n, head_dim = query.shape
    num_kv_heads = key.shape[0]
    group = num_heads // num_kv_heads
    m = probes.numel()
    device = query.device
    total = torch.zeros(n, dtype=torch.float32, device=device)
    if m == 0 or n == 0:
        return total
    # (num_kv_heads, m, group, head_dim): a block of probes is then one contiguous slice per KV head,
    # holding the rows of every query head that shares that KV head.
    q_probe = (
        gather_positions(query, probes, dim=1)
        .to(torch.float32)
        .mul_(scaling)
        .view(num_kv_heads, group, m, head_dim)
        .transpose(1, 2)
        .contiguous()
    )
    k_t = key.to(torch.float32).transpose(1, 2)  # (num_kv_heads, head_dim, n), keeps key's layout
    per_block = probe_block_size(num_heads, n, device, chunk_bytes)
    positions = probes.tolist()  # block bounds on the host (one transfer)
    in_place = device.type == "cpu"
    buffer = torch.empty(min(per_block, m) * num_heads * n, dtype=torch.float32, device=device)
    for start in range(0, m, per_block):
        stop = min(start + per_block, m)
        rows = stop - start
        visible = positions[stop - 1] + 1  # keys the last probe of the block sees
        shared = positions[start] + 1  # keys every probe of the block sees
        logits = buffer[: num_heads * rows * visible].view(num_kv_heads, rows * group, visible)
        torch.matmul(
            q_probe[:, start:stop].reshape(num_kv_heads, rows * group, head_dim),
            k_t[:, :, :visible],
            out=logits,
        )
        if shared < visible:
            tail = torch.arange(shared, visible, device=device)
            hidden = tail[None, :] > probes[start:stop, None]  # (rows, visible - shared)
            logits.view(num_kv_heads, rows, group, visible)[..., shared:].masked_fill_(
                hidden[:, None, :], float("-inf")
            )
        if in_place:
            # Row-wise kernel that reads each element before writing it: safe in place, no new block.
            probs = torch.ops.aten._softmax.out(logits, -1, False, out=logits)
        else:
            probs = torch.softmax(logits, dim=-1)
        total[:visible] += probs.view(-1, visible).sum(dim=0)
    return total


def probe_row_counts(
    n: int,
    probes: torch.Tensor,
    num_heads: int,
    normalize: str = "probe_count",
) -> torch.Tensor:
    """Denominator ``c_j`` of the normalized score (paper Eq. 7).

    Parameters
    ----------
    n : int
        Prompt length.
    probes : torch.LongTensor
        Probe positions, shape ``(m,)``, ascending.
    num_heads : int
        Query heads summed into the accumulated score.
    normalize : {"probe_count", "causal_length"}
        ``probe_count``: ``num_heads * #{i : probes_i >= j}``, the number of (row, head) pairs that may
        attend to key ``j``. ``causal_length``: ``n - j``.

    Returns
    -------
    torch.Tensor
        Shape ``(n,)``, fp32, every entry >= 1 when the last position is a probe.
    """
    positions = torch.arange(n, device=probes.device)
    if normalize == "causal_length":
        return (n - positions).float()
    if normalize != "probe_count":
        raise ValueError(f"unknown normalize mode {normalize!r}")
    seen = probes.numel() - torch.searchsorted(probes, positions, right=False)
    return (seen * num_heads).float().clamp_min_(1.0)


def adaptive_count(scores: torch.Tensor, tau: float) -> int:
    """Fewest tokens whose scores reach ``tau`` of the total (paper Eq. 6).

    Parameters
    ----------
    scores : torch.Tensor
        Non-negative scores, shape ``(n,)``.
    tau : float
        Threshold in ``(0, 1]``; ``tau >= 1`` returns ``n`` (keep everything).

    Returns
    -------
    int
        ``p`` in ``[1, n]``.
    """
    n = scores.numel()
    if tau >= 1.0 or n <= 1:
        return n
    # The running sum in float64: in fp32 it drifts by a few tokens at tau near 1 on long prompts
    # (n = 32K, tau = 0.99999: 3 tokens off).
    cumulative = torch.sort(scores.float(), descending=True).values.double().cumsum(0)
    # Less a relative 1e-12, as ``config.ratio_ceil`` does: with tied scores a prefix's mass can equal the
    # target exactly, and the rounding of ``total * tau`` would otherwise ask for one token more
    # (25 equal scores at tau 0.28: 8 instead of 7).
    target = cumulative[-1] * (tau - 1e-12)
    p = int(torch.searchsorted(cumulative, target.reshape(1)).item()) + 1
    return max(1, min(p, n))


def select_important(
    scores: torch.Tensor, p: int, *, keep_last: bool = True, limit: int | None = None
) -> tuple[torch.Tensor, bool]:
    """Indices of the ``p`` highest scores, ascending (paper Eq. 8), plus the last position.

    Parameters
    ----------
    scores : torch.Tensor
        Shape ``(n,)``.
    p : int
        Number of tokens the adaptive count asks for, ``1 <= p <= n``.
    keep_last : bool
        Guarantee position ``n - 1`` (it produces the first generated token): it is added to the
        top-``p`` when missing, replacing the lowest of them only when ``limit`` leaves no room.
    limit : int, optional
        Hard upper bound of the returned count (the ``max_keep_ratio`` budget).

    Returns
    -------
    kept : torch.LongTensor
        Shape ``(p,)`` or ``(p + 1,)``, strictly ascending.
    guard_fired : bool
        Whether position ``n - 1`` had to be forced in.
    """
    n = scores.numel()
    limit = n if limit is None else min(limit, n)
    p = min(p, limit)
    if p >= n:
        return torch.arange(n, device=scores.device), False
    top = torch.topk(scores, p, sorted=True).indices  # descending by score
    guard = False
    if keep_last and not bool((top == n - 1).any()):
        last = torch.tensor([n - 1], device=top.device, dtype=top.dtype)
        if bool(scores[n - 1] >= scores[top[-1]]):  # tied with the lowest pick: an equally valid top-p
            top = torch.cat([top[:-1], last])
        else:
            guard = True
            top = torch.cat([top[:-1], last]) if p >= limit else torch.cat([top, last])
    return torch.sort(top).values, guard


def zipvl_select(
    query: torch.Tensor,
    key: torch.Tensor,
    config: ZipVLConfig,
    scaling: float,
    *,
    layer_idx: int = 0,
) -> Selection:
    """Choose the important tokens of one sequence in one layer (steps 1-6 of the algorithm).

    Parameters
    ----------
    query : torch.Tensor
        Shape ``(num_heads, n, head_dim)``, post-RoPE.
    key : torch.Tensor
        Shape ``(num_kv_heads, n, head_dim)``, post-RoPE.
    config : ZipVLConfig
        Threshold, probes, normalization and bounds.
    scaling : float
        Softmax scale.
    layer_idx : int
        Decoder layer index (dense layers and the probe seed depend on it).

    Returns
    -------
    Selection
    """
    num_heads, n, _ = query.shape
    if config.is_dense_layer(layer_idx) or (
        config.tau >= 1.0 and config.min_keep_ratio == 0.0 and config.max_keep_ratio is None
    ):
        return dense_selection(n, query.device)
    probes = select_probes(
        n,
        config.probe_recent,
        config.probe_random,
        seed=config.seed or 0,
        layer_idx=layer_idx,
        device=query.device,
    )
    accumulated = probe_attention_scores(query, key, probes, scaling)
    normalized = accumulated / probe_row_counts(n, probes, num_heads, config.normalize)
    p_adaptive = adaptive_count(
        accumulated if config.count_metric == "accumulated" else normalized, config.tau
    )
    low, high = config.token_bounds(n)
    p = min(max(p_adaptive, low), high)
    if config.select_metric == "random":
        gen = torch.Generator().manual_seed(_probe_generator_seed((config.seed or 0) + 1, layer_idx, n))
        scores = torch.rand(n, generator=gen).to(query.device)
    else:
        scores = normalized if config.select_metric == "normalized" else accumulated
    kept, guard = select_important(scores, p, keep_last=config.keep_last, limit=high)
    return Selection(kept=kept, n=n, adaptive_count=p_adaptive, guard_fired=guard)


# ---------------------------------------------------------------------------------------------------
# Sparse attention among the kept tokens
# ---------------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package imports (it needs CUDA)."""
    try:
        import flash_attn  # noqa: F401
    except Exception:  # ImportError, or a broken CUDA build
        return False
    return True


def attention_backend(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> str:
    """Pick the kernel: ``"flash"`` (flash-attn varlen) on CUDA in fp16/bf16 when importable, else ``"sdpa"``.

    Parameters
    ----------
    device, dtype
        Where and in which precision the attention runs.
    requested : {"auto", "sdpa", "flash"}
        ``"flash"`` raises when flash-attn cannot run here; ``"auto"`` falls back to SDPA.
    """
    flash_ok = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    if requested == "sdpa":
        return "sdpa"
    if requested == "flash":
        if not flash_ok:
            raise RuntimeError(
                "attention backend 'flash' needs flash-attn installed, a CUDA device and fp16/bf16"
            )
        return "flash"
    if requested != "auto":
        raise ValueError(f"unknown attention backend {requested!r}")
    return "flash" if flash_ok else "sdpa"


def _sdpa_causal(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal SDPA of one token-major sequence: ``(n, H, d)``, ``(n, Hkv, d)`` -> ``(n, H, d)`` (a view).

    The inputs go in as 4-D head-major views (no copy): torch's fused CPU kernel (flash attention for
    CPU, which skips the blocks above the diagonal) only takes 4-D inputs; 3-D inputs fall back to
    the math path that materialises the ``n x n`` map (6x slower at 4K tokens, measured).
    """
    group = query.shape[1] // key.shape[1]
    o = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        is_causal=True,
        scale=scaling,
        enable_gqa=group > 1,
    )
    return o[0].transpose(0, 1)  # a view: the CPU kernel writes head-major memory


def causal_attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: list[int],
    scaling: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Causal attention over several packed sequences.

    Parameters
    ----------
    query : torch.Tensor
        Shape ``(total, num_heads, head_dim)``: the sequences concatenated (any strides).
    key, value : torch.Tensor
        Shape ``(total, num_kv_heads, head_dim)``.
    cu_seqlens : list[int]
        Sequence boundaries, ``[0, len_0, len_0 + len_1, ...]``.
    scaling : float
        Softmax scale.
    backend : {"sdpa", "flash"}
        ``flash`` calls ``flash_attn_varlen_func`` once; ``sdpa`` calls torch SDPA per sequence with
        ``is_causal=True`` (4-D, so the fused kernel runs).

    Returns
    -------
    torch.Tensor
        Shape ``(total, num_heads, head_dim)``, contiguous.
    """
    if backend == "flash":
        from flash_attn import flash_attn_varlen_func

        cu = torch.tensor(cu_seqlens, dtype=torch.int32, device=query.device)
        max_len = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True))
        return flash_attn_varlen_func(
            query.contiguous(),
            key.contiguous(),
            value.contiguous(),
            cu,
            cu,
            max_len,
            max_len,
            softmax_scale=scaling,
            causal=True,
        )
    bounds = list(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True))
    if len(bounds) == 1 and bounds[0] == (0, query.shape[0]) and query.shape[0] > 0:
        return _sdpa_causal(query, key, value, scaling).contiguous()
    out = query.new_empty(query.shape)
    for start, stop in bounds:
        if stop > start:
            out[start:stop] = _sdpa_causal(query[start:stop], key[start:stop], value[start:stop], scaling)
    return out


def gather_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept: torch.Tensor,
    scaling: float,
    *,
    backend: str = "sdpa",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Causal attention among the kept tokens, returning only their rows and their gathered keys / values.

    The gathered keys and values are what an evicting cache stores, so a prefill gathers each tensor
    exactly once. When every token is kept nothing is gathered (the inputs are returned as they are).

    Parameters
    ----------
    query : torch.Tensor
        Shape ``(n, num_heads, head_dim)``, token-major (any strides).
    key, value : torch.Tensor
        Shape ``(n, num_kv_heads, head_dim)``.
    kept : torch.LongTensor
        Kept positions, shape ``(p,)``, strictly ascending.
    scaling : float
        Softmax scale.
    backend : {"sdpa", "flash"}
        Kernel, see :func:`attention_backend`.

    Returns
    -------
    out_kept : torch.Tensor
        Shape ``(p, num_heads, head_dim)``, any strides: the attention output of the kept rows.
    key_kept, value_kept : torch.Tensor
        Shape ``(p, num_kv_heads, head_dim)``.
    """
    if kept.numel() != query.shape[0]:
        query = gather_positions(query, kept, 0)
        key = gather_positions(key, kept, 0)
        value = gather_positions(value, kept, 0)
    if backend == "sdpa" and kept.numel() > 0:
        out_kept = _sdpa_causal(query, key, value, scaling)  # a view; the caller scatters it
    else:
        out_kept = causal_attention_varlen(query, key, value, [0, kept.numel()], scaling, backend)
    return out_kept, key, value


def sparse_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept: torch.Tensor,
    scaling: float,
    *,
    backend: str = "sdpa",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention among the kept tokens; rows of the other tokens are zero (paper Eq. 9).

    Because ``kept`` is ascending, causal attention inside the gathered set is exactly the original
    causal relation restricted to it, so the gathered tokens use a plain causal kernel.

    Parameters
    ----------
    query : torch.Tensor
        Shape ``(n, num_heads, head_dim)`` (token-major, as transformers' projections produce it).
    key, value : torch.Tensor
        Shape ``(n, num_kv_heads, head_dim)``.
    kept : torch.LongTensor
        Kept positions, shape ``(p,)``, ascending.
    scaling : float
        Softmax scale.
    backend : {"sdpa", "flash"}
        Kernel, see :func:`attention_backend`.
    out : torch.Tensor, optional
        Output buffer, shape ``(n, num_heads, head_dim)``; rows not in ``kept`` are zeroed.

    Returns
    -------
    torch.Tensor
        Shape ``(n, num_heads, head_dim)``.
    """
    n = query.shape[0]
    out_kept, _, _ = gather_causal_attention(query, key, value, kept, scaling, backend=backend)
    if kept.numel() == n:
        return out_kept.contiguous() if out is None else out.copy_(out_kept)
    if out is None:
        out = query.new_zeros(query.shape)
    else:
        out.zero_()
    out.index_copy_(0, kept, out_kept)
    return out


def masked_dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kept: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Reference for :func:`sparse_causal_attention`: dense attention under ``causal AND key kept``.

    Same shapes as :func:`sparse_causal_attention`. Rows of tokens that are not kept are zero. Slow
    (materialises an ``n x n`` mask); used by tests and by the masked oracle cache.
    """
    n = query.shape[0]
    keep = torch.zeros(n, dtype=torch.bool, device=query.device)
    keep[kept] = True
    mask = torch.ones(n, n, dtype=torch.bool, device=query.device).tril_() & keep[None, :]
    mask |= ~keep[:, None]  # rows that are dropped anyway: any valid row avoids NaN
    group = query.shape[1] // key.shape[1]
    o = F.scaled_dot_product_attention(
        query.transpose(0, 1)[None],
        key.transpose(0, 1)[None],
        value.transpose(0, 1)[None],
        attn_mask=mask,
        scale=scaling,
        enable_gqa=group > 1,
    )[0].transpose(0, 1)
    return o * keep[:, None, None].to(o.dtype)


def attention_flops_reduction(kept_per_layer: list[int], n: int) -> float:
    """``1 - mean_l (p_l / n)^2``: the share of prefill attention FLOPs ZipVL avoids."""
    if n == 0 or not kept_per_layer:
        return 0.0
    return 1.0 - sum((p / n) ** 2 for p in kept_per_layer) / len(kept_per_layer)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


__all__ = [
    "Selection",
    "adaptive_count",
    "attention_backend",
    "attention_flops_reduction",
    "causal_attention_varlen",
    "ceil_div",
    "dense_selection",
    "flash_attn_available",
    "gather_causal_attention",
    "gather_positions",
    "masked_dense_attention",
    "probe_attention_scores",
    "probe_block_size",
    "probe_row_counts",
    "select_important",
    "select_probes",
    "sparse_causal_attention",
    "zipvl_select",
]
