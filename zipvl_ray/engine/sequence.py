"""One request inside the engine: its prompt, its generated tokens and its progress."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from zipvl_ray.config import ZipVLConfig
from zipvl_ray.engine.types import FinishReason, RequestMetrics, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """A request being served.

    Attributes
    ----------
    request_id : str
    prompt_token_ids : list[int]
    image_features : list[torch.Tensor]
        ``(n_i, hidden)`` per image, in placeholder order.
    positions : torch.LongTensor
        Rotary positions of the prompt, ``(1, n)`` or ``(3, n)`` (M-RoPE).
    next_position : int
        Position of the first generated token.
    sampling : SamplingParams
    zipvl : ZipVLConfig
        This request's ZipVL settings (the engine default with per-request overrides).
    output_token_ids : list[int]
        Tokens generated so far.
    num_fed : int
        How many of ``output_token_ids`` have their KV in the cache. After a preemption the engine
        recomputes the prompt and feeds the generated tokens back (a replay forward, or decode steps
        when the pool cannot hold them at once) before sampling again, so the request returns exactly
        the tokens it would have returned.
    """

    request_id: str
    prompt_token_ids: list[int]
    image_features: list[torch.Tensor]
    positions: torch.Tensor
    next_position: int
    sampling: SamplingParams
    zipvl: ZipVLConfig
    image_tokens: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[dict] = field(default_factory=list)
    num_fed: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None
    generator: torch.Generator | None = None
    arrival_time: float = field(default_factory=time.perf_counter)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None
    metrics: RequestMetrics = field(default_factory=RequestMetrics)
    uses_default_zipvl: bool = True
    prefill_did_not_fit: bool = False  # a prefill ran out of blocks: sized dense until one fits
    # streaming bookkeeping
    text: str = ""
    text_limit: int | None = None  # the text is cut here (before a stop string)
    text_tokens: int = 0  # how many output tokens ``text`` was decoded from
    text_exact: bool = False  # ``text`` is ``decode`` of all of them (not the incremental stream's)
    text_stream: Any = None  # tokenizers' DecodeStream (None: not started, False: given up, decode whole)
    streamed_text: str = ""  # what the stream produced (uncut)
    sent_tokens: int = 0
    sent_text_len: int = 0
    _distinct_prompt_ids: torch.Tensor | None = field(default=None, repr=False)

    def distinct_prompt_ids(self) -> torch.Tensor:
        """The prompt's distinct token ids (``repetition_penalty``), computed once."""
        if self._distinct_prompt_ids is None:
            self._distinct_prompt_ids = torch.tensor(self.prompt_token_ids, dtype=torch.long).unique()
        return self._distinct_prompt_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def replaying(self) -> bool:
        """True while generated tokens are being fed back after a preemption."""
        return self.num_fed < len(self.output_token_ids) - 1

    def decode_position(self) -> int:
        """Rotary position of the token fed in the next decode step."""
        return self.next_position + self.num_fed

    def remaining_tokens(self) -> int:
        return self.sampling.max_tokens - len(self.output_token_ids)

    def replay_backlog(self) -> int:
        """Generated tokens a preempted sequence still has to feed back (their KV is appended again)."""
        return max(0, len(self.output_token_ids) - 1 - self.num_fed)
