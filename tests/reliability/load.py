"""Concurrent HTTP clients for the reliability tests: streams read to the end, streams dropped early, latencies.

Everything runs in one asyncio loop of the test process against loopback, with bounded request
counts and time limits.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.reliability.service import Service


@dataclass
class StreamResult:
    """What one streamed (or refused) request got."""

    index: int
    status: int
    text: str = ""
    done: bool = False
    error: dict[str, Any] | None = None
    finish_reason: str | None = None
    ttft_s: float | None = None
    total_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    transport_error: str | None = None

    @property
    def answered(self) -> bool:
        """The client got a complete answer: a finished stream, or an error response / event."""
        return self.transport_error is None and (self.done or self.error is not None)


async def stream_one(client: httpx.AsyncClient, body: dict[str, Any], index: int) -> StreamResult:
    """POST a streamed chat completion and read it to ``[DONE]`` (or read the error body)."""
    started = time.perf_counter()
    result = StreamResult(index=index, status=0)
    try:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            result.status = response.status_code
            result.headers = dict(response.headers)
            if response.status_code != 200:
                raw = await response.aread()
                try:
                    result.error = json.loads(raw).get("error")
                except (json.JSONDecodeError, AttributeError):
                    result.error = {"message": f"not JSON: {raw[:200]!r}"}
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                if data == "[DONE]":
                    result.done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = event["error"]
                    continue
                for choice in event.get("choices", []):
                    piece = choice.get("delta", {}).get("content")
                    if piece:
                        if result.ttft_s is None:
                            result.ttft_s = time.perf_counter() - started
                        result.text += piece
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
    except httpx.HTTPError as exc:
        result.transport_error = f"{type(exc).__name__}: {exc}"
    finally:
        result.total_s = time.perf_counter() - started
    return result


async def run_streams(
    service: Service,
    bodies: Sequence[dict[str, Any]],
    *,
    timeout_s: float = 120.0,
    start_after_s: Sequence[float] | None = None,
) -> list[StreamResult]:
    """Send every body as a stream (one connection each); returns results in order.

    Every body goes at once unless ``start_after_s`` gives each one's delay in seconds.
    """
    delays = list(start_after_s) if start_after_s is not None else [0.0] * len(bodies)
    if len(delays) != len(bodies):
        raise ValueError("start_after_s needs one delay per body")

    async def later(client: httpx.AsyncClient, body: dict[str, Any], index: int) -> StreamResult:
        if delays[index] > 0:
            await asyncio.sleep(delays[index])
        return await stream_one(client, body, index)

    limits = httpx.Limits(max_connections=len(bodies) + 8, max_keepalive_connections=0)
    async with service.async_client(limits=limits, timeout=timeout_s) as client:
        return list(await asyncio.gather(*(later(client, body, i) for i, body in enumerate(bodies))))


async def drop_after_events(client: httpx.AsyncClient, body: dict[str, Any], events: int) -> int:
    """Stream ``body``, read ``events`` data events, then hang up; returns the events read."""
    read = 0
    async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                read += 1
                if read >= events:
                    break
    return read


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of ``values``, nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
