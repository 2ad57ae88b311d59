"""Typed configuration of ZipVL and of the engine.

Both are pydantic models so that the same objects validate Python calls, YAML ``args:`` of the Ray
Serve application and per-request overrides arriving over HTTP. Every field is described; values out
of range raise :class:`pydantic.ValidationError` whose message names the field.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ZipVLConfig(BaseModel):
    """How ZipVL picks, per decoder layer, the tokens that take part in attention and stay cached.

    Paper: He et al., "ZipVL: Efficient Large Vision-Language Models with Dynamic Token
    Sparsification", arXiv 2410.08584. The algorithm is described in ``docs/algorithm.md``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Run ZipVL. False makes every layer dense (all tokens attend, all are cached)."
    )
    tau: float = Field(
        0.975,
        gt=0.0,
        le=1.0,
        description=(
            "Attention-mass threshold of the layer-wise adaptive count (paper Eq. 6): each layer keeps the "
            "fewest tokens whose accumulated probe attention reaches tau of the total. 1.0 keeps every token "
            "(identical to dense attention); the paper's accuracy degrades below about 0.97."
        ),
    )
    probe_recent: int = Field(
        64, ge=0, description="Number of most recent positions used as probe queries (always included)."
    )
    probe_random: int = Field(
        64,
        ge=0,
        description=(
            "Number of probe queries drawn uniformly without replacement from the earlier positions. When the "
            "prompt has at most probe_recent + probe_random tokens every position is a probe (exact scores)."
        ),
    )
    normalize: Literal["probe_count", "causal_length"] = Field(
        "probe_count",
        description=(
            "Denominator of the normalized score (Eq. 7): 'probe_count' divides a key's accumulated score by "
            "the number of (probe row, head) pairs that may attend to it under the causal mask; "
            "'causal_length' divides by n - j (ZipCache's reading, strongly favours recent tokens)."
        ),
    )
    keep_last: bool = Field(
        True, description="Always keep the final prompt position (it produces the first generated token)."
    )
    dense_layers: list[int] = Field(
        default_factory=list,
        description="Decoder layer indices that stay dense (no selection, no eviction).",
    )
    min_keep_ratio: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="Lower bound of the kept fraction per layer (ceil(ratio * n) tokens).",
    )
    max_keep_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Hard token budget: caps the adaptive count at ceil(ratio * n) tokens per layer (at least 1). "
            "None means no cap."
        ),
    )
    decode_compress_interval: int = Field(
        0,
        ge=0,
        description=(
            "Every this many generated tokens, re-score the most recent window of that many generated tokens "
            "with the current query and evict the unimportant ones (tau applies to the window). 0 turns it off; "
            "1 (a window of one token, the one just fed) evicts nothing either."
        ),
    )
    seed: int | None = Field(
        None,
        description=(
            "Seed of the random probe positions. The draw is always deterministic per (seed, layer, prompt "
            "length), so recomputation after preemption and the reference path reproduce it; None uses seed 0."
        ),
    )
    count_metric: Literal["accumulated", "normalized"] = Field(
        "accumulated",
        description="Scores the adaptive count is computed from (the paper's best: accumulated). For ablations.",
    )
    select_metric: Literal["normalized", "accumulated", "random"] = Field(
        "normalized",
        description=(
            "Scores the important set is chosen by (the paper's best: normalized). 'random' picks the same "
            "number of tokens uniformly at random (an ablation baseline)."
        ),
    )

    @model_validator(mode="after")
    def _check_ranges(self) -> ZipVLConfig:
        if self.probe_recent + self.probe_random < 1:
            raise ValueError("probe_recent + probe_random must be at least 1 (ZipVL needs a probe query)")
        if self.max_keep_ratio is not None and self.min_keep_ratio > self.max_keep_ratio:
            raise ValueError(
                f"min_keep_ratio ({self.min_keep_ratio}) must not exceed max_keep_ratio ({self.max_keep_ratio})"
            )
        if any(i < 0 for i in self.dense_layers):
            raise ValueError("dense_layers must hold non-negative layer indices")
        return self

    def with_overrides(self, **overrides: Any) -> ZipVLConfig:
        """Return a validated copy with the non-None ``overrides`` applied (per-request knobs)."""
        updates = {k: v for k, v in overrides.items() if v is not None}
        if not updates:
            return self
        return ZipVLConfig.model_validate({**self.model_dump(), **updates})

    def is_dense_layer(self, layer_idx: int) -> bool:
        """True when ``layer_idx`` attends densely and keeps its whole cache."""
        return (not self.enabled) or layer_idx in self.dense_layers

    def token_bounds(self, n: int) -> tuple[int, int]:
        """Smallest and largest number of kept tokens allowed for an ``n``-token prompt."""
        low = max(1, ratio_ceil(self.min_keep_ratio, n))
        high = n if self.max_keep_ratio is None else max(1, ratio_ceil(self.max_keep_ratio, n))
        return min(low, n), min(high, n)


def ratio_ceil(ratio: float, n: int) -> int:
    """``ceil(ratio * n)`` that ignores float noise (``ceil(0.3 * 10)`` is 3, not 4)."""
    return math.ceil(ratio * n - 1e-9)


class EngineConfig(BaseModel):
    """Memory and batching limits of the paged engine (one per LLM replica)."""

    model_config = ConfigDict(extra="forbid")

    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV block.")
    kv_cache_bytes: int | None = Field(
        None,
        ge=0,
        description=(
            "Bytes of the preallocated KV pool. None: on CUDA, gpu_memory_utilization of the free memory after "
            "loading the model; on CPU, 256 MiB."
        ),
    )
    gpu_memory_utilization: float = Field(
        0.85,
        gt=0.0,
        le=1.0,
        description="Fraction of free GPU memory given to the KV pool when kv_cache_bytes is None.",
    )
    max_num_seqs: int = Field(64, ge=1, description="Most sequences in one decode batch.")
    max_num_batched_tokens: int = Field(
        16384,
        ge=1,
        description=(
            "Most prompt tokens prefilled in one step. A single prompt longer than this is still prefilled alone "
            "(ZipVL selects over the whole prompt, so prompts are never split). Also the most generated tokens "
            "that preempted sequences feed back (replay) in one step; the rest follow at the next steps."
        ),
    )
    max_model_len: int = Field(32768, ge=2, description="Longest prompt + generation, in tokens.")
    decode_headroom_tokens: int = Field(
        64,
        ge=0,
        description=(
            "Decode growth reserved at admission, per layer: min(max_tokens, this) tokens on top of the predicted "
            "retained prompt footprint."
        ),
    )
    max_prefills_between_decodes: int = Field(
        4,
        ge=1,
        description=(
            "Prefill steps in a row while sequences are running, before one decode step of them is forced. "
            "Requests that finish in their prefill (max_tokens 1, an immediate end) never join the running "
            "batch, so without this bound a stream of them kept the running sequences from decoding."
        ),
    )
    default_keep_fraction: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description=(
            "Kept fraction assumed by admission before the engine has observed any prefill (conservative: 1.0)."
        ),
    )
    attention_backend: Literal["auto", "sdpa", "flash"] = Field(
        "auto",
        description=(
            "Attention kernels: 'auto' uses flash-attn (varlen prefill; paged decode when block_size is a multiple "
            "of 256, flash-attn's page-size rule) on CUDA when it is importable, else torch SDPA; 'sdpa' forces SDPA."
        ),
    )
    keep_fraction_ema: float = Field(
        0.2,
        gt=0.0,
        le=1.0,
        description="Weight of the newest prefill in the running mean kept fraction per layer.",
    )
    unhealthy_after_step_s: float | None = Field(
        600.0,
        gt=0.0,
        description=(
            "The replica's health check fails once one engine step has run this long (a hung kernel or "
            "collective: the step holds the engine, so every request on the replica stalls and no abort "
            "gets through), so that Serve replaces the replica. Set it above the longest prefill the "
            "replica may run (a long CPU prefill takes minutes). None: never."
        ),
    )
