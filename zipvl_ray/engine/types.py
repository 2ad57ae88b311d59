"""Requests and results of the engine: sampling parameters, outputs, metrics and engine stats."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

FinishReason = Literal["stop", "length", "abort", "error"]


class RequestError(ValueError):
    """A request the engine refuses (bad prompt or parameters). Serving maps it to HTTP 400."""


class EngineDeadError(RuntimeError):
    """The engine's thread has stopped (shut down, or an error outside a step it could not survive): no
    request can run until the replica is replaced. Serving maps it to HTTP 503."""


GREEDY_TEMPERATURE = 1e-5
"""Sampling at a lower temperature is greedy decoding (vLLM's ``_SAMPLING_EPS``)."""


#: Largest ``repetition_penalty`` (vLLM sets none; past about 2 a model stops forming words).
MAX_REPETITION_PENALTY = 10.0


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(slots=True)
class SamplingParams:
    """How tokens are drawn for one request.

    Attributes
    ----------
    max_tokens : int
        Most tokens to generate (>= 1).
    temperature : float
        0 is greedy; otherwise logits are divided by it before sampling (0 <= t <= 2).
    top_p : float
        Nucleus sampling mass in (0, 1].
    top_k : int
        Keep only the k most likely tokens; 0 turns it off.
    seed : int or None
        Seed of this request's sampling generator (same seed -> same tokens, also after preemption).
    stop : list[str]
        Stop strings; the output is cut before the first one.
    stop_token_ids : list[int]
        Token ids that end the request (besides EOS); they are not included in the output.
    ignore_eos : bool
        Keep generating past EOS (benchmarks).
    logprobs : int or None
        Return the log-probability of each chosen token and the ``logprobs`` most likely ones (0-20).
        They are the model's raw distribution: before penalties, temperature, top-k and top-p.
    presence_penalty, frequency_penalty : float
        OpenAI's penalties in [-2, 2]: a token's logit is lowered by ``presence_penalty`` once it appears
        in the output and by ``frequency_penalty`` x the times it appears (generated tokens only).
    repetition_penalty : float
        vLLM's and transformers' (> 0, 1 is off): the logit of every token of the prompt or the output is
        divided by it where positive, multiplied where negative.
    output_kind : {"stream", "final_only"}
        ``"stream"``: an output after every new token (cumulative, plus the delta since the previous
        one). ``"final_only"``: only the finished output (vLLM's ``RequestOutputKind.FINAL_ONLY``), for
        non-streamed requests: the engine then builds no per-token output and, without stop strings,
        detokenizes once at the end. Tokens and text are the same either way.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    output_kind: Literal["stream", "final_only"] = "stream"
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        checks = [
            (isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens must be an integer >= 1"),
            (
                isinstance(self.temperature, int | float)
                and 0.0 <= self.temperature <= 2.0
                and math.isfinite(self.temperature),
                "temperature must be in [0, 2]",
            ),
            (isinstance(self.top_p, int | float) and 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (isinstance(self.top_k, int) and self.top_k >= 0, "top_k must be an integer >= 0"),
            (
                self.logprobs is None
                or (
                    isinstance(self.logprobs, int)
                    and not isinstance(self.logprobs, bool)
                    and 0 <= self.logprobs <= 20
                ),
                "logprobs must be an integer in [0, 20]",
            ),
            (
                self.seed is None
                or (
                    isinstance(self.seed, int)
                    and not isinstance(self.seed, bool)
                    and -(2**63) <= self.seed < 2**64
                ),
                "seed must be an integer in [-2**63, 2**64)",
            ),
            *(
                (
                    _is_number(getattr(self, name)) and -2.0 <= getattr(self, name) <= 2.0,
                    f"{name} must be in [-2, 2]",
                )
                for name in ("presence_penalty", "frequency_penalty")
            ),
            (
                _is_number(self.repetition_penalty)
                and 0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY,
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop must hold non-empty strings"),
            (len(self.stop) <= 16, "stop may hold at most 16 strings"),
            (self.output_kind in ("stream", "final_only"), "output_kind must be 'stream' or 'final_only'"),
        ]
        for ok, message in checks:
            if not ok:
                raise RequestError(message)

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits. ``getattr``: parameters pickled by an older ingress
        during a rolling update lack the fields."""
        return (
            getattr(self, "presence_penalty", 0.0) != 0.0
            or getattr(self, "frequency_penalty", 0.0) != 0.0
            or getattr(self, "repetition_penalty", 1.0) != 1.0
        )

    @property
    def greedy(self) -> bool:
        """Temperatures below :data:`GREEDY_TEMPERATURE` are greedy (as in vLLM): dividing logits by them
        overflows."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


@dataclass
class RequestMetrics:
    """What one request cost and what ZipVL did to it.

    Attributes
    ----------
    prompt_tokens, image_tokens : int
        Prompt length and how many of its tokens are image placeholders.
    kept_tokens_per_layer : list[int]
        Prompt tokens each decoder layer kept after ZipVL prefill.
    kv_bytes : int
        KV bytes the request holds (block-rounded, all layers) after prefill / now / at finish.
    kv_bytes_dense : int
        Bytes the same tokens would hold without ZipVL (block-rounded likewise).
    kv_bytes_after_prefill, kv_bytes_dense_after_prefill : int
        ``kv_bytes`` and ``kv_bytes_dense`` right after the request's first prefill (0 before it), kept
        when the two above move on.
    predicted_kv_bytes : int
        The admission prediction of the post-prefill footprint (to measure prediction error).
    queue_time_s, ttft_s, decode_time_s : float
        Waiting before the first prefill, arrival to first token, first token to finish.
    num_preemptions : int
        Times the request was preempted (freed and recomputed).
    guard_fired : int
        Layers where the last prompt position had to be forced into the kept set.
    arrival_ns, prefill_start_ns, first_token_ns, finish_ns : int
        Wall-clock timestamps (``time.time_ns()``) of arrival, the start of the (first) prefill step,
        the first token and the end; 0 when not reached. Tracing builds queue / prefill / decode spans
        from them.
    last_token_ns : int
        When the last token of ``token_ids`` was generated (a request that stops on EOS finishes one step
        later, with a token it does not keep): time per output token is measured up to it.
    attention_flops_saved : float
        ``1 - mean_l (kept_l / n)^2``: the share of prefill attention FLOPs ZipVL avoided.
    """

    prompt_tokens: int = 0
    image_tokens: int = 0
    kept_tokens_per_layer: list[int] = field(default_factory=list)
    kv_bytes: int = 0
    kv_bytes_dense: int = 0
    kv_bytes_after_prefill: int = 0
    kv_bytes_dense_after_prefill: int = 0
    predicted_kv_bytes: int = 0
    queue_time_s: float = 0.0
    ttft_s: float | None = None
    decode_time_s: float = 0.0
    num_preemptions: int = 0
    guard_fired: int = 0
    arrival_ns: int = 0
    prefill_start_ns: int = 0
    first_token_ns: int = 0
    finish_ns: int = 0
    last_token_ns: int = 0

    @property
    def attention_flops_saved(self) -> float:
        n = self.prompt_tokens
        kept = self.kept_tokens_per_layer
        if not n or not kept:
            return 0.0
        return 1.0 - sum((k / n) ** 2 for k in kept) / len(kept)

    @property
    def kept_ratio_per_layer(self) -> list[float]:
        n = max(self.prompt_tokens, 1)
        return [k / n for k in self.kept_tokens_per_layer]

    @property
    def mean_kept_ratio(self) -> float:
        ratios = self.kept_ratio_per_layer
        return sum(ratios) / len(ratios) if ratios else 1.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kept_ratio_per_layer"] = self.kept_ratio_per_layer
        out["mean_kept_ratio"] = self.mean_kept_ratio
        out["attention_flops_saved"] = self.attention_flops_saved
        return out


@dataclass
class RequestOutput:
    """The state of a request: cumulative output, plus the delta since the previous yield when streaming.

    Attributes
    ----------
    request_id : str
    token_ids : list[int]
        All generated tokens so far (stop tokens and text after a stop string excluded).
    text : str
        Their detokenized text.
    delta_token_ids, delta_text
        What this update adds (streaming).
    finished : bool
    finish_reason : {"stop", "length", "abort", "error"} or None
    logprobs : list[dict] or None
        Per generated token: ``{"token_id", "logprob", "top": [(token_id, logprob), ...]}`` (None unless
        :attr:`SamplingParams.logprobs` is set).
    delta_logprobs : list[dict] or None
        The entries of ``logprobs`` for ``delta_token_ids`` (streaming); the one field a non-final output
        carries across a process boundary (cumulative lists in every update would cost O(n^2)).
    metrics : RequestMetrics
    error : str or None
        Message when ``finish_reason == "error"``.
    """

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_text: str = ""
    finished: bool = False
    finish_reason: FinishReason | None = None
    logprobs: list[dict] | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    error: str | None = None
    delta_logprobs: list[dict] | None = None


@dataclass
class EngineStats:
    """A snapshot of one engine (one LLM replica), cheap enough to take every second.

    Attributes
    ----------
    kv_bytes_used, kv_bytes_capacity : int
        Pool bytes held by sequences / the whole pool.
    kv_blocks_used, kv_blocks_total : int
    block_size : int
        Tokens per block.
    block_bytes : int
        Bytes of one block of one layer (keys + values).
    num_layers : int
    dense_bytes_per_token : int
        Bytes one token costs in all layers without eviction (``2 * Hkv * d * dtype * layers``).
    num_running, num_waiting : int
    mean_kept_fraction : float
        Running mean (over recent prefills) of the kept fraction, averaged over layers.
    kept_fraction_per_layer : list[float]
    reserved_bytes : int
        Bytes admission has promised to running sequences for their decode growth, not yet used.
    num_preemptions, num_finished, num_aborted : int
        Totals since start.
    num_aborted_waiting : int
        Of ``num_aborted``, the requests aborted while in the waiting queue (never scheduled, or
        preempted and not yet resumed): their clients left before the engine had room for them.
    prefill_tokens, decode_tokens : int
        Totals since start (``decode_tokens``: tokens fed by decode steps).
    replayed_tokens : int
        Total since start of the generated tokens that preempted sequences fed back in replay forwards
        after their recomputed prefill (not counted in ``decode_tokens``).
    kv_bytes_saved : int
        Dense-equivalent bytes minus held bytes, over the sequences held now.
    prediction_error_mean : float
        Mean relative error ``(held after prefill - predicted) / predicted`` over recent requests.
    max_concurrent_seqs : int
        Most sequences decoded in one step since start.
    committed_lifetime_bytes : int
        Predicted bytes of every running and waiting request at the end of its generation (its whole
        remaining ``max_tokens``, block-rounded): the demand the replica has accepted.
    waiting_prompt_tokens : int
        Prompt tokens of the waiting requests.
    zipvl_tau, zipvl_max_keep_ratio : float
        The engine's default ZipVL setting (``tau`` 1.0 when ZipVL is off), under which
        ``kept_fraction_per_layer`` is measured; predictions for per-request overrides that keep more
        than it do not trust those fractions.
    zipvl_dense_layers : list[int]
        Layers the engine's ZipVL setting keeps dense (every token, whatever ``max_keep_ratio``; empty
        when ZipVL is off, which keeps every layer whole anyway).
    """

    kv_bytes_used: int = 0
    kv_bytes_capacity: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    block_size: int = 16
    block_bytes: int = 0
    num_layers: int = 0
    dense_bytes_per_token: int = 0
    num_running: int = 0
    num_waiting: int = 0
    mean_kept_fraction: float = 1.0
    kept_fraction_per_layer: list[float] = field(default_factory=list)
    reserved_bytes: int = 0
    num_preemptions: int = 0
    num_finished: int = 0
    num_aborted: int = 0
    num_aborted_waiting: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    replayed_tokens: int = 0
    kv_bytes_saved: int = 0
    prediction_error_mean: float = 0.0
    max_concurrent_seqs: int = 0
    committed_lifetime_bytes: int = 0
    waiting_prompt_tokens: int = 0
    zipvl_tau: float = 1.0
    zipvl_max_keep_ratio: float | None = None
    zipvl_dense_layers: list[int] = field(default_factory=list)

    @property
    def kv_utilization(self) -> float:
        return self.kv_bytes_used / self.kv_bytes_capacity if self.kv_bytes_capacity else 0.0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kv_utilization"] = self.kv_utilization
        return out


#: What the engine says when a request does not fit in the whole KV pool even alone
#: (``LLMEngine._prefill_did_not_fit``).
POOL_OVERFLOW_ERROR = "more KV memory than the whole pool holds"


def needs_more_than_the_pool(output: RequestOutput) -> bool:
    """True for the engine's refusal of a request that cannot fit in the replica's KV pool even alone."""
    return (
        output.finish_reason == "error"
        and not output.token_ids
        and POOL_OVERFLOW_ERROR in (output.error or "")
    )


def pool_overflow_message(capacity_bytes: int) -> str:
    """The client's message for :func:`needs_more_than_the_pool`."""
    return (
        f"the request needs more KV cache memory than one model replica holds ({capacity_bytes} bytes), even "
        "after ZipVL pruning: send fewer or smaller images, a shorter prompt or a smaller max_tokens"
    )
