"""SSE helpers: OpenAI's event format and its parser."""

from __future__ import annotations

import pytest

from zipvl_ray.api.schemas import Usage
from zipvl_ray.api.sse import SSE_DONE, parse_sse, sse_event


@pytest.mark.parametrize(
    "payload, expected",
    [
        ({"a": 1, "b": "é"}, 'data: {"a":1,"b":"é"}\n\n'),
        (
            Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
            'data: {"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}\n\n',
        ),
        ("[DONE]", SSE_DONE),
    ],
)
def test_sse_event_format(payload, expected):
    assert sse_event(payload) == expected


def test_newlines_cannot_break_an_event():
    with pytest.raises(ValueError):
        sse_event("two\nlines")
    # JSON escapes newlines inside strings, so text with newlines is one line.
    assert sse_event({"text": "a\nb"}) == 'data: {"text":"a\\nb"}\n\n'


def test_parse_round_trip():
    body = sse_event({"x": 1}) + sse_event({"y": [2]}) + SSE_DONE
    assert list(parse_sse(body)) == [{"x": 1}, {"y": [2]}, "[DONE]"]
    with pytest.raises(ValueError, match="not an SSE data event"):
        list(parse_sse("event: ping\n\n"))
