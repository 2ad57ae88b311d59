"""Runs the transformers decoder stack over the paged KV pool: packed prefill and batched decode.

The model's own layer code runs unchanged; the ZipVL attention function hands every layer's
attention to the :class:`StepKV` of the current step (it arrives as ``past_key_values``):

* **prefill**: all prompts of the step are packed into one row (``(1, T, hidden)``, positions restart
  per prompt); per prompt and layer, ZipVL selects the important set, attends among it, and writes
  only the kept keys / values into freshly allocated blocks;
* **decode**: one token per sequence (``(B, 1, hidden)``); its key / value goes into the slot the
  block manager reserved, then it attends to that layer's blocks: flash-attn's paged kernel on CUDA
  (block_size a multiple of 256), else a gather of its whole blocks into a padded tensor with a length
  mask and SDPA;
* **replay**: a preempted sequence's generated tokens, ``(1, c, hidden)``, after its prompt was
  recomputed; each attends to what its layer holds plus the chunk's tokens up to itself (flash-attn's
  paged kernel with a bottom-right causal mask, else a gather and SDPA with a causal offset mask), as its
  decode step did.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.kv import KVCacheManager, KVLayout, KVPool, pool_blocks
from zipvl_ray.models.adapters import VLMAdapter
from zipvl_ray.sparsity import (
    adaptive_count,
    attention_backend,
    causal_attention_varlen,
    dense_selection,
    sparse_causal_attention,
    zipvl_select,
)

logger = logging.getLogger(__name__)


@dataclass
class Segment:
    """One prompt inside a packed prefill: rows ``[start, end)`` of the packed batch."""

    seq_id: str
    start: int
    end: int
    zipvl: ZipVLConfig
    kept: list[int] = field(default_factory=list)
    guard_fired: int = 0


class StepKV(Cache):
    """The KV context of one engine forward, passed to the model as ``past_key_values``.

    It stores nothing itself (``update`` returns the new states); :meth:`zipvl_attention` attends
    over, and writes into, the engine's pool.
    """

    def __init__(
        self,
        runner: ModelRunner,
        *,
        segments: list[Segment] | None = None,
        seq_ids=None,
        new_slots=None,
        lengths=None,
        compress=None,
        extend=None,
    ):
        super().__init__(layers=[])
        self.runner = runner
        self.segments = segments
        self.seq_ids = seq_ids
        self.new_slots = new_slots
        self.lengths = lengths
        self.compress = compress or []  # (row, ZipVLConfig) of sequences due for decode compression
        self.extend = (
            extend  # a replay: (prior lengths per layer, ZipVLConfig if compression is due else None)
        )
        self.rows: torch.Tensor | None = None  # block-table rows of seq_ids, computed by the first layer

    # transformers' Cache interface: nothing is stored here, positions are given explicitly.
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return query_length, 0

    def zipvl_attention(self, layer_idx, query, key, value, attention_mask, scaling, config) -> torch.Tensor:
        if self.segments is not None:
            return self._prefill(layer_idx, query, key, value, scaling)
        if self.extend is not None:
            return self._extend(layer_idx, query, key, value, scaling)
        return self._decode(layer_idx, query, key, value, scaling)

    # -- prefill ---------------------------------------------------------------------------------
    def _prefill(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        runner = self.runner
        q = query[0].transpose(0, 1)  # (T, H, d)
        k = key[0].transpose(0, 1)  # (T, Hkv, d)
        v = value[0].transpose(0, 1)
        out = q.new_zeros(q.shape)
        flash_batch = []
        for seg in self.segments:
            qs, ks, vs = q[seg.start : seg.end], k[seg.start : seg.end], v[seg.start : seg.end]
            n = seg.end - seg.start
            if seg.zipvl.is_dense_layer(layer):
                sel = dense_selection(n, q.device)
            else:
                sel = zipvl_select(
                    qs.transpose(0, 1), ks.transpose(0, 1), seg.zipvl, scaling, layer_idx=layer
                )
            seg.kept.append(sel.num_kept)
            seg.guard_fired += int(sel.guard_fired)
            if runner.backend == "flash":
                flash_batch.append((seg, sel.kept))
            else:
                sparse_causal_attention(
                    qs, ks, vs, sel.kept, scaling, backend="sdpa", out=out[seg.start : seg.end]
                )
            slots = runner.kv.allocate_tokens(seg.seq_id, layer, sel.num_kept)
            runner.pool.write(slots, ks.index_select(0, sel.kept), vs.index_select(0, sel.kept))
        if flash_batch:
            index = torch.cat([seg.start + kept for seg, kept in flash_batch])
            cu = [0]
            for _seg, kept in flash_batch:
                cu.append(cu[-1] + kept.numel())
            res = causal_attention_varlen(
                q.index_select(0, index),
                k.index_select(0, index),
                v.index_select(0, index),
                cu,
                scaling,
                "flash",
            )
            out.index_copy_(0, index, res)
        return out[None]

    # -- decode ------------------------------------------------------------------------------------
    def _decode(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        runner = self.runner
        runner.pool.write(self.new_slots[layer], key[:, :, 0], value[:, :, 0])
        lengths = self.lengths[layer]
        due = [(row, cfg) for row, cfg in self.compress if not cfg.is_dense_layer(layer)]
        if runner.paged_flash and not due:
            from flash_attn import flash_attn_with_kvcache

            table = runner.kv.block_table(self.seq_ids, layer, max(lengths))
            seqlens = torch.tensor(lengths, dtype=torch.int32, device=query.device)
            return flash_attn_with_kvcache(
                query.transpose(1, 2),
                runner.pool.keys,
                runner.pool.values,
                cache_seqlens=seqlens,
                block_table=table,
                softmax_scale=scaling,
                causal=True,
            )
        if self.rows is None:
            self.rows = runner.kv.rows(self.seq_ids)
        tables, valid = runner.kv.gather_blocks_index(self.seq_ids, layer, lengths, self.rows)
        k, v = runner.pool.gather_blocks(tables, valid)  # (B, L, Hkv, d), L a whole number of blocks
        group = query.shape[1] // k.shape[2]
        out = F.scaled_dot_product_attention(
            query,
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=scaling,
            enable_gqa=group > 1,
        )
        for row, cfg in due:
            self._compress_recent(layer, row, query[row, :, 0], k[row, : lengths[row]], scaling, cfg)
        return out.transpose(1, 2)

    # -- replay ------------------------------------------------------------------------------------
    def _extend(self, layer: int, query, key, value, scaling: float) -> torch.Tensor:
        """``c`` generated tokens of one sequence fed back at once: what ``c`` decode steps would compute.

        ``query``: ``(1, H, c, d)``; ``key`` / ``value``: ``(1, Hkv, c, d)``. Token ``i`` attends to the
        layer's ``L0`` held tokens and to chunk tokens ``0..i``, as its own decode step did; when the last
        token is due for decode compression, it runs on that token's query as in :meth:`_decode`.
        """
        runner = self.runner
        prior, cfg = self.extend
        seq_id = self.seq_ids[0]
        c = query.shape[2]
        runner.pool.write(self.new_slots[layer], key[0].transpose(0, 1), value[0].transpose(0, 1))
        length = prior[layer] + c
        compress = cfg is not None and not cfg.is_dense_layer(layer)
        if runner.paged_flash and not compress:
            # flash-attn aligns a causal mask to the bottom right: query i sees the first prior + i + 1 keys.
            from flash_attn import flash_attn_with_kvcache

            return flash_attn_with_kvcache(
                query.transpose(1, 2),
                runner.pool.keys,
                runner.pool.values,
                cache_seqlens=torch.tensor([length], dtype=torch.int32, device=query.device),
                block_table=runner.kv.block_table([seq_id], layer, length),
                softmax_scale=scaling,
                causal=True,
            )
        k, v = runner.pool.gather(runner.kv.layer_slots(seq_id, layer, 0, length))  # (length, Hkv, d)
        allowed = torch.ones(c, length, dtype=torch.bool, device=query.device).tril(diagonal=prior[layer])
        group = query.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            query,
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=allowed[None, None],
            scale=scaling,
            enable_gqa=group > 1,
        )
        if compress:
            self._compress_recent(layer, 0, query[0, :, -1], k, scaling, cfg)
        return out.transpose(1, 2)

    def _compress_recent(self, layer: int, row: int, query, keys, scaling: float, cfg: ZipVLConfig) -> None:
        """``decode_compress_interval``: keep the important ones among the last ``interval`` tokens of a layer.

        ``query``: ``(H, d)`` of the token just fed; ``keys``: ``(L, Hkv, d)`` of this layer (new token included).
        """
        window = min(cfg.decode_compress_interval, keys.shape[0])
        if window <= 1:
            return
        group = query.shape[0] // keys.shape[1]
        expanded = keys.float().repeat_interleave(group, dim=1)  # (L, H, d)
        logits = torch.einsum("hd,lhd->hl", query.float(), expanded) * scaling
        scores = torch.softmax(logits, dim=-1).sum(dim=0)[-window:]  # (window,)
        p = adaptive_count(scores, cfg.tau)
        keep = torch.zeros(window, dtype=torch.bool, device=scores.device)
        keep[torch.topk(scores, p).indices] = True
        keep[-1] = True
        if bool(keep.all()):
            return
        runner = self.runner
        seq_id = self.seq_ids[row]
        length = keys.shape[0]
        start = length - window
        kept_slots = runner.kv.layer_slots(seq_id, layer, start, length)[keep]
        k_kept, v_kept = runner.pool.gather(kept_slots)
        new_length = start + int(keep.sum())
        runner.pool.write(runner.kv.layer_slots(seq_id, layer, start, new_length), k_kept, v_kept)
        runner.kv.truncate(seq_id, layer, new_length)


#: Set to 1 to serve a ``max_model_len`` beyond the model's context (a warning instead of an error), as
#: vLLM's ``VLLM_ALLOW_LONG_MAX_MODEL_LEN``: for a model known to extrapolate, at the user's risk.
ALLOW_LONG_MAX_MODEL_LEN_ENV = "ZIPVL_ALLOW_LONG_MAX_MODEL_LEN"


def model_context_length(model) -> int | None:
    """The longest context the text model was built for: ``max_position_embeddings``, times the RoPE
    scaling factor when one extends it (linear, YaRN, ...: from ``original_max_position_embeddings``
    when the config gives it). None when the config says nothing."""
    text = model.config.get_text_config()
    limit = getattr(text, "max_position_embeddings", None)
    if not isinstance(limit, int):
        return None
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default", "mrope"):
        factor = rope.get("factor")
        if isinstance(factor, int | float) and factor > 1:
            base = rope.get("original_max_position_embeddings") or getattr(
                text, "original_max_position_embeddings", None
            )
            limit = max(limit, int((base or limit) * factor))
    return limit


def _check_max_model_len(model, max_model_len: int) -> None:
    limit = model_context_length(model)
    if limit is None or max_model_len <= limit:
        return
    message = (
        f"max_model_len {max_model_len} is longer than the model's context of {limit} tokens "
        "(max_position_embeddings, with its RoPE scaling): positions past it were never trained and the "
        f"answers would degrade silently. Set the engine's max_model_len to {limit} or less"
    )
    if os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV) == "1":
        logger.warning("%s (allowed by %s=1)", message, ALLOW_LONG_MAX_MODEL_LEN_ENV)
        return
    raise ValueError(f"{message}, or set {ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to serve it anyway.")


def _batch_dependent_rope(model, max_model_len: int) -> list[str]:
    """The text model's rotary types whose frequencies would depend on the packed batch: dynamic NTK and
    LongRoPE rescale from the longest position of the forward once it passes the original context, which
    ``max_model_len`` allows when it is longer. Empty when there is none."""
    from zipvl_ray.attention import language_model

    found = []
    for module in language_model(model).modules():
        rope_type = getattr(module, "rope_type", None)
        types = rope_type.values() if isinstance(rope_type, dict) else [rope_type]
        original = getattr(module, "original_max_seq_len", None)
        for t in types:
            scaling = isinstance(t, str) and ("dynamic" in t or t == "longrope")
            if scaling and (original is None or max_model_len > original):
                found.append(t)
    return sorted(set(found))


class ModelRunner:
    """Owns the model, the KV pool and the block tables; runs prefill and decode forwards.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A ZipVL-enabled VLM (``zipvl_ray.models.load_model``).
    config : EngineConfig
    """

    def __init__(self, model, config: EngineConfig):
        scaled = _batch_dependent_rope(model, config.max_model_len)
        if scaled:
            raise ValueError(
                f"RoPE scaling {scaled} past {config.max_model_len} tokens is not supported by the paged "
                "engine: its frequencies depend on the longest position of the forward, and the engine packs "
                "several sequences into one, so a request's answer would depend on its batch. Set "
                "max_model_len to the model's original context or less (the reference path, "
                "model.generate with ZipVLCache, serves it either way)"
            )
        _check_max_model_len(model, config.max_model_len)
        self.model = model
        self.config = config
        self.adapter = VLMAdapter(model)
        self.geometry = self.adapter.geometry()
        device = self.adapter.device
        self.layout = KVLayout(
            num_layers=self.geometry.num_layers,
            num_kv_heads=self.geometry.num_kv_heads,
            head_dim=self.geometry.head_dim,
            block_size=config.block_size,
            dtype=self.geometry.dtype,
        )
        num_blocks = pool_blocks(self.layout, config.kv_cache_bytes, config.gpu_memory_utilization, device)
        self.pool = KVPool(self.layout, num_blocks, device)
        self.kv = KVCacheManager(self.layout, num_blocks, config.max_num_seqs, config.max_model_len, device)
        self.backend = attention_backend(device, self.geometry.dtype, config.attention_backend)
        self.paged_flash = self.backend == "flash" and config.block_size % 256 == 0
        self.device = device

    @property
    def block_bytes(self) -> int:
        return self.layout.block_bytes

    @torch.no_grad()
    def prefill(self, seqs) -> tuple[torch.Tensor, list[Segment]]:
        """Prefill ``seqs`` (packed) and write their kept KV. Returns last-token logits ``(S, V)`` and the segments.

        On :class:`OutOfBlocks`, or any error of the forward, every block taken by this call is returned
        before the error propagates.
        """
        segments, ids, positions, features = [], [], [], []
        start = 0
        for seq in seqs:
            n = seq.num_prompt_tokens
            segments.append(Segment(seq.request_id, start, start + n, seq.zipvl))
            ids.extend(seq.prompt_token_ids)
            positions.append(seq.positions)
            features.extend(seq.image_features)
            start += n
        token_ids = torch.tensor(ids, device=self.device)
        embeds = self.adapter.embed(token_ids, features)
        pos = torch.cat(positions, dim=1).to(self.device)  # (P, T)
        position_ids = pos[:, None, :] if self.adapter.uses_mrope else pos
        context = StepKV(self, segments=segments)
        try:
            for seq in seqs:  # inside: a row that cannot open must not leave the earlier ones theirs
                self.kv.open(seq.request_id)
            hidden = self.adapter.language_model(
                inputs_embeds=embeds[None], position_ids=position_ids, past_key_values=context, use_cache=True
            ).last_hidden_state[0]
        except BaseException:  # out of blocks, or a failed forward: nothing stays held
            for seq in seqs:
                self.kv.free(seq.request_id)
            raise
        last = torch.tensor([seg.end - 1 for seg in segments], device=self.device)
        logits = self.adapter.lm_head(hidden.index_select(0, last))
        return logits.float(), segments

    @torch.no_grad()
    def decode(self, seqs) -> torch.Tensor:
        """One decode step for ``seqs`` (each feeds ``output_token_ids[num_fed]``). Returns logits ``(B, V)``."""
        seq_ids = [s.request_id for s in seqs]
        new_slots = self.kv.append_slots(seq_ids)  # raises OutOfBlocks before touching anything
        lengths = self.kv.lengths(seq_ids)
        token_ids = torch.tensor([s.output_token_ids[s.num_fed] for s in seqs], device=self.device)
        embeds = self.adapter.embed(token_ids, [])[:, None, :]  # (B, 1, hidden)
        pos = torch.tensor([s.decode_position() for s in seqs], device=self.device)[:, None]  # (B, 1)
        position_ids = pos[None].expand(3, -1, -1) if self.adapter.uses_mrope else pos
        compress = [
            (row, s.zipvl)
            for row, s in enumerate(seqs)
            # An interval of 1 would compress a window of one token, i.e. nothing (and force the gather path).
            if s.zipvl.decode_compress_interval > 1
            and (s.num_fed + 1) % s.zipvl.decode_compress_interval == 0
        ]
        context = StepKV(self, seq_ids=seq_ids, new_slots=new_slots, lengths=lengths, compress=compress)
        hidden = self.adapter.language_model(
            inputs_embeds=embeds, position_ids=position_ids, past_key_values=context, use_cache=True
        ).last_hidden_state[:, -1]
        return self.adapter.lm_head(hidden).float()

    #: Bytes one replay chunk's attention scores may take, ``num_heads x chunk x layer length x 4``: with a
    #: mask and grouped KV heads, CUDA's SDPA falls back to its math kernel, which materialises them (a 7B
    #: model's 8,000-token chunk over 10,000 held tokens would take ~9 GB per copy).
    REPLAY_SCORE_BYTES = 256 << 20

    def max_replay_tokens(self, seq) -> int:
        """The longest replay chunk for ``seq`` under :attr:`REPLAY_SCORE_BYTES` (at least 1); unbounded under
        paged flash-attn without decode compression, which never materialises the scores (with it, a chunk
        ending at a compression boundary takes the gather path, so the cap stays)."""
        if self.paged_flash and seq.zipvl.decode_compress_interval <= 1:
            return max(1, seq.replay_backlog())  # every chunk attends through flash: no scores are kept
        longest = max(self.kv.seqs[seq.request_id].lengths) + seq.replay_backlog()
        return max(1, self.REPLAY_SCORE_BYTES // (4 * self.geometry.num_heads * max(1, longest)))

    @torch.no_grad()
    def replay(self, seq, num_tokens: int) -> None:
        """Feed ``output_token_ids[num_fed : num_fed + num_tokens]`` of a recomputed (preempted) sequence
        back in one forward, writing their KV as ``num_tokens`` decode steps would (no logits: they were
        sampled before). ``num_tokens`` must not cross a ``decode_compress_interval`` boundary except at
        its last token. Raises :class:`OutOfBlocks` before anything changes; any other error leaves the
        layers grown past what was written, and the caller must fail the sequence (the engine's
        ``fail_step`` frees it)."""
        interval = seq.zipvl.decode_compress_interval
        if interval and interval > 1 and (seq.num_fed % interval) + num_tokens > interval:
            raise ValueError(f"a replay of {num_tokens} tokens crosses a compression boundary")
        prior = self.kv.lengths([seq.request_id])  # [layer][0]
        new_slots = self.kv.extend_slots(seq.request_id, num_tokens)
        first = seq.num_fed
        token_ids = torch.tensor(seq.output_token_ids[first : first + num_tokens], device=self.device)
        embeds = self.adapter.embed(token_ids, [])[None]  # (1, c, hidden)
        pos = torch.arange(seq.decode_position(), seq.decode_position() + num_tokens, device=self.device)[
            None
        ]
        position_ids = pos[None].expand(3, -1, -1) if self.adapter.uses_mrope else pos
        due = interval > 1 and (first + num_tokens) % interval == 0  # an interval of 1 compresses nothing
        context = StepKV(
            self,
            seq_ids=[seq.request_id],
            new_slots=new_slots,
            extend=([length[0] for length in prior], seq.zipvl if due else None),
        )
        self.adapter.language_model(
            inputs_embeds=embeds, position_ids=position_ids, past_key_values=context, use_cache=True
        )

    def dense_bytes(self, num_tokens: int) -> int:
        """Block-rounded bytes ``num_tokens`` tokens would hold in every layer without eviction."""
        return self.layout.num_layers * (-(-num_tokens // self.layout.block_size)) * self.layout.block_bytes
