"""The OpenAI request schema: what it accepts, what it refuses (and names), how it maps to the template."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from zipvl_ray.api.schemas import ChatCompletionChunk, ChatCompletionRequest, ChatMessage, ZipVLReport
from zipvl_ray.engine.types import RequestMetrics

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
USER = {"role": "user", "content": "and now?"}


def request(**fields) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    body.update(fields)
    return body


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"max_tokens": 5, "max_completion_tokens": 7, "temperature": 0, "top_p": 1, "seed": 0},
        {"temperature": 2, "top_p": 0.1, "top_k": 0, "stop": "x"},
        {"stop": ["a", "b", "c", "d"], "n": 1, "user": "u", "frequency_penalty": 0, "presence_penalty": 0.0},
        {"logprobs": False, "top_logprobs": 0, "logit_bias": {}, "response_format": {"type": "text"}},
        {"logprobs": True, "top_logprobs": 20},
        {"logprobs": True},
        {"frequency_penalty": 0.5, "presence_penalty": -2, "repetition_penalty": 1.2},
        {"stream": True, "stream_options": {"include_usage": True}},
        {"zipvl": {"tau": 1.0, "max_keep_ratio": 0.0, "enabled": False}},
        {"zipvl": {}},
        {"messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": [IMAGE, IMAGE]}]},
        {"messages": [{"role": "user", "content": [IMAGE]}, {"role": "assistant", "content": "ok"}]},
        # the model's own empty answer, replayed as history
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}, USER]},
        {"messages": [{"role": "system", "content": " "}, USER]},
        {"stream": None, "ignore_eos": None},  # nullable, as in OpenAI's schema
        {"top_k": -1},  # vLLM's "off"
        {"seed": -5},
        # what SDKs and frameworks send by default
        {"tools": [], "tool_choice": "none", "parallel_tool_calls": True, "store": False},
        {"metadata": {"run": "7"}, "service_tier": "auto", "functions": [], "function_call": "auto"},
        {"prompt_cache_key": "k", "safety_identifier": "s", "modalities": ["text"]},
        # what wrappers forward as null when unset
        {
            "reasoning_effort": None,
            "verbosity": None,
            "audio": None,
            "prediction": None,
            "web_search_options": None,
        },
        {"stream": True, "stream_options": {"include_usage": True, "include_obfuscation": False}},
        # an SDK's returned assistant message replayed as history (message.model_dump())
        {
            "messages": [
                USER,
                {
                    "role": "assistant",
                    "content": "red",
                    "refusal": None,
                    "tool_calls": None,
                    "function_call": None,
                    "audio": None,
                    "annotations": [],
                },
                USER,
            ]
        },
    ],
)
def test_accepted(fields):
    ChatCompletionRequest.model_validate(request(**fields))


def test_null_booleans_minus_one_top_k_and_negative_seeds_mean_what_vllm_means():
    parsed = ChatCompletionRequest.model_validate(request(stream=None, ignore_eos=None, top_k=-1, seed=-5))
    assert (parsed.stream, parsed.ignore_eos, parsed.top_k, parsed.seed) == (False, False, 0, -5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("frequency_penalty", 2.5),  # out of range
        ("presence_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("top_logprobs", 3),  # without logprobs
        ("logit_bias", {"1": 5}),
        ("response_format", {"type": "json_object"}),
        ("stream_options", {"include_usage": True}),
    ],
)
def test_refused_unsupported_fields_name_themselves_as_the_error_param(field, value):
    from pydantic import ValidationError

    from zipvl_ray.api.errors import describe_validation_errors

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(request(**{field: value}))
    assert describe_validation_errors(list(info.value.errors())).param == field


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ({"messages": []}, "at least 1 item"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
        ({"messages": [{"role": "user", "content": "   "}]}, "content is empty"),
        ({"messages": [{"role": "user", "content": []}]}, "empty list"),
        ({"messages": [{"role": "user", "content": None}]}, "tool calls are not supported"),
        ({"messages": [{"role": "user", "content": 3}]}, "string or a list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "unsupported type 'input_audio'",
        ),
        ({"messages": [{"role": "user", "content": ["text"]}]}, "must be an object"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": " "}]}]},
            "no text and no image",
        ),
        ({"messages": [{"role": "system", "content": [IMAGE]}]}, "only allowed in user messages"),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "c"}]}]},
            "tool calls are not",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}]},
            "refusals are not supported",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "audio": {"id": "a"}}]},
            "audio is not supported",
        ),
        ({"messages": [{"role": "user", "content": "x", "weight": 1}]}, "Extra inputs"),
        ({"reasoning_effort": "low"}, "reasoning_effort is not supported"),
        ({"verbosity": "high"}, "verbosity is not supported"),
        ({"modalities": ["text", "audio"]}, "modalities must be"),
        ({"prediction": {"type": "content", "content": "x"}}, "prediction is not supported"),
        ({"web_search_options": {}}, "web_search_options is not supported"),
        ({"max_tokens": 0}, "greater than or equal to 1"),
        ({"max_tokens": 1.5}, "valid integer"),
        ({"max_tokens": "5"}, "valid integer"),
        ({"temperature": -0.1}, "greater than or equal to 0"),
        ({"temperature": "hot"}, "valid number"),
        ({"top_p": 1.1}, "less than or equal to 1"),
        ({"seed": -(2**63) - 1}, "greater than or equal to -9223372036854775808"),
        ({"top_k": -2}, "greater than or equal to -1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
        ({"stop": [""]}, "must not be empty"),
        ({"n": 17}, "less than or equal to 16"),
        ({"n": 0}, "greater than or equal to 1"),
        ({"stream": "yes"}, "valid boolean"),
        ({"stream_options": {"include_usage": True}}, "only allowed when stream is true"),
        ({"frequency_penalty": 2.5}, "less than or equal to 2"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"repetition_penalty": 0}, "greater than 0"),
        ({"repetition_penalty": 11}, "less than or equal to 10"),
        ({"top_logprobs": 2}, "top_logprobs requires logprobs to be true"),
        ({"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
        ({"logprobs": True, "top_logprobs": -1}, "greater than or equal to 0"),
        ({"logprobs": 1}, "valid boolean"),
        ({"logit_bias": {"1": 5}}, "logit_bias is not supported"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools are not supported"),
        ({"tool_choice": "required"}, "tool_choice must be 'none' or 'auto'"),
        ({"functions": [{"name": "f"}]}, "functions are not supported"),
        ({"store": True}, "store is not supported"),
        ({"service_tier": "flex"}, "service_tier"),
        ({"best_of": 2}, "Extra inputs"),
        ({"zipvl": {"tau": 0}}, "greater than 0"),
        ({"zipvl": {"max_keep_ratio": 1.5}}, "less than or equal to 1"),
        ({"zipvl": {"enabled": "no"}}, "valid boolean"),
        ({"zipvl": {"normalize": "causal_length"}}, "Extra inputs"),
    ],
)
def test_refused(fields, fragment):
    with pytest.raises(ValidationError, match=fragment):
        ChatCompletionRequest.model_validate(request(**fields))


def test_template_messages_keep_image_order_and_map_developer_to_system():
    body = ChatCompletionRequest.model_validate(
        request(
            messages=[
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, IMAGE, {**IMAGE, "image_url": {"url": "u2"}}],
                },
            ]
        )
    )
    assert body.template_messages() == [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image"}, {"type": "image"}]},
    ]
    assert body.image_urls() == ["data:image/png;base64,AAAA", "u2"]


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({}, None),
        ({"max_tokens": 3}, 3),
        ({"max_completion_tokens": 4}, 4),
        ({"max_tokens": 3, "max_completion_tokens": 4}, 4),
    ],
)
def test_requested_max_tokens(fields, expected):
    assert ChatCompletionRequest.model_validate(request(**fields)).requested_max_tokens == expected


def test_zipvl_overrides_only_what_was_set():
    body = ChatCompletionRequest.model_validate(request(zipvl={"tau": 0.9}))
    assert body.zipvl.overrides() == {"tau": 0.9}


def test_zipvl_report_from_metrics():
    metrics = RequestMetrics(
        prompt_tokens=10, image_tokens=4, kept_tokens_per_layer=[5, 10], kv_bytes=300, kv_bytes_dense=400
    )
    report = ZipVLReport.from_metrics(metrics)
    assert report.model_dump() == {
        "kept_ratio_per_layer": [0.5, 1.0],
        "mean_kept_ratio": 0.75,
        "kv_bytes": 300,
        "kv_bytes_dense": 400,
        "image_tokens": 4,
    }


def test_chunk_has_openai_shape():
    chunk = ChatCompletionChunk(id="c", created=1, model="m", choices=[]).model_dump(exclude_none=True)
    assert chunk == {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": []}


def test_message_image_urls_of_a_string_message_are_empty():
    assert ChatMessage(role="user", content="hi").image_urls == []


@pytest.mark.parametrize("role", ["tool", "function"])
def test_tool_and_function_messages_are_refused_by_name(role):
    """A replayed tool result gets "not supported (no function calling)", not a bare list of the roles
    that are accepted."""
    from pydantic import ValidationError

    from zipvl_ray.api.schemas import ChatCompletionRequest

    with pytest.raises(
        ValidationError, match=rf"'{role}' messages are not supported \(no function calling\)"
    ):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": role, "content": "42"}]})


@pytest.mark.parametrize(
    "extra, fragment",
    [
        ({"stop": ["\ufffd"]}, r"U\+FFFD"),  # it turned off incremental detokenizing: quadratic per token
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k": "v" * 513}}, "at most 512"),
        ({"user": "u" * 257}, "user"),
        ({"prompt_cache_key": "k" * 257}, "prompt_cache_key"),
    ],
)
def test_ignored_and_costly_fields_are_bounded(extra, fragment):
    """A review: ``metadata`` of 5M entries was accepted (9.7 s of parsing on the event loop), and a U+FFFD
    stop string made every token's stop check decode the whole output again."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    with pytest.raises(ValidationError, match=fragment):
        ChatCompletionRequest.model_validate(body)
    ok = {"metadata": {f"k{i}": "v" * 512 for i in range(16)}, "user": "u" * 256, "stop": ["\n\n"]}
    ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **ok}
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"messages": [{"role": "robot", "content": "hi"}] * 10_000},
        {"messages": [{"role": "user", "content": [{"type": "video"}] * 10_000}]},
        {"stop": [1] * 10_000},
        {"logit_bias": {str(i): "x" for i in range(10_000)}},
        {"metadata": {str(i): 1 for i in range(10_000)}},
        {"tools": [1] * 10_000},
        {"functions": [1] * 10_000},
    ],
)
def test_a_list_of_bad_items_is_one_error(fields):
    """Validation stops at a list's or a map's first bad item: every error becomes a dict for the response,
    and 400,000 of them held the GIL for 1.6 s (a body of 200,000 bad messages)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(request(**fields))
    assert info.value.error_count() <= 3
