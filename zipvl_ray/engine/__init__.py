"""The paged, continuously batching ZipVL engine.

* :class:`LLM` - offline ``generate(prompts, SamplingParams)``;
* :class:`AsyncLLMEngine` - streaming ``generate``, ``abort`` and ``stats`` for serving;
* :class:`LLMEngine` - the synchronous core both use.

Names are imported lazily so that ``zipvl_ray.engine.types`` (read by routers) stays free of torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zipvl_ray._lazy import lazy_getattr

_EXPORTS = {
    "AsyncLLMEngine": "zipvl_ray.engine.async_engine",
    "LLM": "zipvl_ray.engine.llm",
    "EncodedPrompt": "zipvl_ray.engine.llm_engine",
    "LLMEngine": "zipvl_ray.engine.llm_engine",
    "EngineStats": "zipvl_ray.engine.types",
    "RequestError": "zipvl_ray.engine.types",
    "EngineDeadError": "zipvl_ray.engine.types",
    "RequestMetrics": "zipvl_ray.engine.types",
    "RequestOutput": "zipvl_ray.engine.types",
    "SamplingParams": "zipvl_ray.engine.types",
}

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "EncodedPrompt",
    "EngineStats",
    "LLMEngine",
    "RequestError",
    "EngineDeadError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]

if TYPE_CHECKING:  # pragma: no cover
    from zipvl_ray.engine.async_engine import AsyncLLMEngine
    from zipvl_ray.engine.llm import LLM
    from zipvl_ray.engine.llm_engine import EncodedPrompt, LLMEngine
    from zipvl_ray.engine.types import (
        EngineDeadError,
        EngineStats,
        RequestError,
        RequestMetrics,
        RequestOutput,
        SamplingParams,
    )


__getattr__ = lazy_getattr(__name__, _EXPORTS)
