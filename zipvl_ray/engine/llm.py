"""``LLM``: offline batch generation with the paged ZipVL engine."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence as SequenceABC

from zipvl_ray.config import EngineConfig, ZipVLConfig
from zipvl_ray.engine.llm_engine import LLMEngine, PromptLike
from zipvl_ray.engine.types import RequestOutput, SamplingParams


class LLM:
    """Generate for many prompts at once (continuous batching over a paged, evicting KV pool).

    Parameters
    ----------
    model : str or transformers.PreTrainedModel
        A name / path / hub id for :func:`zipvl_ray.models.load_model`, or a loaded ZipVL-enabled model
        (then pass ``processor``).
    zipvl : ZipVLConfig, optional
    engine : EngineConfig, optional
    processor : transformers.ProcessorMixin, optional
    dtype, device : optional
        Passed to ``load_model``.

    Examples
    --------
    >>> llm = LLM("tiny-llava", zipvl=ZipVLConfig(tau=0.975))
    >>> outs = llm.generate([{"messages": chat, "images": [image]}], SamplingParams(max_tokens=32))
    >>> outs[0].text, outs[0].metrics.kept_ratio_per_layer  # doctest: +SKIP
    """

    def __init__(
        self,
        model,
        *,
        zipvl: ZipVLConfig | None = None,
        engine: EngineConfig | None = None,
        processor=None,
        dtype=None,
        device=None,
    ):
        if isinstance(model, str):
            self.engine = LLMEngine.from_pretrained(
                model, dtype=dtype, device=device, zipvl=zipvl, engine=engine
            )
        else:
            self.engine = LLMEngine(model, processor, zipvl=zipvl, engine=engine)
        self._ids = itertools.count()

    def generate(
        self,
        prompts: PromptLike | SequenceABC[PromptLike],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        *,
        zipvl: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; returns the final outputs in prompt order.

        A prompt is a rendered string, chat messages (a list of dicts), a dict
        ``{"messages" | "prompt": ..., "images": [PIL.Image, ...]}``, a ``PreparedPrompt`` or an
        ``EncodedPrompt`` (precomputed image features). ``zipvl`` overrides (tau, max_keep_ratio,
        enabled) apply to every prompt.
        """
        single = (
            isinstance(prompts, str | dict)
            or not isinstance(prompts, SequenceABC)
            or (
                isinstance(prompts, list)
                and prompts
                and isinstance(prompts[0], dict)
                and "role" in prompts[0]
            )
        )
        batch = [prompts] if single else list(prompts)
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(batch)
        else:
            params = list(sampling_params)
        if len(params) != len(batch):
            raise ValueError(f"{len(params)} sampling params for {len(batch)} prompts")
        # Only the finished outputs are returned, so the engine builds no others (as vLLM's LLM does).
        params = [dataclasses.replace(p or SamplingParams(), output_kind="final_only") for p in params]
        ids = [f"offline-{next(self._ids)}" for _ in batch]
        added: list[str] = []
        try:
            for request_id, prompt, sp in zip(ids, batch, params, strict=True):
                self.engine.add_request(request_id, prompt, sp, zipvl)
                added.append(request_id)
        except BaseException:
            for request_id in added:  # a refused prompt leaves none of the call's requests behind
                self.engine.abort_request(request_id)
            raise
        final: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for request_id in ids:  # a failed step (or Ctrl-C) leaves no request of the call holding KV
                self.engine.abort_request(request_id)
            raise
        return [final[i] for i in ids]

    def stats(self):
        return self.engine.stats()
