"""The input validation matrix: hostile or wrong requests, each with the 4xx and the words it must get.

Every case says which service configuration it needs (:class:`Needs`): most run anywhere; the remote
URL cases need remote URLs off, or an allowlist with the SSRF guard on, or an allowlisted loopback
image host with private networks allowed (slow and oversized bodies). :func:`run_matrix` sends every
case a service supports over real HTTP and returns what went wrong, so one assertion reports all
failures at once.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any

import httpx

from tests.api.helpers import animated, data_url, encode, image_data_url, png_header_only, random_image
from tests.reliability.image_server import ImageHost
from tests.reliability.service import Service

#: OpenAI's error body has exactly these keys.
ERROR_KEYS = {"message", "type", "param", "code"}
#: What a stack trace or an internal repr looks like in a body.
LEAK_MARKERS = ("Traceback", 'File "/', "site-packages", "RayTaskError", "<object at 0x")


class Needs(enum.Flag):
    """What a case needs from the service's configuration."""

    ANY = 0
    REMOTE_OFF = enum.auto()  #: no allowlisted hosts
    SSRF_GUARD = enum.auto()  #: loopback / private hosts allowlisted, private networks refused
    PRIVATE_FETCH = enum.auto()  #: the loopback image host allowlisted, private networks allowed


@dataclass
class Case:
    """One request and what it must get."""

    name: str
    body: dict[str, Any] | bytes
    status: int
    fragment: str
    needs: Needs = Needs.ANY
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)


def _with(service: Service, **fields: Any) -> dict[str, Any]:
    return service.body() | fields


def _images(service: Service, *urls: str, text: str = "What is this?") -> dict[str, Any]:
    return service.body(text, list(urls))


def _message(role: str, content: Any) -> list[dict[str, Any]]:
    return [{"role": role, "content": content}]


def cases(
    service: Service, host: ImageHost | None = None, *, max_request_bytes: int | None = None
) -> list[Case]:
    """The matrix for ``service`` (remote URL cases point at ``host`` when given)."""
    limits = service.limits
    side = math.isqrt(limits.max_image_pixels) + 1
    where = "messages[0].content[0].image_url.url"
    png = encode(random_image(3), "PNG")
    table = [
        # -- the body itself
        Case("malformed JSON", b'{"model": "x", "messages": [', 400, "malformed JSON", code="invalid_json"),
        Case("trailing garbage", json.dumps(service.body()).encode() + b"}}", 400, "malformed JSON"),
        Case(
            "not UTF-8", b'{"model": "\xff\xfe", "messages": []}', 400, "malformed JSON", code="invalid_json"
        ),
        Case("nesting bomb", b'{"messages": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", 400, "malformed JSON"),
        Case("body is an array", b"[1, 2]", 400, "JSON object", code="invalid_body"),
        Case("empty body", b"", 400, "body is missing", code="missing_body"),
        Case(
            "form body",
            b"a=b",
            415,
            "Content-Type: application/json",
            code="unsupported_media_type",
            headers={"content-type": "application/x-www-form-urlencoded"},
        ),
        Case(
            "a JSON object sent as text/plain",
            json.dumps(service.body()).encode(),
            415,
            "got 'text/plain'",
            code="unsupported_media_type",
            headers={"content-type": "text/plain"},
        ),
        # -- wrong types and missing fields
        Case(
            "missing messages",
            {"model": service.model},
            400,
            "messages: Field required",
            code="invalid_value",
        ),
        Case("empty messages", _with(service, messages=[]), 400, "messages"),
        Case(
            "messages is a string",
            _with(service, messages="hi"),
            400,
            "messages: Input should be a valid list",
        ),
        Case("model is a number", _with(service, model=5), 400, "model: Input should be a valid string"),
        Case(
            "max_tokens is a string",
            _with(service, max_tokens="5"),
            400,
            "max_tokens: Input should be a valid integer",
        ),
        Case("max_tokens is a float", _with(service, max_tokens=4.0), 400, "max_tokens"),
        Case(
            "stream is a string", _with(service, stream="yes"), 400, "stream: Input should be a valid boolean"
        ),
        Case("temperature is a bool", _with(service, temperature=True), 400, "temperature"),
        Case("content is a number", _with(service, messages=_message("user", 5)), 400, "messages[0].content"),
        Case(
            "part without type",
            _with(service, messages=_message("user", [{"text": "x"}])),
            400,
            "unsupported type",
        ),
        Case(
            "image_url is a string",
            _with(service, messages=_message("user", [{"type": "image_url", "image_url": "x"}])),
            400,
            "messages[0].content",
        ),
        # -- roles and content
        Case("unknown role", _with(service, messages=_message("tool", "x")), 400, "messages[0].role"),
        Case("role is missing", _with(service, messages=[{"content": "x"}]), 400, "messages[0].role"),
        Case("empty content", _with(service, messages=_message("user", "")), 400, "content is empty"),
        Case("blank content", _with(service, messages=_message("user", "   \n")), 400, "content is empty"),
        Case("empty parts", _with(service, messages=_message("user", [])), 400, "content is an empty list"),
        Case(
            "null content", _with(service, messages=_message("assistant", None)), 400, "content is required"
        ),
        Case(
            "image in a system message",
            _with(
                service,
                messages=_message("system", [{"type": "image_url", "image_url": {"url": image_data_url(1)}}]),
            ),
            400,
            "only allowed in user messages",
        ),
        Case(
            "lone surrogate",
            b'{"model": "%s", "messages": [{"role": "user", "content": "\\ud800"}]}' % service.model.encode(),
            400,
            "not valid Unicode",
        ),
        # -- images
        Case(
            "undecodable image",
            _images(service, data_url(b"definitely not an image")),
            400,
            "not a decodable",
            code="invalid_image_data",
        ),
        Case(
            "truncated image",
            _images(service, data_url(png[:120])),
            400,
            "truncated or corrupt",
            code="invalid_image_data",
        ),
        Case(
            "zero-byte image",
            _images(service, "data:image/png;base64,"),
            400,
            "the image is empty",
            code="invalid_image_data",
        ),
        Case(
            "zero-width image",
            _images(service, data_url(png_header_only(0, 16))),
            400,
            f"{where}:",
            code="invalid_image_data",
        ),
        Case("bad base64", _images(service, "data:image/png;base64,@@@@"), 400, "not valid base64"),
        Case(
            "decompression bomb",
            _images(service, data_url(png_header_only(side, side))),
            400,
            "pixels",
            code="image_too_large",
        ),
        Case(
            "one huge side",
            _images(service, data_url(png_header_only(limits.max_image_side + 1, 1))),
            400,
            "per side",
            code="image_too_large",
        ),
        Case(
            "a thin strip (the processor would scale its short side up)",
            _images(service, data_url(png_header_only(int(limits.max_aspect_ratio) + 1, 1))),
            400,
            "aspect ratio",
            code="image_too_large",
        ),
        Case(
            "animated PNG",
            _images(service, data_url(animated("PNG"))),
            400,
            "animated",
            code="unsupported_image_type",
        ),
        Case(
            "animated WebP",
            _images(service, data_url(animated("WEBP"), "image/webp")),
            400,
            "animated",
            code="unsupported_image_type",
        ),
        Case(
            "CMYK JPEG",
            _images(service, data_url(encode(random_image(4).convert("CMYK"), "JPEG"), "image/jpeg")),
            400,
            "CMYK",
            code="unsupported_image_type",
        ),
        Case(
            "16-bit PNG",
            _images(service, data_url(encode(random_image(4).convert("I;16"), "PNG"))),
            400,
            "colour mode",
            code="unsupported_image_type",
        ),
        Case(
            "too many images",
            _images(service, *[image_data_url(i, size=(8, 8)) for i in range(limits.max_images + 1)]),
            400,
            f"at most {limits.max_images}",
            code="too_many_images",
        ),
        Case(
            "HTML as data URL",
            _images(service, "data:text/html;base64,PGI+aGk8L2I+"),
            400,
            "MIME type 'text/html'",
            code="unsupported_image_type",
        ),
        Case(
            "GIF MIME",
            _images(service, data_url(encode(random_image(2), "GIF"), "image/gif")),
            400,
            "MIME type 'image/gif'",
            code="unsupported_image_type",
        ),
        Case(
            "JPEG declared as PNG",
            _images(service, data_url(encode(random_image(2), "JPEG"), "image/png")),
            400,
            "declared as image/png",
            code="unsupported_image_type",
        ),
        Case("data URL without base64", _images(service, "data:image/png,abcd"), 400, "base64-encoded"),
        Case("file URL", _images(service, "file:///etc/passwd"), 400, where),
        # -- lengths and sampling
        Case(
            "prompt over max_model_len",
            _with(service, messages=_message("user", "x " * service.max_model_len)),
            400,
            "max_model_len",
            code="context_length_exceeded",
        ),
        Case(
            "more characters than a prompt of max_model_len tokens could have, refused unread",
            _with(service, messages=_message("user", "x" * (32 * service.max_model_len + 1))),
            400,
            "characters of text",
            code="context_length_exceeded",
        ),
        Case(
            "more (empty) messages than max_model_len, refused before the chat template runs",
            _with(
                service,
                messages=[{"role": "system", "content": ""}] * service.max_model_len + _message("user", "hi"),
            ),
            400,
            "messages and content parts",
            code="context_length_exceeded",
        ),
        Case(
            "max_tokens over max_model_len",
            _with(service, max_tokens=service.max_model_len + 1),
            400,
            "max_tokens",
            code="context_length_exceeded",
        ),
        Case(
            "max_tokens zero",
            _with(service, max_tokens=0),
            400,
            "max_tokens: Input should be greater than or equal to 1",
        ),
        Case("max_tokens negative", _with(service, max_completion_tokens=-3), 400, "max_completion_tokens"),
        Case(
            "temperature too high",
            _with(service, temperature=2.5),
            400,
            "temperature: Input should be less than or equal to 2",
        ),
        Case("temperature negative", _with(service, temperature=-0.1), 400, "temperature"),
        Case(
            "temperature NaN",
            json.dumps(service.body()).replace('"temperature": 0', '"temperature": NaN').encode(),
            400,
            "temperature",
        ),
        Case("top_p zero", _with(service, top_p=0), 400, "top_p: Input should be greater than 0"),
        Case("top_p over one", _with(service, top_p=1.5), 400, "top_p"),
        Case("top_k below -1", _with(service, top_k=-2), 400, "top_k"),
        Case("seed below the signed 64-bit range", _with(service, seed=-(2**63) - 1), 400, "seed"),
        Case(
            "tau over one",
            _with(service, zipvl={"tau": 1.5}),
            400,
            "zipvl.tau: Input should be less than or equal to 1",
        ),
        Case("tau zero", _with(service, zipvl={"tau": 0}), 400, "zipvl.tau: Input should be greater than 0"),
        Case("tau is a string", _with(service, zipvl={"tau": "0.9"}), 400, "zipvl.tau"),
        Case(
            "max_keep_ratio negative",
            _with(service, zipvl={"max_keep_ratio": -0.1}),
            400,
            "zipvl.max_keep_ratio",
        ),
        Case(
            "max_keep_ratio over one",
            _with(service, zipvl={"max_keep_ratio": 1.01}),
            400,
            "zipvl.max_keep_ratio",
        ),
        Case("unknown zipvl knob", _with(service, zipvl={"probe_random": 3}), 400, "zipvl.probe_random"),
        Case("n = 17", _with(service, n=17), 400, "less than or equal to 16"),
        Case("n = 0", _with(service, n=0), 400, "greater than or equal to 1"),
        Case(
            "too many stop strings",
            _with(service, stop=["a", "b", "c", "d", "e"]),
            400,
            "at most 4 stop strings",
        ),
        Case(
            "stream_options without stream",
            _with(service, stream_options={"include_usage": True}),
            400,
            "stream_options is only allowed",
        ),
        # -- unsupported parameters
        Case(
            "tools",
            _with(service, tools=[{"type": "function", "function": {"name": "f"}}]),
            400,
            "tools are not supported",
        ),
        Case("tool_choice required", _with(service, tool_choice="required"), 400, "tool_choice must be"),
        Case(
            "legacy functions", _with(service, functions=[{"name": "f"}]), 400, "functions are not supported"
        ),
        Case("store", _with(service, store=True), 400, "store is not supported"),
        Case(
            "unknown parameter",
            _with(service, best_of=3),
            400,
            "unsupported parameter 'best_of'",
            code="unsupported_parameter",
        ),
        Case(
            "top_logprobs without logprobs",
            _with(service, top_logprobs=2),
            400,
            "top_logprobs requires logprobs to be true",
        ),
        Case("too many top_logprobs", _with(service, logprobs=True, top_logprobs=21), 400, "top_logprobs"),
        Case("presence penalty", _with(service, presence_penalty=2.5), 400, "presence_penalty"),
        Case("repetition penalty", _with(service, repetition_penalty=0), 400, "repetition_penalty"),
        Case("JSON mode", _with(service, response_format={"type": "json_object"}), 400, "response_format"),
        Case("unknown model", _with(service, model="gpt-17"), 404, "not served here", code="model_not_found"),
        # -- remote URLs: off, SSRF guard, hostile hosts (no traffic leaves the machine)
        Case(
            "remote URL while disabled",
            _images(service, "https://example.com/cat.png"),
            400,
            "remote image URLs are disabled",
            Needs.REMOTE_OFF,
            code="url_not_allowed",
        ),
        Case(
            "host not allowlisted",
            _images(service, "http://example.com/cat.png"),
            400,
            "not in the URL allowlist",
            Needs.SSRF_GUARD,
            code="url_not_allowed",
        ),
        Case(
            "URL with credentials",
            _images(service, "http://user:secret@localhost/cat.png"),
            400,
            "credentials",
            Needs.SSRF_GUARD,
        ),
        Case(
            "ftp URL",
            _images(service, "ftp://localhost/cat.png"),
            400,
            "only data: and http(s) URLs",
            Needs.SSRF_GUARD,
        ),
        Case(
            "SSRF loopback literal",
            _images(service, "http://127.0.0.1:9/cat.png"),
            400,
            "SSRF guard",
            Needs.SSRF_GUARD,
            code="url_not_allowed",
        ),
        Case(
            "SSRF IPv6 loopback",
            _images(service, "http://[::1]:9/cat.png"),
            400,
            "SSRF guard",
            Needs.SSRF_GUARD,
            code="url_not_allowed",
        ),
        Case(
            "SSRF private network",
            _images(service, "http://10.0.0.1/cat.png"),
            400,
            "SSRF guard",
            Needs.SSRF_GUARD,
            code="url_not_allowed",
        ),
        Case(
            "SSRF cloud metadata",
            _images(service, "http://169.254.169.254/latest/meta-data"),
            400,
            "SSRF guard",
            Needs.SSRF_GUARD,
            code="url_not_allowed",
        ),
    ]
    if host is not None:
        table += [
            Case(
                "SSRF name resolving to loopback",
                _images(service, host.url("/good.png", host="localhost")),
                400,
                "resolves to a private, loopback",
                Needs.SSRF_GUARD,
                code="url_not_allowed",
            ),
            Case(
                "slow remote body",
                _images(service, host.url("/slow.png")),
                400,
                "took longer than",
                Needs.PRIVATE_FETCH,
                code="url_fetch_timeout",
            ),
            Case(
                "declared oversized remote body",
                _images(service, host.url("/declared-huge.png")),
                400,
                "over the limit",
                Needs.PRIVATE_FETCH,
                code="image_too_large",
            ),
            Case(
                "endless remote body",
                _images(service, host.url("/endless.png")),
                400,
                "over the limit",
                Needs.PRIVATE_FETCH,
                code="image_too_large",
            ),
            Case(
                "remote HTML page",
                _images(service, host.url("/page.html")),
                400,
                "content type 'text/html'",
                Needs.PRIVATE_FETCH,
                code="unsupported_image_type",
            ),
            Case(
                "remote 404",
                _images(service, host.url("/missing.png")),
                400,
                "returned HTTP 404",
                Needs.PRIVATE_FETCH,
                code="url_fetch_failed",
            ),
        ]
    if max_request_bytes is not None:
        padding = "x" * (max_request_bytes + 1)
        table.append(
            Case(
                "body over the size limit",
                _with(service, user=padding),
                413,
                "over the limit",
                code="request_too_large",
            )
        )
    return table


@dataclass
class Outcome:
    """What one case got."""

    case: Case
    status: int
    body: str
    problems: list[str]


def check_response(case: Case, response: httpx.Response) -> list[str]:
    """Everything wrong with ``response`` as the answer to ``case`` (empty: correct)."""
    problems = []
    if response.status_code != case.status:
        problems.append(f"status {response.status_code}, expected {case.status}")
    if response.status_code >= 500:
        problems.append("a server error")
    try:
        payload = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return [*problems, f"not JSON: {response.text[:200]!r}"]
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or set(error) != ERROR_KEYS:
        return [*problems, f"not OpenAI's error format: {response.text[:200]}"]
    if case.fragment not in str(error["message"]):
        problems.append(f"message {error['message']!r} does not contain {case.fragment!r}")
    if case.code is not None and error["code"] != case.code:
        problems.append(f"code {error['code']!r}, expected {case.code!r}")
    if not isinstance(error["type"], str) or not error["type"]:
        problems.append("no error type")
    problems += [f"leaks {marker!r}" for marker in LEAK_MARKERS if marker in response.text]
    return problems


def run_matrix(service: Service, table: list[Case], supported: Needs) -> list[Outcome]:
    """Send every case whose needs ``supported`` covers; returns one :class:`Outcome` per case sent."""
    outcomes = []
    with service.client() as client:
        for case in table:
            if case.needs & ~supported:
                continue
            if isinstance(case.body, bytes):
                headers = {"content-type": "application/json", **case.headers}
                response = client.post("/v1/chat/completions", content=case.body, headers=headers)
            else:
                response = client.post("/v1/chat/completions", json=case.body, headers=case.headers)
            outcomes.append(
                Outcome(case, response.status_code, response.text[:300], check_response(case, response))
            )
    return outcomes


def failures(outcomes: list[Outcome]) -> str:
    """A readable list of the cases that got the wrong answer."""
    return "\n".join(
        f"{o.case.name}: {'; '.join(o.problems)} -- {o.status} {o.body}" for o in outcomes if o.problems
    )
