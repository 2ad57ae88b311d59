"""OpenAI-compatible request and response models of the chat completions API.

Requests are strict: unknown parameters, wrong JSON types and values out of range are refused with a
message naming the field (see :mod:`zipvl_ray.api.errors`). OpenAI parameters zipvl-ray does not
implement are accepted only at their neutral value (``frequency_penalty: 0``, ``logprobs: false``...),
so clients that always send them keep working while a request that relies on them is refused rather
than silently answered differently. Per-request ZipVL knobs travel in the body as ``zipvl`` (OpenAI
clients send them with ``extra_body={"zipvl": {...}}``).
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

#: Most stop strings per request (OpenAI's limit).
MAX_STOP_STRINGS = 4
#: Most alternatives ``top_logprobs`` may ask for (OpenAI's and the engine's limit).
MAX_TOP_LOGPROBS = 20
#: Most choices one request may ask for (``n``): each is an engine request of its own.
MAX_CHOICES = 16
#: Largest ``repetition_penalty`` (the engine's ``MAX_REPETITION_PENALTY``).
MAX_REPETITION_PENALTY = 10.0
#: Longest stop string, in characters.
MAX_STOP_CHARS = 256
#: Largest seed (a signed 64-bit integer; torch generators take it as is).
MAX_SEED = 2**63 - 1

_STRICT = ConfigDict(extra="forbid", strict=True)

#: On the request's lists and maps: validation stops at their first bad item. Pydantic collects every
#: error otherwise, and turning 400,000 of them into dicts took 1.6 s holding the GIL (a body of 200,000
#: bad messages under ``max_request_containers``); the client is told the first anyway.
FAIL_FAST = Field(fail_fast=True)


def _valid_unicode(value: str) -> str:
    """Refuse strings that cannot be encoded as UTF-8 (JSON escapes of lone surrogates, ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode: it holds a lone surrogate at character {exc.start}"
        ) from None
    return value


#: A string that must be valid Unicode (the tokenizer, the logs and the JSON answers need UTF-8).
UnicodeStr = Annotated[str, AfterValidator(_valid_unicode)]


class TextPart(BaseModel):
    """A text part of a message's content."""

    model_config = _STRICT

    type: Literal["text"] = Field(description="Always 'text'.")
    text: UnicodeStr = Field(description="The text.")


class ImageURL(BaseModel):
    """Where an image comes from: a ``data:image/...;base64,`` URL, or an allowlisted http(s) URL."""

    model_config = _STRICT

    url: UnicodeStr = Field(
        min_length=1, description="A base64 data URL (PNG, JPEG or WebP) or an http(s) URL."
    )
    detail: Literal["auto", "low", "high"] | None = Field(
        None,
        description="Accepted for compatibility; the model's own image processor decides the resolution.",
    )


class ImagePart(BaseModel):
    """An image part of a message's content (several per message are allowed; a video's frames too)."""

    model_config = _STRICT

    type: Literal["image_url"] = Field(description="Always 'image_url'.")
    image_url: ImageURL = Field(description="The image's URL.")


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    """One message of the conversation."""

    model_config = _STRICT

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="Who wrote the message ('developer' is treated as 'system'). Images only in 'user' messages."
    )
    content: UnicodeStr | Annotated[list[ContentPart], FAIL_FAST] = Field(
        description="A string, or a list of text and image_url parts (user messages only for images)."
    )
    name: UnicodeStr | None = Field(None, description="Accepted for compatibility; not shown to the model.")
    # What an OpenAI SDK's returned assistant message carries when it is replayed as history
    # (``message.model_dump()``): accepted at the values that say "none of this".
    refusal: None = Field(None, description="Accepted as null only (the model does not refuse).")
    tool_calls: Annotated[list[Any], Field(max_length=0), FAIL_FAST] | None = Field(
        None, description="Accepted as null or [] only (no function calling)."
    )
    function_call: None = Field(None, description="Legacy; accepted as null only.")
    audio: None = Field(None, description="Accepted as null only (no audio output).")
    annotations: Annotated[list[Any], Field(max_length=0), FAIL_FAST] | None = Field(
        None, description="Accepted as null or [] only."
    )

    @field_validator("role", mode="before")
    @classmethod
    def _role_is_supported(cls, value: Any) -> Any:
        if value in ("tool", "function"):
            raise ValueError(f"{value!r} messages are not supported (no function calling)")
        return value

    @field_validator("refusal", "tool_calls", "function_call", "audio", "annotations", mode="before")
    @classmethod
    def _only_none(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or (value == [] and info.field_name in ("tool_calls", "annotations")):
            return None
        why = {
            "refusal": "refusals are not supported",
            "tool_calls": "tool calls are not supported (no function calling)",
            "function_call": "function calls are not supported (no function calling)",
            "audio": "audio is not supported",
            "annotations": "annotations are not supported",
        }[info.field_name]
        raise ValueError(f"{why}; send null or leave it out")

    @field_validator("content", mode="before")
    @classmethod
    def _content_is_string_or_parts(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("content is required (tool calls are not supported)")
        if not isinstance(value, str | list):
            raise ValueError("content must be a string or a list of content parts")
        if isinstance(value, list):
            for i, part in enumerate(value):
                if not isinstance(part, dict):
                    raise ValueError(f"content[{i}] must be an object with a 'type'")
                if part.get("type") not in ("text", "image_url"):
                    raise ValueError(
                        f"content[{i}] has unsupported type {str(part.get('type'))[:40]!r}; use 'text' or 'image_url'"
                    )
        return value

    @model_validator(mode="after")
    def _check_content(self) -> ChatMessage:
        """A user message must say something; an assistant's or system's may be empty (a model's empty
        answer replayed as history is a valid conversation, as for OpenAI and vLLM)."""
        if isinstance(self.content, str):
            if self.role == "user" and not self.content.strip():
                raise ValueError("content is empty")
            return self
        if not self.content:
            raise ValueError("content is an empty list")
        if self.role != "user" and any(isinstance(p, ImagePart) for p in self.content):
            raise ValueError(f"images are only allowed in user messages, not in a {self.role!r} message")
        if self.role == "user" and not any(isinstance(p, ImagePart) or p.text.strip() for p in self.content):
            raise ValueError("content has no text and no image")
        return self

    @property
    def image_urls(self) -> list[str]:
        """The URLs of this message's images, in order."""
        if isinstance(self.content, str):
            return []
        return [p.image_url.url for p in self.content if isinstance(p, ImagePart)]

    def to_template(self) -> dict[str, Any]:
        """The message as the chat template expects it (images become ``{"type": "image"}`` placeholders)."""
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            # As a list of parts: the templates of hub VLMs (llava-hf's among them) loop over the parts,
            # and iterate a plain string character by character, or fail on it.
            return {"role": role, "content": [{"type": "text", "text": self.content}]}
        parts = [
            {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p.text}
            for p in self.content
        ]
        return {"role": role, "content": parts}


class StreamOptions(BaseModel):
    """Options of a streamed response."""

    model_config = _STRICT

    include_usage: bool = Field(
        False, description="Send a last chunk (before [DONE]) with empty choices and the request's usage."
    )
    include_obfuscation: bool | None = Field(
        None, description="Accepted for compatibility; ignored (chunks carry no obfuscation padding)."
    )


class ZipVLRequestOptions(BaseModel):
    """Per-request ZipVL knobs; None keeps the server's default."""

    model_config = _STRICT

    tau: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description=(
            "Attention-mass threshold in (0, 1]; 1.0 keeps every token the per-layer cap allows "
            "(dense when max_keep_ratio is unset or 1.0)."
        ),
    )
    max_keep_ratio: float | None = Field(
        None, ge=0.0, le=1.0, description="Cap on the kept fraction of prompt tokens per layer, in [0, 1]."
    )
    enabled: bool | None = Field(None, description="False runs this request densely.")

    def overrides(self) -> dict[str, Any]:
        """The knobs the client set, as keyword overrides of ``ZipVLConfig``."""
        return self.model_dump(exclude_none=True)


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions`` body (OpenAI's, with the ``zipvl`` extension)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "tiny-llava",
                    "messages": [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}},
                                {"type": "text", "text": "What is in this image?"},
                            ],
                        }
                    ],
                    "max_tokens": 32,
                    "zipvl": {"tau": 0.975},
                }
            ]
        },
    )

    model: UnicodeStr = Field(description="The served model's name (see GET /v1/models).")
    messages: list[ChatMessage] = Field(
        min_length=1, fail_fast=True, description="The conversation, oldest first."
    )
    max_tokens: int | None = Field(None, ge=1, description="Most tokens to generate (deprecated name).")
    max_completion_tokens: int | None = Field(
        None, ge=1, description="Most tokens to generate; wins over max_tokens when both are set."
    )
    temperature: float | None = Field(
        None, ge=0.0, le=2.0, description="Sampling temperature; 0 is greedy (default 1)."
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass (default 1).")
    top_k: int | None = Field(
        None,
        ge=-1,
        description="Keep only the k most likely tokens; 0 or -1 (vLLM's value) turn it off (extension).",
    )
    seed: int | None = Field(
        None,
        ge=-MAX_SEED - 1,
        le=MAX_SEED,
        description="Seed of the request's sampling (a signed 64-bit integer): same seed, same tokens.",
    )
    stop: UnicodeStr | Annotated[list[UnicodeStr], FAIL_FAST] | None = Field(
        None, description=f"Up to {MAX_STOP_STRINGS} stop strings."
    )
    n: int | None = Field(
        None,
        ge=1,
        le=MAX_CHOICES,
        description=f"Number of choices (1-{MAX_CHOICES}, default 1): one engine request each, sharing the prompt; "
        "with a seed, choice i is sampled with seed + i.",
    )
    stream: bool = Field(
        False, description="Stream the answer as server-sent events ending with 'data: [DONE]'."
    )
    stream_options: StreamOptions | None = Field(
        None, description="Options of a streamed answer (stream must be true)."
    )
    zipvl: ZipVLRequestOptions | None = Field(
        None, description="Per-request ZipVL knobs (extension; send via extra_body)."
    )
    ignore_eos: bool = Field(
        False, description="Generate max_tokens tokens even past end-of-sequence (extension)."
    )
    user: UnicodeStr | None = Field(
        None, max_length=256, description="Accepted for compatibility (at most 256 characters); ignored."
    )
    frequency_penalty: float | None = Field(
        None,
        ge=-2.0,
        le=2.0,
        description="Lowers each token's logit by this x the times it was generated so far (default 0).",
    )
    presence_penalty: float | None = Field(
        None,
        ge=-2.0,
        le=2.0,
        description="Lowers the logit of each token generated so far by this (default 0).",
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=MAX_REPETITION_PENALTY,
        description="Divides the positive logits of the prompt's and the output's tokens by this and multiplies "
        "the negative ones (vLLM's extension; default 1, off).",
    )
    logprobs: bool | None = Field(
        None,
        description="Return the log-probability of each generated token (choices[].logprobs.content), "
        "from the model's raw next-token distribution (before temperature, top-k and top-p).",
    )
    top_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description=f"With logprobs: also the 0-{MAX_TOP_LOGPROBS} most likely tokens at each position.",
    )
    logit_bias: Annotated[dict[str, float], FAIL_FAST] | None = Field(
        None, description="Not supported: only an empty map is accepted."
    )
    response_format: dict[str, Any] | None = Field(None, description="Only {'type': 'text'} is supported.")
    # Fields SDKs and frameworks send by default; accepted at the values that ask for nothing we lack.
    tools: Annotated[list[dict[str, Any]], FAIL_FAST] | None = Field(
        None, description="Not supported: only an empty list is accepted."
    )
    tool_choice: str | dict[str, Any] | None = Field(
        None, description="Without tools: only 'none' or 'auto' (both mean no tool call)."
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Accepted for compatibility; ignored (no tools)."
    )
    functions: Annotated[list[dict[str, Any]], FAIL_FAST] | None = Field(
        None, description="Legacy tools: not supported, only an empty list is accepted."
    )
    function_call: str | dict[str, Any] | None = Field(None, description="Legacy: only 'none' or 'auto'.")
    store: bool | None = Field(None, description="Storing completions is not supported: only false.")
    metadata: Annotated[dict[str, str], FAIL_FAST] | None = Field(
        None,
        max_length=16,
        description="Accepted for compatibility (as OpenAI: at most 16 pairs, keys of at most 64 characters, "
        "values of at most 512); ignored.",
    )
    service_tier: Literal["auto", "default"] | None = Field(
        None, description="Accepted for compatibility ('auto' or 'default'); ignored."
    )
    prompt_cache_key: UnicodeStr | None = Field(
        None, max_length=256, description="Accepted for compatibility (at most 256 characters); ignored."
    )
    safety_identifier: UnicodeStr | None = Field(None, description="Accepted for compatibility; ignored.")
    # Options of other OpenAI models, which wrappers forward as null when unset.
    reasoning_effort: None = Field(None, description="Not supported (no reasoning): only null is accepted.")
    verbosity: None = Field(None, description="Not supported: only null is accepted.")
    modalities: Annotated[list[Literal["text"]], Field(min_length=1, max_length=1)] | None = Field(
        None, description="Output modalities: only ['text'] (or null) is accepted."
    )
    audio: None = Field(None, description="Not supported (no audio output): only null is accepted.")
    prediction: None = Field(None, description="Predicted outputs are not supported: only null is accepted.")
    web_search_options: None = Field(
        None, description="Not supported (no web search): only null is accepted."
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str] | None:
        if value is None:
            return None
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_CHARS:
                raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters")
            if "\ufffd" in s:  # the replacement character: it would turn off incremental detokenizing
                raise ValueError("stop strings must not contain U+FFFD (the replacement character)")
        return stops

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        for key, item in (value or {}).items():
            if len(key) > 64 or len(item) > 512:
                raise ValueError("metadata keys must be at most 64 characters and values at most 512")
        return value

    @field_validator("stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("top_k")
    @classmethod
    def _minus_one_is_off(cls, value: int | None) -> int | None:
        return 0 if value == -1 else value

    @field_validator(
        "logit_bias",
        "response_format",
        "tools",
        "tool_choice",
        "functions",
        "function_call",
        "store",
    )
    @classmethod
    def _check_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        """Fields accepted only at their neutral value (a field validator, so the error names the field)."""
        ok, why = {
            "logit_bias": (not value, "is not supported; send {} or leave it out"),
            "response_format": (
                value is None or value == {"type": "text"},
                "only {'type': 'text'} is supported",
            ),
            "tools": (not value, "are not supported (no function calling); send [] or leave it out"),
            "tool_choice": (
                value in (None, "none", "auto"),
                "must be 'none' or 'auto' (no function calling)",
            ),
            "functions": (not value, "are not supported (no function calling); send [] or leave it out"),
            "function_call": (
                value in (None, "none", "auto"),
                "must be 'none' or 'auto' (no function calling)",
            ),
            "store": (not value, "is not supported (completions are not stored); send false or leave it out"),
        }[info.field_name]
        if not ok:
            raise ValueError(f"{info.field_name} {why}")
        return value

    @field_validator(
        "reasoning_effort",
        "verbosity",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        mode="before",
    )
    @classmethod
    def _check_null_only(cls, value: Any, info: ValidationInfo) -> Any:
        """Options of other OpenAI models: null (``modalities``: ``["text"]``), else a message naming them."""
        ok, why = {
            "reasoning_effort": (value is None, "is not supported (no reasoning); send null or leave it out"),
            "verbosity": (value is None, "is not supported; send null or leave it out"),
            "modalities": (value in (None, ["text"]), "must be ['text'] (text output only)"),
            "audio": (value is None, "is not supported (no audio output); send null or leave it out"),
            "prediction": (
                value is None,
                "is not supported (no predicted outputs); send null or leave it out",
            ),
            "web_search_options": (
                value is None,
                "is not supported (no web search); send null or leave it out",
            ),
        }[info.field_name]
        if not ok:
            raise ValueError(f"{info.field_name} {why}")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed when stream is true")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` if set, else ``max_tokens`` (None: the server decides)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def text_chars(self) -> int:
        """Characters of text in the whole conversation (image URLs not counted)."""
        return sum(
            len(message.content)
            if isinstance(message.content, str)
            else sum(len(p.text) for p in message.content if isinstance(p, TextPart))
            for message in self.messages
        )

    def content_items(self) -> int:
        """Messages plus the content parts of list contents: what the chat template loops over."""
        return sum(1 if isinstance(m.content, str) else 1 + len(m.content) for m in self.messages)

    def message_texts(self) -> list[str]:
        """The text of every message, in order: a string content, or a message's text parts joined with
        nothing between them, as the chat templates render them (so a control token split over two parts
        is still seen whole)."""
        return [
            message.content
            if isinstance(message.content, str)
            else "".join(p.text for p in message.content if isinstance(p, TextPart))
            for message in self.messages
        ]

    def image_urls(self) -> list[str]:
        """Every image URL of the conversation, in the order the chat template places them."""
        return [url for message in self.messages for url in message.image_urls]

    def template_messages(self) -> list[dict[str, Any]]:
        """The conversation as the chat template expects it."""
        return [message.to_template() for message in self.messages]


# ---------------------------------------------------------------------------------------------------
# Responses


class Usage(BaseModel):
    """Token counts of one request."""

    prompt_tokens: int = Field(description="Prompt tokens, image placeholders included.")
    completion_tokens: int = Field(description="Generated tokens.")
    total_tokens: int = Field(description="prompt_tokens + completion_tokens.")


class ZipVLReport(BaseModel):
    """What ZipVL did to the request (extension of the response)."""

    kept_ratio_per_layer: list[float] = Field(
        description="Kept fraction of prompt tokens, per decoder layer."
    )
    mean_kept_ratio: float = Field(description="Mean of kept_ratio_per_layer.")
    kv_bytes: int = Field(description="KV bytes the request held at the end (block-rounded, all layers).")
    kv_bytes_dense: int = Field(description="KV bytes the same tokens would hold without ZipVL.")
    image_tokens: int = Field(0, description="Prompt tokens that are image placeholders.")

    @classmethod
    def from_metrics(cls, metrics: Any) -> ZipVLReport:
        """Build from an engine ``RequestMetrics``."""
        return cls(
            kept_ratio_per_layer=[round(r, 6) for r in metrics.kept_ratio_per_layer],
            mean_kept_ratio=round(metrics.mean_kept_ratio, 6),
            kv_bytes=int(metrics.kv_bytes),
            kv_bytes_dense=int(metrics.kv_bytes_dense),
            image_tokens=int(metrics.image_tokens),
        )


class AssistantMessage(BaseModel):
    """The generated message."""

    role: Literal["assistant"] = Field("assistant", description="Always 'assistant'.")
    content: str = Field(description="The generated text.")


class TopLogprob(BaseModel):
    """One of the most likely tokens at a position."""

    token: str = Field(description="The token's text (U+FFFD where it holds part of a character).")
    logprob: float = Field(description="Its log-probability (-9999.0 for an impossible token).")
    bytes: list[int] | None = Field(description="The UTF-8 bytes of ``token``.")


class TokenLogprob(TopLogprob):
    """A generated token, its log-probability and the most likely alternatives."""

    top_logprobs: list[TopLogprob] = Field(
        description="The top_logprobs most likely tokens, most likely first."
    )


class ChoiceLogprobs(BaseModel):
    """Log-probabilities of a choice's tokens (``logprobs: true``)."""

    content: list[TokenLogprob] | None = Field(description="One entry per generated token, in order.")
    refusal: None = Field(None, description="Always null.")


class ChatCompletionChoice(BaseModel):
    """One choice of a non-streamed answer."""

    index: int = Field(0, description="Which choice (0 to n - 1).")
    message: AssistantMessage = Field(description="The generated message.")
    finish_reason: str | None = Field(description="'stop' (end of sequence or stop string) or 'length'.")
    logprobs: ChoiceLogprobs | None = Field(None, description="With logprobs: true; else null.")


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(BaseModel):
    """A non-streamed chat completion."""

    id: str = Field(description="Request id ('chatcmpl-...').")
    object: Literal["chat.completion"] = Field("chat.completion", description="Always 'chat.completion'.")
    created: int = Field(default_factory=_now, description="Unix time the request arrived.")
    model: str = Field(description="The served model's name.")
    choices: list[ChatCompletionChoice] = Field(description="The n choices, in index order.")
    usage: Usage = Field(description="Token counts.")
    zipvl: ZipVLReport | None = Field(None, description="What ZipVL did to the request (extension).")
    system_fingerprint: str | None = Field(None, description="Always null.")


class DeltaMessage(BaseModel):
    """What one streamed chunk adds to the message."""

    role: Literal["assistant"] | None = Field(None, description="'assistant' in the first chunk only.")
    content: str | None = Field(None, description="New text.")


class ChatCompletionChunkChoice(BaseModel):
    """The choice of a streamed chunk."""

    index: int = Field(0, description="Which choice the chunk belongs to (0 to n - 1).")
    delta: DeltaMessage = Field(description="New content.")
    finish_reason: str | None = Field(None, description="Set in the last content chunk.")
    logprobs: ChoiceLogprobs | None = Field(
        None,
        description="With logprobs: true, the entries of the tokens this chunk's text comes from; else null.",
    )


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""

    id: str = Field(description="Request id, the same in every chunk.")
    object: Literal["chat.completion.chunk"] = Field("chat.completion.chunk", description="Always this.")
    created: int = Field(description="Unix time the request arrived.")
    model: str = Field(description="The served model's name.")
    choices: list[ChatCompletionChunkChoice] = Field(description="One choice; empty in the usage chunk.")
    usage: Usage | None = Field(
        None, description="Only in the final usage chunk (stream_options.include_usage)."
    )
    zipvl: ZipVLReport | None = Field(None, description="In the chunk carrying finish_reason (extension).")


class ModelCard(BaseModel):
    """A served model."""

    id: str = Field(description="Name to put in the request's 'model'.")
    object: Literal["model"] = Field("model", description="Always 'model'.")
    created: int = Field(default_factory=_now, description="Unix time the service started.")
    owned_by: str = Field("zipvl-ray", description="Always 'zipvl-ray'.")
    root: str | None = Field(None, description="The checkpoint (built-in name, path or hub id) behind it.")
    max_model_len: int | None = Field(None, description="Longest prompt + generation, in tokens.")


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = Field("list", description="Always 'list'.")
    data: list[ModelCard] = Field(description="The served models.")


class ErrorDetail(BaseModel):
    """The body of an error."""

    message: str = Field(description="What went wrong, naming the field or value at fault.")
    type: str = Field(description="OpenAI error type ('invalid_request_error', 'server_error', ...).")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = Field(None, description="A stable machine-readable code.")


class ErrorResponse(BaseModel):
    """Every 4xx/5xx body."""

    error: ErrorDetail = Field(description="The error.")


class HealthResponse(BaseModel):
    """``GET /health``: 200 when every stage answers, else 503."""

    status: Literal["ok", "unavailable"] = Field(description="'ok' when every stage is ready.")
    stages: dict[str, bool] = Field(description="Readiness per stage (ingress, vision, llm).")
    detail: dict[str, str] = Field(default_factory=dict, description="Why a stage is not ready.")
