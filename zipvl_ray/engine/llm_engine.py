"""The synchronous engine core: requests in, one step at a time, outputs out.

``add_request`` validates and queues; ``step`` runs one prefill or decode step (see
:mod:`zipvl_ray.engine.scheduler`) and returns the outputs of the requests it advanced.
:class:`~zipvl_ray.engine.llm.LLM` drives it to completion offline and
:class:`~zipvl_ray.engine.async_engine.AsyncLLMEngine` runs it in a background thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.detokenizer import Detokenizer, first_stop, partial_stop_length
from zipvl_ray.engine.model_runner import ModelRunner
from zipvl_ray.engine.sampler import make_generator, sample
from zipvl_ray.engine.scheduler import Scheduler
from zipvl_ray.engine.sequence import Sequence, SequenceStatus
from zipvl_ray.engine.types import (
    POOL_OVERFLOW_ERROR,
    EngineStats,
    RequestError,
    RequestOutput,
    SamplingParams,
)
from zipvl_ray.kv import OutOfBlocks
from zipvl_ray.multimodal import PreparedPrompt, PromptError, PromptProcessor
from zipvl_ray.routing.footprint import blocks_for, predict_bytes
from zipvl_ray.vision import ImageFeatures, VisionEncoder

logger = logging.getLogger(__name__)


@dataclass
class EncodedPrompt:
    """A prompt whose images were already encoded by a separate vision stage.

    Attributes
    ----------
    token_ids : list[int]
        The prompt with expanded image placeholders.
    image_features : list[ImageFeatures]
        One per image, in placeholder order.
    """

    token_ids: list[int]
    image_features: list[ImageFeatures]


PromptLike = EncodedPrompt | PreparedPrompt | str | dict | list


class LLMEngine:
    """Paged, continuously batching ZipVL engine over one model.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        ZipVL-enabled VLM (see :func:`zipvl_ray.models.load_model`).
    processor : transformers.ProcessorMixin or None
        Needed for text / chat prompts and for decoding output text.
    zipvl : ZipVLConfig, optional
        Default ZipVL settings (per-request overrides apply on top).
    engine : EngineConfig, optional
    vision : VisionEncoder, optional
        Encodes pixels of :class:`PreparedPrompt` s; None when the model keeps its vision tower
        (one is built on it) or when only :class:`EncodedPrompt` s will arrive.
    """

    def __init__(
        self,
        model,
        processor=None,
        *,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
        vision: VisionEncoder | None = None,
    ):
        self.config = engine or EngineConfig()
        self.zipvl = zipvl or getattr(model, "zipvl_config", None) or ZipVLConfig()
        self.runner = ModelRunner(model, self.config)
        self.processor = processor
        self.prompts = PromptProcessor(processor) if processor is not None else None
        self.tokenizer = processor.tokenizer if processor is not None else None
        self.detokenizer = Detokenizer(self.tokenizer) if self.tokenizer is not None else None
        if vision is None and self._has_vision_tower():
            vision = VisionEncoder(model, output_device=str(self.runner.device))
        self.vision = vision
        self.eos_token_ids = self._eos_ids(model)
        layers = self.runner.layout.num_layers
        self.keep_fractions = [self.config.default_keep_fraction] * layers
        self.scheduler = Scheduler(self.config, self.runner.kv, self._predict_seq_bytes)
        self.sequences: dict[str, Sequence] = {}
        # What the current step has built and finished, for fail_step when the step raises midway; empty
        # between steps (they would keep finished sequences and their image features alive while idle).
        self._step_outputs: list[RequestOutput] = []
        self._step_finished: list[Sequence] = []
        self._stepping = False
        self._totals = {
            "finished": 0,
            "aborted": 0,
            "aborted_waiting": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "replayed_tokens": 0,
            "max_batch": 0,
        }
        self._prediction_error = 0.0
        self._seen_prefills = 0
        self.last_step: tuple[str, int, float] | None = None  # (kind, sequences, seconds) of the latest step

    @classmethod
    def from_pretrained(
        cls,
        model: str,
        *,
        dtype=None,
        device=None,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
        load_vision: bool = True,
    ) -> LLMEngine:
        """Load ``model`` (built-in name, local path or hub id). ``load_vision=False`` drops the vision tower."""
        from zipvl_ray.models import load_model

        vlm, processor = load_model(model, dtype=dtype, device=device, zipvl=zipvl)
        if not load_vision:
            from zipvl_ray.models.adapters import VLMAdapter

            VLMAdapter(vlm).drop_vision_tower()
        return cls(vlm, processor, zipvl=zipvl, engine=engine)

    # -- helpers ------------------------------------------------------------------------------------
    def _has_vision_tower(self) -> bool:
        return all(
            getattr(self.runner.model.model, n, None) is not None
            for n in self.runner.adapter.vision_modules()
        )

    @staticmethod
    def _eos_ids(model) -> set[int]:
        ids = set()
        eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(int(x) for x in eos)
        return ids

    def _predict_seq_bytes(self, seq: Sequence, decode_tokens: int) -> int:
        """Bytes ``seq`` will hold after its prefill plus ``decode_tokens`` generated tokens.

        A sequence prefilled before (then preempted) is sized by what its prefill kept: recomputation
        selects the same tokens, so that is exact. Sizing it by the running mean again would readmit it
        beside another on the same under-prediction, and two such requests could preempt each other's
        prefill forever.
        """
        kept = seq.metrics.kept_tokens_per_layer
        if kept:
            block_size = self.runner.layout.block_size
            return blocks_for([k + decode_tokens for k in kept], block_size) * self.runner.block_bytes
        if seq.prefill_did_not_fit:
            # Its prediction was too small once (a failed prefill keeps no counts to learn from): size it
            # dense, an upper bound, so it waits for room (or an idle engine) instead of being readmitted
            # on the same under-prediction and preempting one more running sequence per attempt.
            fractions = [1.0] * len(self.keep_fractions)
        elif seq.uses_default_zipvl:
            fractions = self.keep_fractions
        else:
            fractions = self._fractions_for(seq.zipvl)
        return predict_bytes(
            seq.num_prompt_tokens,
            fractions,
            decode_tokens,
            self.runner.layout.block_size,
            self.runner.block_bytes,
        )

    def _fractions_for(self, config: ZipVLConfig) -> list[float]:
        from zipvl_ray.routing.footprint import effective_keep_fractions

        return effective_keep_fractions(
            self.keep_fractions,
            len(self.keep_fractions),
            tau=config.tau,
            max_keep_ratio=config.max_keep_ratio,
            zipvl_enabled=config.enabled,
            default_tau=self.zipvl.tau if self.zipvl.enabled else 1.0,
            default_max_keep_ratio=self.zipvl.max_keep_ratio if self.zipvl.enabled else None,
            dense_layers=config.dense_layers,
        )

    # -- requests --------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: PromptLike) -> EncodedPrompt:
        """Normalise any accepted prompt form to token ids + image features (running the vision tower if needed)."""
        if isinstance(prompt, EncodedPrompt):
            return prompt
        if isinstance(prompt, str | list | dict):
            if self.prompts is None:
                raise RequestError("this engine has no processor: send token ids with image features")
            if isinstance(prompt, dict):
                text = prompt.get("messages", prompt.get("prompt"))
                images = prompt.get("images") or []
            else:
                text, images = prompt, []
            if text is None:
                raise RequestError("a prompt dict needs 'prompt' or 'messages'")
            try:
                prompt = self.prompts.prepare(text, images)
            except PromptError as exc:
                raise RequestError(str(exc)) from None
        if isinstance(prompt, PreparedPrompt):
            if prompt.images and self.vision is None:
                raise RequestError("this engine has no vision tower: send precomputed image features")
            features = self.vision.encode(prompt.images) if prompt.images else []
            return EncodedPrompt(token_ids=list(prompt.token_ids), image_features=features)
        raise RequestError(f"unsupported prompt type {type(prompt).__name__}")

    def add_request(
        self,
        request_id: str,
        prompt: PromptLike,
        sampling: SamplingParams | None = None,
        zipvl: dict[str, Any] | None = None,
        *,
        arrival_time: float | None = None,
    ) -> Sequence:
        """Validate and queue a request. Raises :class:`RequestError` for a bad one (nothing is queued then)."""
        if request_id in self.sequences:
            raise RequestError(f"request id {request_id!r} is already in use")
        sampling = sampling or SamplingParams()
        if sampling.stop and self.tokenizer is None:
            raise RequestError(
                "stop strings need a tokenizer: this engine has no processor (use stop_token_ids)"
            )
        try:
            config = self.zipvl.with_overrides(**(zipvl or {}))
        except (ValidationError, TypeError) as exc:
            raise RequestError(f"invalid zipvl settings: {exc}") from None
        encoded = self.encode_prompt(prompt)
        ids = encoded.token_ids
        if not ids:
            raise RequestError("the prompt is empty")
        n = len(ids)
        if n + sampling.max_tokens > self.config.max_model_len:
            raise RequestError(
                f"the prompt has {n} tokens and max_tokens is {sampling.max_tokens}: together more than "
                f"max_model_len ({self.config.max_model_len})"
            )
        vocab = self.runner.geometry.vocab_size
        if min(ids) < 0 or max(ids) >= max(vocab, self.runner.adapter.image_token_id + 1):
            raise RequestError("the prompt holds token ids outside the vocabulary")
        image_id = self.runner.adapter.image_token_id
        placeholders = sum(1 for t in ids if t == image_id)
        hidden = self.runner.adapter.language_model.embed_tokens.embedding_dim
        for index, feature in enumerate(encoded.image_features):
            # A malformed feature must fail its own request here, not the whole batch's step: too narrow
            # fails the step's embedding (every request in flight with it), too wide is read misaligned.
            shape = tuple(feature.embeds.shape)
            if len(shape) != 2 or shape[1] != hidden:
                raise RequestError(
                    f"image {index}: its features have shape {shape}; this model takes (tokens, {hidden})"
                )
        feature_tokens = sum(int(f.embeds.shape[0]) for f in encoded.image_features)
        if placeholders != feature_tokens:
            raise RequestError(
                f"the prompt has {placeholders} image placeholder tokens but its {len(encoded.image_features)} "
                f"images give {feature_tokens}"
            )
        grids = [f.grid_thw for f in encoded.image_features] if self.runner.adapter.uses_mrope else None
        if grids is not None and any(g is None for g in grids):
            raise RequestError("M-RoPE models need each image's grid_thw")
        try:
            positions, next_position = self.runner.adapter.prompt_positions(ids, grids)
        except (RuntimeError, ValueError) as exc:  # e.g. two images' placeholders with nothing between
            raise RequestError(
                f"cannot place the images in the prompt ({type(exc).__name__}); each image needs its own "
                "placeholder run, as the chat template writes it"
            ) from None
        device = self.runner.device
        seq = Sequence(
            request_id=request_id,
            prompt_token_ids=list(ids),
            image_features=[f.embeds.to(device) for f in encoded.image_features],
            positions=positions,
            next_position=next_position,
            sampling=sampling,
            zipvl=config,
            image_tokens=placeholders,
            generator=None if sampling.greedy else make_generator(sampling.seed),
            uses_default_zipvl=not zipvl or config == self.zipvl,
        )
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        seq.metrics.arrival_ns = time.time_ns() - int((time.perf_counter() - seq.arrival_time) * 1e9)
        seq.metrics.prompt_tokens = n
        seq.metrics.image_tokens = placeholders
        self.sequences[request_id] = seq
        self.scheduler.add(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request and free its KV now. Returns its final output (None if unknown or already done)."""
        seq = self.sequences.get(request_id)
        if seq is None or seq.is_finished:
            return None
        was_waiting = seq in self.scheduler.waiting
        self.scheduler.remove(seq)
        self._finish(seq, "abort")
        self._totals["aborted"] += 1
        self._totals["aborted_waiting"] += was_waiting
        return self._output(seq)

    def count_withdrawn(self) -> None:
        """Count a request aborted before it was added (its caller left while the add waited for the
        engine): an abort of a waiting request, as if it had been queued."""
        self._totals["aborted"] += 1
        self._totals["aborted_waiting"] += 1

    def fail_step(self, exc: BaseException) -> list[RequestOutput]:
        """After :meth:`step` raised: the outputs it had built and the requests it had finished (a request
        that reached its end before the failing row is answered, not lost), then every request still in
        flight aborted with finish reason ``"error"`` and its KV freed.

        An output that cannot be built again (the failure may lie in building it) is replaced by a bare
        final one with the tokens so far. Never raises.
        """
        error = f"internal engine error: {type(exc).__name__}"
        outputs = list(self._step_outputs)
        answered = {o.request_id for o in outputs if o.finished}
        for seq in self._step_finished:
            if seq.request_id not in answered:
                outputs.append(self._output_or_bare(seq, error))
        for request_id in list(self.sequences):
            seq = self.sequences[request_id]
            try:
                out = self.abort_request(request_id)
            except Exception:  # noqa: BLE001 - building its output failed; it is finished and freed all the same
                logger.exception("building the aborted output of %s failed", request_id)
                self.runner.kv.free(request_id)
                self.scheduler.remove(seq)
                self.sequences.pop(request_id, None)
                out = self._bare_output(seq, error)
            if out is not None:
                out.finish_reason, out.error = "error", error
                outputs.append(out)
        self._step_outputs, self._step_finished = [], []
        return outputs

    def _output_or_bare(self, seq: Sequence, error: str) -> RequestOutput:
        try:
            return self._output(seq)
        except Exception:  # noqa: BLE001
            logger.exception("building the final output of %s failed", seq.request_id)
            return self._bare_output(seq, error)

    @staticmethod
    def _bare_output(seq: Sequence, error: str) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=list(seq.output_token_ids),
            finished=True,
            finish_reason="error",
            metrics=seq.metrics,
            error=error,
        )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    # -- stepping ------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one prefill or decode step. Returns outputs of the requests that advanced (those whose
        ``output_kind`` is ``"stream"``) or finished."""
        self._step_outputs, self._step_finished = [], []
        self._stepping = True
        try:
            scheduled = self.scheduler.schedule()
            if scheduled is None:
                return []
            kind, seqs = scheduled
            start = time.perf_counter()
            outputs = self._prefill_step(seqs) if kind == "prefill" else self._decode_step()
            self.last_step = (kind, len(seqs), time.perf_counter() - start)
        finally:
            self._stepping = False
        self._step_outputs, self._step_finished = [], []  # kept only when the step raised, for fail_step
        return outputs

    def _prefill_step(self, seqs: list[Sequence]) -> list[RequestOutput]:
        now = time.perf_counter()
        for seq in seqs:
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
                seq.metrics.queue_time_s = now - seq.arrival_time
                seq.metrics.prefill_start_ns = time.time_ns()
        try:
            logits, segments = self.runner.prefill(seqs)
        except OutOfBlocks:
            return self._prefill_did_not_fit(seqs)
        self.scheduler.start(seqs)
        self._totals["prefill_tokens"] += sum(s.num_prompt_tokens for s in seqs)
        # What admission predicted, before any segment of this batch updates the running kept fractions.
        predicted = [self._predict_seq_bytes(seq, 0) for seq in seqs]
        to_sample = []
        for row, (seq, seg) in enumerate(zip(seqs, segments, strict=True)):
            self._record_prefill(seq, seg, predicted[row])
            if not seq.output_token_ids:  # a first prefill; a recomputation only rebuilds the cache
                to_sample.append((row, seq))
        outputs = self._sample_and_append(logits, to_sample)
        self._replay([seq for seq in seqs if seq in self.scheduler.running])
        return outputs

    def _replay(self, seqs: list[Sequence]) -> None:
        """Feed recomputed sequences' generated tokens back (all but the last, which the next decode step
        feeds and samples after) in replay forwards, instead of one decode row per token and step (until
        2026-12-07: up to 1.9x the decode rows under KV pressure, and a sequence that produced nothing for
        as many steps as it had generated tokens).

        At most ``max_num_batched_tokens`` tokens per step, as a prefill step (the rest continues at the next
        decode step, so a long backlog does not stall the running sequences for longer than a prefill);
        a chunk ends at each ``decode_compress_interval`` boundary, where decode compresses, and is cut to
        :meth:`ModelRunner.max_replay_tokens` (the attention's score matrix). Out of blocks, the rest waits:
        the decode steps feed it back one token per step (and preempt) as before.
        """
        budget = self.config.max_num_batched_tokens
        for seq in seqs:
            interval = seq.zipvl.decode_compress_interval
            while seq.replay_backlog() > 0 and budget > 0:
                count = min(seq.replay_backlog(), budget, self.runner.max_replay_tokens(seq))
                if interval and interval > 1:
                    count = min(count, interval - seq.num_fed % interval)
                try:
                    self.runner.replay(seq, count)
                except OutOfBlocks:
                    break
                seq.num_fed += count
                budget -= count
                self._totals["replayed_tokens"] += count

    def _prefill_did_not_fit(self, seqs: list[Sequence]) -> list[RequestOutput]:
        for seq in seqs:
            seq.prefill_did_not_fit = True
        if self.scheduler.running:
            # Back to the front, sized dense from now on, to wait for memory. No running sequence is
            # preempted for it: until 2026-12-07 the newest was, and then went in behind the batch, which
            # broke FCFS (the older sequence waited for the younger request to run) and freed nothing the
            # dense-sized batch could use before the running ones finished.
            self.scheduler.requeue(seqs)
            return []
        if len(seqs) > 1:
            self.scheduler.requeue(seqs, cap_next_prefill=True)
            return []
        seq = seqs[0]
        seq.error = f"the request needs {POOL_OVERFLOW_ERROR}"
        self._finish(seq, "error")
        return [self._output(seq)]

    def _record_prefill(self, seq: Sequence, seg, predicted: int) -> None:
        n = seq.num_prompt_tokens
        kv = self.runner.kv
        held = kv.seq_bytes(seq.request_id)
        m = seq.metrics
        m.kept_tokens_per_layer = list(seg.kept)
        m.guard_fired = seg.guard_fired
        m.kv_bytes = held
        m.kv_bytes_dense = self.runner.dense_bytes(n)
        if m.num_preemptions == 0:  # the admission prediction; a recomputation is sized by what was kept
            m.predicted_kv_bytes = predicted
            m.kv_bytes_after_prefill, m.kv_bytes_dense_after_prefill = m.kv_bytes, m.kv_bytes_dense
        if seq.uses_default_zipvl and m.num_preemptions == 0:
            alpha = self.config.keep_fraction_ema if self._seen_prefills else 1.0
            self.keep_fractions = [
                (1 - alpha) * f + alpha * (k / n) for f, k in zip(self.keep_fractions, seg.kept, strict=True)
            ]
            if not seq.prefill_did_not_fit:  # sized dense on purpose after a failed prefill: not an error
                error = (held - predicted) / max(predicted, 1)
                self._prediction_error = (
                    error if not self._seen_prefills else 0.9 * self._prediction_error + 0.1 * error
                )
            self._seen_prefills += 1

    def _decode_step(self) -> list[RequestOutput]:
        self._replay([seq for seq in self.scheduler.running if seq.replay_backlog() > 0])  # what a step left
        outputs = []
        for seq in self.scheduler.ensure_decode_room():
            # Alone in the pool and no room for one more token: the replica's context is full. What it
            # generated is kept and returned, as at max_model_len ("length"); with nothing generated
            # (cannot happen after a prefill that fit, but stay safe) it is an error.
            if seq.output_token_ids:
                logger.warning(
                    "request %s outgrew the whole KV pool after %d tokens: stopped (finish reason length)",
                    seq.request_id,
                    len(seq.output_token_ids),
                )
                self._finish(seq, "length")
            else:
                seq.error = "the KV pool cannot hold this request's next token even alone"
                self._finish(seq, "error")
            outputs.append(self._output(seq))
        seqs = self.scheduler.running[: self.config.max_num_seqs]
        if not seqs:
            return outputs
        self._totals["max_batch"] = max(self._totals["max_batch"], len(seqs))
        logits = self.runner.decode(seqs)
        self._totals["decode_tokens"] += len(seqs)
        to_sample = []
        for row, seq in enumerate(seqs):
            seq.num_fed += 1
            if seq.num_fed == len(seq.output_token_ids):
                to_sample.append((row, seq))
        return outputs + self._sample_and_append(logits, to_sample)

    def _sample_and_append(
        self, logits: torch.Tensor, rows: list[tuple[int, Sequence]]
    ) -> list[RequestOutput]:
        if not rows:
            return []
        index = torch.tensor([r for r, _ in rows], device=logits.device)
        params = [s.sampling for _, s in rows]
        histories = (
            [(s.distinct_prompt_ids(), s.output_token_ids) for _, s in rows]
            if any(p.penalized for p in params)
            else None
        )
        tokens, logprobs = sample(
            logits.index_select(0, index), params, [s.generator for _, s in rows], histories
        )
        now = time.perf_counter()
        outputs = []
        for (_, seq), token, lp in zip(rows, tokens, logprobs, strict=True):
            if seq.first_token_time is None:
                seq.first_token_time = now
                seq.metrics.ttft_s = now - seq.arrival_time
                seq.metrics.first_token_ns = time.time_ns()
            self._append_token(seq, token, lp)
            # getattr: parameters pickled by an older ingress during a rolling update lack the field
            if seq.is_finished or getattr(seq.sampling, "output_kind", "stream") == "stream":
                outputs.append(self._output(seq))
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: dict | None) -> None:
        sp = seq.sampling
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.eos_token_ids):
            self._finish(seq, "stop")
            return
        seq.output_token_ids.append(token)
        seq.metrics.last_token_ns = time.time_ns()
        if logprob is not None:
            seq.output_logprobs.append(logprob)
        if sp.stop and self.detokenizer is not None:
            text = self.detokenizer.text(seq)
            cut = first_stop(text, sp.stop)
            if cut >= 0:
                seq.text_limit = cut
                seq.text = text[:cut]
                self._finish(seq, "stop")
                return
        if len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= self.config.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        kv = self.runner.kv
        if seq.request_id in kv.seqs:
            held = kv.seqs[seq.request_id]
            seq.metrics.kv_bytes = held.num_blocks * self.runner.block_bytes
            seq.metrics.kv_bytes_dense = self.runner.dense_bytes(seq.num_prompt_tokens + seq.num_fed)
        else:  # waiting (never admitted, or preempted and not readmitted): it holds nothing at the end
            seq.metrics.kv_bytes = seq.metrics.kv_bytes_dense = 0
        kv.free(seq.request_id)
        if seq in self.scheduler.running:
            self.scheduler.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason  # type: ignore[assignment]
        seq.finish_time = time.perf_counter()
        seq.metrics.finish_ns = time.time_ns()
        if seq.first_token_time is not None:
            seq.metrics.decode_time_s = seq.finish_time - seq.first_token_time
        if reason in ("stop", "length"):
            self._totals["finished"] += 1
        self.sequences.pop(seq.request_id, None)
        if self._stepping:
            self._step_finished.append(seq)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The cumulative output of ``seq`` plus the delta since the previous call (streaming)."""
        if self.detokenizer is not None:
            self.detokenizer.text(seq)
        text = seq.text
        if seq.is_finished:
            visible = len(text)
        else:  # hold back a trailing partial UTF-8 character, and what may be the start of a stop string
            shown = text.rstrip("\ufffd")
            visible = len(shown) - (partial_stop_length(shown, seq.sampling.stop) if seq.sampling.stop else 0)
        delta_text = text[seq.sent_text_len : visible] if visible > seq.sent_text_len else ""
        seq.sent_text_len = max(seq.sent_text_len, visible)
        delta_tokens = seq.output_token_ids[seq.sent_tokens :]
        wants_logprobs = seq.sampling.logprobs is not None
        delta_logprobs = seq.output_logprobs[seq.sent_tokens :] if wants_logprobs else None
        seq.sent_tokens = len(seq.output_token_ids)
        out = RequestOutput(
            request_id=seq.request_id,
            token_ids=list(seq.output_token_ids),
            text=text[:visible],
            delta_token_ids=list(delta_tokens),
            delta_text=delta_text,
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            logprobs=list(seq.output_logprobs) if wants_logprobs else None,
            delta_logprobs=delta_logprobs,
            metrics=seq.metrics,
            error=seq.error,
        )
        if self._stepping:
            self._step_outputs.append(out)
        return out

    # -- stats ------------------------------------------------------------------------------------------
    def stats(self) -> EngineStats:
        kv = self.runner.kv
        layout = self.runner.layout
        saved = 0
        for seq in self.scheduler.running:
            held = kv.seqs.get(seq.request_id)
            if held is not None:
                saved += (
                    self.runner.dense_bytes(seq.num_prompt_tokens + seq.num_fed)
                    - held.num_blocks * layout.block_bytes
                )
        fractions = list(self.keep_fractions)
        bs = layout.block_size
        lifetime = 0
        for seq in self.scheduler.running:
            held = kv.seqs.get(seq.request_id)
            if held is not None:
                growth = seq.replay_backlog() + seq.remaining_tokens()
                lifetime += sum(-(-(length + growth) // bs) for length in held.lengths) * layout.block_bytes
        waiting = list(self.scheduler.waiting)
        lifetime += sum(
            self._predict_seq_bytes(seq, seq.replay_backlog() + seq.remaining_tokens()) for seq in waiting
        )
        return EngineStats(
            kv_bytes_used=kv.used_bytes,
            kv_bytes_capacity=kv.capacity_bytes,
            kv_blocks_used=kv.num_used_blocks,
            kv_blocks_total=kv.allocator.num_blocks,
            block_size=layout.block_size,
            block_bytes=layout.block_bytes,
            num_layers=layout.num_layers,
            dense_bytes_per_token=layout.num_layers * layout.token_bytes,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            mean_kept_fraction=sum(fractions) / len(fractions),
            kept_fraction_per_layer=fractions,
            reserved_bytes=self.scheduler.reserved_bytes(),
            num_preemptions=self.scheduler.num_preemptions,
            num_finished=self._totals["finished"],
            num_aborted=self._totals["aborted"],
            num_aborted_waiting=self._totals["aborted_waiting"],
            prefill_tokens=self._totals["prefill_tokens"],
            decode_tokens=self._totals["decode_tokens"],
            replayed_tokens=self._totals["replayed_tokens"],
            kv_bytes_saved=max(0, saved),
            prediction_error_mean=self._prediction_error,
            max_concurrent_seqs=self._totals["max_batch"],
            committed_lifetime_bytes=lifetime,
            waiting_prompt_tokens=sum(seq.num_prompt_tokens for seq in waiting),
            zipvl_tau=self.zipvl.tau if self.zipvl.enabled else 1.0,
            zipvl_max_keep_ratio=self.zipvl.max_keep_ratio if self.zipvl.enabled else None,
            zipvl_dense_layers=sorted(self.zipvl.dense_layers) if self.zipvl.enabled else [],
        )
