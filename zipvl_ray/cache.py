"""``ZipVLCache``: a transformers ``Cache`` whose layers keep different numbers of tokens.

This is the reference path: simple, batched with padding, and exact. The paged engine
(:mod:`zipvl_ray.kv`, :mod:`zipvl_ray.engine`) is tested against it.

How it cooperates with the model
--------------------------------
transformers calls ``past_key_values.update(k, v, layer_idx)`` right before the attention function.
What to store depends on ZipVL's selection, which needs the queries, so :meth:`ZipVLLayer.update`
returns the new states unchanged and the ZipVL attention function (:mod:`zipvl_ray.attention`) calls
:meth:`ZipVLCache.zipvl_attention`, which attends and stores in one place:

* **fresh prefill** (the layer is empty): ZipVL selects the important set of every sequence,
  attends sparsely among it, and keeps only its keys and values (post-RoPE);
* **extension** (decode, ``q_len == 1``, or a later chunk / turn, ``q_len > 1``): the new tokens are
  appended and attend to the retained tokens and, causally, to each other. No new selection is made
  over an extension (multi-turn and chunked prefill are dense over the new chunk and never
  re-admit evicted tokens); this is exactly "a full cache with the evicted keys masked".

Each stored token carries its *slot* (its column in the 2-D ``attention_mask`` / ``input_ids``
layout), so causal and padding masks are built per layer; ``get_seq_length()`` returns the logical
length (columns seen), which transformers uses for positions (M-RoPE deltas included).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, CacheLayerMixin

from zipvl_ray.config import ZipVLConfig
from zipvl_ray.sparsity import (
    adaptive_count,
    attention_backend,
    dense_selection,
    gather_causal_attention,
    masked_dense_attention,
    zipvl_select,
)


@dataclass
class CacheStats:
    """What a :class:`ZipVLCache` holds.

    Attributes
    ----------
    logical_length : int
        Columns (tokens, padding included) the cache has seen.
    prompt_tokens : list[int]
        Non-padding prompt tokens per sequence.
    prompt_kept_per_layer : list[list[int]]
        ``[layer][sequence]`` tokens kept right after prefill.
    kept_per_layer : list[list[int]]
        ``[layer][sequence]`` tokens held now (prompt survivors + generated tokens).
    kv_bytes : int
        Bytes of the held tokens: ``sum kept x 2 x num_kv_heads x head_dim x dtype size``.
    kv_bytes_dense : int
        Bytes a dense cache would hold for the same non-padding tokens.
    kv_bytes_allocated : int
        Bytes of the tensors actually allocated (a padded batch holds a little more than ``kv_bytes``).
    guard_fired : int
        Layers x sequences where the last position had to be forced into the kept set.
    """

    logical_length: int
    prompt_tokens: list[int]
    prompt_kept_per_layer: list[list[int]]
    kept_per_layer: list[list[int]]
    kv_bytes: int
    kv_bytes_dense: int
    kv_bytes_allocated: int
    guard_fired: int = 0
    extra: dict = field(default_factory=dict)

    def kept_ratio_per_layer(self, seq: int = 0) -> list[float]:
        n = max(self.prompt_tokens[seq], 1)
        return [layer[seq] / n for layer in self.prompt_kept_per_layer]

    def mean_kept_ratio(self, seq: int = 0) -> float:
        ratios = self.kept_ratio_per_layer(seq)
        return sum(ratios) / max(len(ratios), 1)


def _valid_columns(pad2d: torch.Tensor | None, b: int, start: int, stop: int, device) -> torch.Tensor:
    """Columns in ``[start, stop)`` that are not padding for sequence ``b``, ascending."""
    if pad2d is None:
        return torch.arange(start, stop, device=device)
    return torch.nonzero(pad2d[b, start:stop], as_tuple=False).flatten().to(device) + start


class ZipVLLayer(CacheLayerMixin):
    """One decoder layer's retained keys and values.

    Tensors: ``keys, values`` ``(batch, num_kv_heads, L, head_dim)`` and ``slots`` ``(batch, L)``
    (column of each stored token; ``-1`` marks an empty or masked slot). ``L`` is the longest
    sequence's retained length; shorter sequences are padded with empty slots.
    """

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, evict: bool = True):
        super().__init__()
        self.evict = evict
        self.slots: torch.Tensor | None = None
        self.logical_length = 0
        self.prompt_length = 0
        self.prompt_tokens: list[int] = []
        self.prompt_kept: list[int] = []
        self.seen_tokens: torch.Tensor | None = None  # (batch,) non-padding tokens seen
        self.guard_fired = 0
        self.decode_steps = 0

    # -- transformers' CacheLayerMixin interface -------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # Storing is deferred to ZipVLCache.zipvl_attention (it needs the queries to select).
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.logical_length + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(evict=self.evict)

    def _select_batch(self, index: torch.Tensor) -> None:
        if self.keys is None:
            return
        index = index.to(self.keys.device)
        self.keys = self.keys.index_select(0, index)
        self.values = self.values.index_select(0, index)
        self.slots = self.slots.index_select(0, index)
        self.seen_tokens = self.seen_tokens.index_select(0, index)
        cpu = index.cpu().tolist()
        self.prompt_tokens = [self.prompt_tokens[i] for i in cpu]
        self.prompt_kept = [self.prompt_kept[i] for i in cpu]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select_batch(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select_batch(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.keys is not None:
            self._select_batch(torch.arange(self.keys.shape[0]).repeat_interleave(repeats))

    # -- accounting -----------------------------------------------------------------------------
    def held_counts(self) -> list[int]:
        if self.slots is None:
            return []
        return (self.slots >= 0).sum(dim=1).tolist()

    def bytes_per_token(self) -> int:
        if self.keys is None:
            return 0
        return 2 * self.keys.shape[1] * self.keys.shape[3] * self.keys.element_size()

    # -- attention + storage ----------------------------------------------------------------------
    def prefill(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pad2d: torch.Tensor | None,
        scaling: float,
        config: ZipVLConfig,
        layer_idx: int,
    ) -> torch.Tensor:
        """Fresh prefill: select, attend sparsely, keep the selected tokens. Returns ``(B, q, H, d)``."""
        batch, num_heads, q_len, head_dim = query.shape
        out, store_k, store_v, store_slots, kept_counts, seen = _prefill_batch(
            query, key, value, pad2d, scaling, config, layer_idx, masked_oracle=not self.evict, layer=self
        )
        self.lazy_initialization(key, value)
        self.keys, self.values, self.slots = store_k, store_v, store_slots
        self.logical_length = self.prompt_length = q_len
        self.prompt_tokens = seen
        self.prompt_kept = kept_counts
        self.seen_tokens = torch.tensor(seen, device=query.device)
        return out

    def extend(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        pad2d: torch.Tensor | None,
        scaling: float,
        config: ZipVLConfig,
        layer_idx: int,
    ) -> torch.Tensor:
        """Decode or a later chunk: append and attend. Returns ``(B, q, H, d)``."""
        batch, num_heads, q_len, head_dim = query.shape
        start = self.logical_length
        new_cols = torch.arange(start, start + q_len, device=query.device)
        if pad2d is not None:
            valid = pad2d[:, start : start + q_len].to(query.device)
        else:
            valid = torch.ones(batch, q_len, dtype=torch.bool, device=query.device)
        new_slots = torch.where(valid, new_cols[None, :], torch.full_like(valid, -1, dtype=torch.long))
        self.keys = torch.cat([self.keys, key], dim=2)
        self.values = torch.cat([self.values, value], dim=2)
        self.slots = torch.cat([self.slots, new_slots], dim=1)
        self.seen_tokens = self.seen_tokens + valid.sum(dim=1)
        self.logical_length += q_len

        stored = self.slots[:, None, :]  # (B, 1, L)
        mask = (stored >= 0) & (stored <= new_cols[None, :, None])  # (B, q, L)
        has_key = mask.any(dim=-1)  # rows with nothing to attend to (padding queries)
        mask = mask | ~has_key[..., None]
        group = num_heads // self.keys.shape[1]
        out = F.scaled_dot_product_attention(
            query, self.keys, self.values, attn_mask=mask[:, None], scale=scaling, enable_gqa=group > 1
        )
        out = out.transpose(1, 2) * has_key[..., None, None].to(out.dtype)
        if q_len > 1:
            # A later turn's prompt: the next window of generated tokens starts after it (never evict it).
            self.decode_steps = 0
        else:
            self.decode_steps += 1
            interval = config.decode_compress_interval
            if interval and not config.is_dense_layer(layer_idx) and self.decode_steps % interval == 0:
                self._compress_recent(query, scaling, config, interval)
        return out

    def _compress_recent(self, query: torch.Tensor, scaling: float, config: ZipVLConfig, window: int) -> None:
        """Evict the unimportant tokens among the last ``window`` generated ones (decode_compress_interval)."""
        group = query.shape[1] // self.keys.shape[1]
        keys = self.keys.repeat_interleave(group, dim=1) if group > 1 else self.keys
        logits = torch.einsum("bhqd,bhld->bhql", query.float(), keys.float()) * scaling  # (B, H, 1, L)
        logits = logits.masked_fill((self.slots < 0)[:, None, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).sum(dim=(1, 2))  # (B, L)
        length = self.slots.shape[1]
        tail = torch.arange(length - window, length, device=self.slots.device)
        for b in range(self.slots.shape[0]):
            alive = tail[self.slots[b, tail] >= 0]
            if alive.numel() <= 1:
                continue
            p = adaptive_count(probs[b, alive], config.tau)
            top = torch.topk(probs[b, alive], p).indices
            keep = torch.zeros(alive.numel(), dtype=torch.bool, device=alive.device)
            keep[top] = True
            keep[-1] = True  # the newest token always stays
            self.slots[b, alive[~keep]] = -1
        if self.evict:
            self._compact()

    def _compact(self) -> None:
        """Drop masked slots physically (re-padding the batch to its longest sequence)."""
        alive = self.slots >= 0
        counts = alive.sum(dim=1)
        width = int(counts.max().item()) if counts.numel() else 0
        batch, heads, _, dim = self.keys.shape
        keys = self.keys.new_zeros(batch, heads, width, dim)
        values = self.values.new_zeros(batch, heads, width, dim)
        slots = torch.full((batch, width), -1, dtype=torch.long, device=self.slots.device)
        for b in range(batch):
            idx = torch.nonzero(alive[b], as_tuple=False).flatten()
            c = idx.numel()
            keys[b, :, :c] = self.keys[b, :, idx]
            values[b, :, :c] = self.values[b, :, idx]
            slots[b, :c] = self.slots[b, idx]
        self.keys, self.values, self.slots = keys, values, slots


def _prefill_batch(query, key, value, pad2d, scaling, config, layer_idx, *, masked_oracle=False, layer=None):
    """Per-sequence ZipVL prefill of a padded batch.

    Every tensor is read in the layout transformers hands over (views, no transposing copies); each
    sequence's query, key and value are gathered once, to the kept tokens, and the gathered keys and
    values are what the cache stores. A single unpadded sequence (the serving case) stores them as
    they are, without the padded re-copy.

    Parameters
    ----------
    query : torch.Tensor
        ``(B, H, q, d)``.
    key, value : torch.Tensor
        ``(B, Hkv, q, d)``.
    pad2d : torch.Tensor or None
        ``(B, >= q)`` boolean, True for real tokens.

    Returns
    -------
    out : ``(B, q, H, d)``; stored keys / values ``(B, Hkv, P, d)`` and slots ``(B, P)`` padded to the
    longest kept set (or all valid tokens in the masked oracle); kept counts and valid counts per sequence.
    """
    batch, num_heads, q_len, head_dim = query.shape
    device = query.device
    backend = attention_backend(device, query.dtype)
    q_tok = query.transpose(1, 2)  # (B, q, H, d) views
    k_tok = key.transpose(1, 2)
    v_tok = value.transpose(1, 2)
    out = None
    per_seq = []  # (keys (c, Hkv, d), values, slots (c,), kept count, valid count)
    for b in range(batch):
        cols = _valid_columns(pad2d, b, 0, q_len, device) if pad2d is not None else None
        padded = cols is not None and cols.numel() != q_len
        qb = q_tok[b].index_select(0, cols) if padded else q_tok[b]
        kb = k_tok[b].index_select(0, cols) if padded else k_tok[b]
        vb = v_tok[b].index_select(0, cols) if padded else v_tok[b]
        n = qb.shape[0]
        if cols is None:
            cols = torch.arange(q_len, device=device)
        if n == 0:
            per_seq.append((kb, vb, cols, 0, 0))
            continue
        if config.is_dense_layer(layer_idx):
            sel = dense_selection(n, device)
        else:
            sel = zipvl_select(qb.transpose(0, 1), kb.transpose(0, 1), config, scaling, layer_idx=layer_idx)
        if layer is not None and sel.guard_fired:
            layer.guard_fired += 1
        if masked_oracle:
            ob, rows = masked_dense_attention(qb, kb, vb, sel.kept, scaling), cols
            slots = torch.full_like(cols, -1)
            slots[sel.kept] = cols[sel.kept]
            per_seq.append((kb, vb, slots, sel.num_kept, n))
        else:
            ob, kept_k, kept_v = gather_causal_attention(qb, kb, vb, sel.kept, scaling, backend=backend)
            rows = cols if sel.num_kept == n else cols[sel.kept]
            per_seq.append((kept_k, kept_v, rows, sel.num_kept, n))
        if batch == 1 and not padded and rows.numel() == q_len:
            out = ob[None]  # every row computed: no zero-filled buffer, no scatter
            continue
        if out is None:
            out = query.new_zeros(batch, q_len, num_heads, head_dim)
        if rows.numel() == q_len:
            out[b].copy_(ob)
        else:
            out[b].index_copy_(0, rows, ob)
    if out is None:
        out = query.new_zeros(batch, q_len, num_heads, head_dim)
    if batch == 1:
        kb, vb, slots, _, _ = per_seq[0]
        store_k, store_v, store_slots = kb.transpose(0, 1)[None], vb.transpose(0, 1)[None], slots[None]
    else:
        width = max(entry[0].shape[0] for entry in per_seq)
        num_kv = key.shape[1]
        store_k = key.new_zeros(batch, num_kv, width, head_dim)
        store_v = value.new_zeros(batch, num_kv, width, head_dim)
        store_slots = torch.full((batch, width), -1, dtype=torch.long, device=device)
        for b, (kb, vb, slots, _, _) in enumerate(per_seq):
            c = kb.shape[0]
            store_k[b, :, :c] = kb.transpose(0, 1)
            store_v[b, :, :c] = vb.transpose(0, 1)
            store_slots[b, :c] = slots
    kept_counts = [entry[3] for entry in per_seq]
    seen = [entry[4] for entry in per_seq]
    return out, store_k, store_v, store_slots, kept_counts, seen


def stateless_prefill(query, key, value, pad2d, scaling, config, layer_idx) -> tuple[torch.Tensor, list[int]]:
    """ZipVL prefill without a cache (``use_cache=False``, training, scoring). Returns ``(B, q, H, d)``, kept counts."""
    out, *_rest, kept, _seen = _prefill_batch(query, key, value, pad2d, scaling, config, layer_idx)
    return out, kept


class ZipVLCache(Cache):
    """A transformers ``Cache`` that evicts, per layer, the tokens ZipVL did not select.

    Parameters
    ----------
    model : transformers.PreTrainedModel or int
        The ZipVL-enabled model (its text config gives the number of layers), or the number of layers.
    config : ZipVLConfig, optional
        Overrides the model's ZipVL config for the sequences in this cache.
    evict : bool
        True (default) frees evicted tokens. False is the masked oracle used by tests: every token
        is stored, evicted ones are masked, and prefill uses dense attention under the mask.

    Examples
    --------
    >>> cache = ZipVLCache(model)
    >>> out = model.generate(**inputs, past_key_values=cache, max_new_tokens=16)
    >>> cache.stats().kv_bytes  # doctest: +SKIP
    """

    def __init__(self, model, config: ZipVLConfig | None = None, *, evict: bool = True):
        if isinstance(model, int):
            num_layers = model
        else:
            num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
        super().__init__(layers=[ZipVLLayer(evict=evict) for _ in range(num_layers)])
        self.zipvl_config = config
        self.evict = evict

    def zipvl_attention(self, layer_idx, query, key, value, attention_mask, scaling, config) -> torch.Tensor:
        """Attend for ``layer_idx`` and store what ZipVL keeps. Called by the ZipVL attention function.

        Parameters
        ----------
        query : torch.Tensor
            ``(B, H, q, d)``, post-RoPE.
        key, value : torch.Tensor
            ``(B, Hkv, q, d)``: only the new tokens (see :meth:`ZipVLLayer.update`).
        attention_mask : torch.Tensor or None
            2-D ``(B, logical_length + q)`` boolean padding mask, or None.

        Returns
        -------
        torch.Tensor
            ``(B, q, H, d)``.
        """
        config = self.zipvl_config or config
        layer = self.layers[layer_idx]
        pad2d = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
        if pad2d is not None and bool(pad2d.all()):
            pad2d = None
        if layer.logical_length == 0:
            return layer.prefill(query, key, value, pad2d, scaling, config, layer_idx)
        return layer.extend(query, key, value, pad2d, scaling, config, layer_idx)

    def stats(self) -> CacheStats:
        """Per-layer kept counts, logical length and KV bytes held vs dense."""
        layers = [layer for layer in self.layers if layer.keys is not None]
        kept = [layer.held_counts() for layer in layers]
        held_bytes = sum(sum(k) * layer.bytes_per_token() for k, layer in zip(kept, layers, strict=True))
        dense_bytes = sum(int(layer.seen_tokens.sum().item()) * layer.bytes_per_token() for layer in layers)
        allocated = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in layers)
        first = layers[0] if layers else None
        return CacheStats(
            logical_length=self.layers[0].logical_length if self.layers else 0,
            prompt_tokens=list(first.prompt_tokens) if first else [],
            prompt_kept_per_layer=[list(layer.prompt_kept) for layer in layers],
            kept_per_layer=kept,
            kv_bytes=held_bytes,
            kv_bytes_dense=dense_bytes,
            kv_bytes_allocated=allocated,
            guard_fired=sum(layer.guard_fired for layer in layers),
        )
