"""Token sampling: penalties, greedy, temperature, top-k, top-p, per-request seeded generators, logprobs."""

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


def apply_penalties(
    logits: torch.Tensor,
    params: SamplingParams,
    prompt_ids: list[int] | torch.Tensor,
    output_ids: list[int],
) -> torch.Tensor:
    """``logits`` with ``params``' penalties applied (a new tensor).

    Parameters
    ----------
    logits : torch.Tensor
        ``(V,)`` fp32 next-token logits of one row.
    params : SamplingParams
        Its ``repetition_penalty`` (tokens of the prompt or the output: positive logits divided by it,
        negative ones multiplied, as in transformers and vLLM), then ``frequency_penalty`` (x each token's
        count in the output) and ``presence_penalty`` (once per token in the output), subtracted as in
        OpenAI's API.
    prompt_ids : list[int] or torch.Tensor
        The request's prompt tokens (only ``repetition_penalty`` reads them; a tensor of its distinct ids
        saves converting a long prompt at every step).
    output_ids : list[int]
        Its generated tokens so far.

    Returns
    -------
    torch.Tensor
        ``(V,)``.
    """
    logits = logits.clone()
    vocab = logits.shape[0]
    repetition = getattr(params, "repetition_penalty", 1.0)
    if repetition != 1.0:
        prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
        seen = torch.cat([prompt.cpu(), torch.tensor(output_ids, dtype=torch.long)]).to(logits.device)
        seen = seen[(seen >= 0) & (seen < vocab)].unique()
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / repetition, values * repetition)
    frequency = getattr(params, "frequency_penalty", 0.0)
    presence = getattr(params, "presence_penalty", 0.0)
    if output_ids and (frequency or presence):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(device=logits.device, dtype=logits.dtype)
        logits -= frequency * counts + presence * (counts > 0).to(logits.dtype)
    return logits


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    histories: list[tuple[list[int], list[int]]] | None = None,
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
    histories : list[tuple[list[int], list[int]]], optional
        Per row, the prompt's and the output's token ids, which penalties need (rows whose parameters
        set a penalty require them).

    Returns
    -------
    tokens : list[int]
    logprobs : list[dict or None]
        ``{"token_id", "logprob", "top": [(id, logprob), ...]}`` for rows that asked for logprobs, from the
        raw logits (before penalties, temperature, top-k and top-p: vLLM's default).
    """
    logits = logits.float()
    scores = logits  # what tokens are drawn from: the logits after penalties
    for i, p in enumerate(params):
        if p.penalized:
            if histories is None:
                raise ValueError("penalties need the rows' token histories")
            if scores is logits:
                scores = logits.clone()
            scores[i] = apply_penalties(logits[i], p, *histories[i])
    tokens: list[int] = []
    logprobs: list[dict | None] = []
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    greedy = scores[greedy_rows].argmax(dim=-1).tolist() if greedy_rows else []
    greedy_by_row = dict(zip(greedy_rows, greedy, strict=True))
    for i, p in enumerate(params):
        if i in greedy_by_row:
            token = greedy_by_row[i]
        else:
            row = _filter_top_k_top_p(scores[i] / p.temperature, p.top_k, p.top_p)
            probs = torch.softmax(row, dim=-1).cpu()
            if not bool(torch.isfinite(probs).all()):  # a degenerate row must not fail the whole step
                token = int(scores[i].argmax())
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
