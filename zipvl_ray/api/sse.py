"""Server-sent events in OpenAI's streaming format.

A stream is a sequence of ``data: <json>\\n\\n`` events ending with ``data: [DONE]\\n\\n``. An error after
the stream started (headers already sent with status 200) is one ``data: {"error": {...}}`` event
followed by ``[DONE]``, as OpenAI does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel

#: The last event of every stream.
SSE_DONE = "data: [DONE]\n\n"

#: Response headers of a stream (no proxy buffering, no caching).
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

SSE_MEDIA_TYPE = "text/event-stream"


def sse_event(payload: BaseModel | dict[str, Any] | str) -> str:
    """One ``data:`` event. Models are dumped to JSON without spaces; strings are sent as they are."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json()
    elif isinstance(payload, dict):
        body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    else:
        body = payload
    if "\n" in body:
        raise ValueError("an SSE data line must not contain a newline")
    return f"data: {body}\n\n"


def parse_sse(text: str) -> Iterator[dict[str, Any] | str]:
    """Parse a whole SSE body back into JSON payloads (and the string ``"[DONE]"``). For clients and tests."""
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        if not block.startswith("data: "):
            raise ValueError(f"not an SSE data event: {block[:60]!r}")
        data = block[len("data: ") :]
        yield data if data == "[DONE]" else json.loads(data)
