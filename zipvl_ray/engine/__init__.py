"""The paged, continuously batching ZipVL engine.

* :class:`LLM` - offline ``generate(prompts, SamplingParams)``;
* :class:`AsyncLLMEngine` - streaming ``generate``, ``abort`` and ``stats`` for serving;
* :class:`LLMEngine` - the synchronous core both use.
"""

from zipvl_ray.engine.async_engine import AsyncLLMEngine
from zipvl_ray.engine.llm import LLM
from zipvl_ray.engine.llm_engine import EncodedPrompt, LLMEngine
from zipvl_ray.engine.types import (
    EngineStats,
    RequestError,
    RequestMetrics,
    RequestOutput,
    SamplingParams,
)

__all__ = [
    "LLM",
    "AsyncLLMEngine",
    "EncodedPrompt",
    "EngineStats",
    "LLMEngine",
    "RequestError",
    "RequestMetrics",
    "RequestOutput",
    "SamplingParams",
]
