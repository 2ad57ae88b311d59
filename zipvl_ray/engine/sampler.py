"""Token sampling: greedy, temperature, top-k, top-p, per-request seeded generators, logprobs."""

from __future__ import annotations

import torch

from zipvl_ray.engine.types import SamplingParams


def _filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask logits outside the top-k and the top-p nucleus to -inf. ``logits``: ``(V,)`` fp32."""
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[dict | None]]:
    """Draw one token per row.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, V)`` next-token logits.
    params : list[SamplingParams]
        One per row.
    generators : list[torch.Generator or None]
        One per row (CPU generators; ``None`` uses the global RNG).

    Returns
    -------
    tokens : list[int]
    logprobs : list[dict or None]
        ``{"token_id", "logprob", "top": [(id, logprob), ...]}`` for rows that asked for logprobs.
    """
    logits = logits.float()
    tokens: list[int] = []
    logprobs: list[dict | None] = []
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    greedy = logits[greedy_rows].argmax(dim=-1).tolist() if greedy_rows else []
    greedy_by_row = dict(zip(greedy_rows, greedy, strict=True))
    for i, p in enumerate(params):
        if i in greedy_by_row:
            token = greedy_by_row[i]
        else:
            row = _filter_top_k_top_p(logits[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1).cpu()
            if not bool(torch.isfinite(probs).all()):  # a degenerate row must not fail the whole step
                token = int(logits[i].argmax())
            else:
                token = int(torch.multinomial(probs, 1, generator=generators[i]).item())
        tokens.append(token)
        if p.logprobs is not None:
            lp = torch.log_softmax(logits[i], dim=-1)
            entry = {"token_id": token, "logprob": float(lp[token])}
            if p.logprobs > 0:
                top = torch.topk(lp, p.logprobs)
                entry["top"] = list(zip(top.indices.tolist(), top.values.tolist(), strict=True))
            else:
                entry["top"] = []
            logprobs.append(entry)
        else:
            logprobs.append(None)
    return tokens, logprobs


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator for one request: seeded when ``seed`` is set, else from fresh entropy."""
    gen = torch.Generator()
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen
