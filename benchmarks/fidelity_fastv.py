"""A FastV-style baseline for the fidelity benchmark: dense first layers, then drop the visual tokens the
last prompt token attends to least.

FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024) ranks the visual tokens
by the attention the last prompt token pays them in layer ``K - 1`` (mean over heads) and removes the
lowest-ranked ones from layer ``K`` on. Here that is a :class:`~zipvl_ray.cache.ZipVLCache` whose
prefill uses this selection instead of ZipVL's: layers ``< K`` keep everything; layers ``>= K`` keep
every text token plus the top visual tokens, run causal attention among them and keep only their
keys and values, so decoding is the same as for ZipVL (the evicted tokens are gone). Same model, same
sparse kernel, only the selection differs. Batch size 1 (the benchmark runs one sample at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zipvl_ray.cache import ZipVLCache
from zipvl_ray.sparsity import sparse_causal_attention


@dataclass(frozen=True)
class FastVConfig:
    """Which layers stay dense and how many visual tokens the others keep.

    Attributes
    ----------
    dense_layers : int
        ``K``: layers ``0 .. K-1`` attend densely; the ranking uses layer ``K - 1`` (FastV's K = 2).
    visual_keep_ratio : float
        Fraction of the visual tokens kept from layer ``K`` on (text tokens are always kept).
    """

    dense_layers: int = 2
    visual_keep_ratio: float = 0.5

    def __post_init__(self) -> None:
        if self.dense_layers < 1:
            raise ValueError("FastV needs at least one dense layer to rank the visual tokens")
        if not 0.0 <= self.visual_keep_ratio <= 1.0:
            raise ValueError("visual_keep_ratio must be in [0, 1]")


def matched_visual_keep_ratio(
    budget: float, num_layers: int, dense_layers: int, num_tokens: int, num_visual: int
) -> float:
    """The visual keep ratio that gives a mean kept fraction (over layers) of ``budget``.

    Mean kept fraction = ``(K * n + (L - K) * (n_text + r * n_visual)) / (L * n)``; solved for ``r`` and
    clamped to ``[0, 1]`` (below ``K / L`` plus the text share, FastV cannot go lower).
    """
    if num_visual == 0:
        return 1.0
    pruned_kept = (budget * num_layers * num_tokens - dense_layers * num_tokens) / max(
        num_layers - dense_layers, 1
    )
    visual = pruned_kept - (num_tokens - num_visual)
    return float(min(max(visual / num_visual, 0.0), 1.0))


class FastVCache(ZipVLCache):
    """A ZipVL cache whose prefill selection is FastV's.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ZipVL-enabled model (its attention calls :meth:`zipvl_attention`).
    image_mask : torch.BoolTensor
        ``(n,)``: True at the prompt's image-token positions.
    config : FastVConfig
        Dense layers and visual keep ratio.
    """

    def __init__(self, model, image_mask: torch.Tensor, config: FastVConfig):
        super().__init__(model)
        self.image_mask = image_mask.bool().flatten()
        self.fastv = config
        self.visual_ranking: torch.Tensor | None = None  # (n,) attention of the last token, layer K - 1
        self.kept_after: torch.Tensor | None = None

    def _kept_positions(self, n: int, device) -> torch.Tensor:
        if self.kept_after is None:
            image = self.image_mask.to(device)
            visual = torch.nonzero(image, as_tuple=False).flatten()
            text = torch.nonzero(~image, as_tuple=False).flatten()
            keep = round(self.fastv.visual_keep_ratio * visual.numel())
            scores = self.visual_ranking.to(device)[visual]
            top = visual[torch.topk(scores, keep).indices] if keep > 0 else visual[:0]
            self.kept_after = torch.sort(torch.cat([text, top])).values
        return self.kept_after

    def zipvl_attention(self, layer_idx, query, key, value, attention_mask, scaling, config) -> torch.Tensor:
        """FastV prefill for a fresh layer; plain append-and-attend (as ZipVL) afterwards.

        ``query (1, H, n, d)``, ``key / value (1, Hkv, n, d)``; returns ``(1, n, H, d)``.
        """
        layer = self.layers[layer_idx]
        if layer.logical_length > 0:
            return super().zipvl_attention(layer_idx, query, key, value, attention_mask, scaling, config)
        batch, num_heads, n, _ = query.shape
        if batch != 1 or n != self.image_mask.numel():
            raise ValueError("FastVCache runs one unpadded prompt whose image mask it was given")
        if layer_idx < self.fastv.dense_layers:
            kept = torch.arange(n, device=query.device)
        else:
            kept = self._kept_positions(n, query.device)
        q_tok, k_tok, v_tok = (t[0].transpose(0, 1) for t in (query, key, value))
        out = sparse_causal_attention(q_tok, k_tok, v_tok, kept, scaling)
        if layer_idx == self.fastv.dense_layers - 1:
            group = num_heads // key.shape[1]
            keys = key[0].repeat_interleave(group, dim=0) if group > 1 else key[0]  # (H, n, d)
            logits = torch.einsum("hd,hnd->hn", query[0, :, -1].float(), keys.float()) * scaling
            self.visual_ranking = torch.softmax(logits, dim=-1).mean(dim=0)
        layer.lazy_initialization(key, value)
        layer.keys = key.index_select(2, kept)
        layer.values = value.index_select(2, kept)
        layer.slots = kept[None].clone()
        layer.logical_length = layer.prompt_length = n
        layer.prompt_tokens = [n]
        layer.prompt_kept = [int(kept.numel())]
        layer.seen_tokens = torch.tensor([n], device=query.device)
        return out[None]
