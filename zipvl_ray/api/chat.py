"""One chat completion: validation and CPU preparation (:class:`ChatPreparer`), then generation through an
:class:`InferenceBackend`, answered as JSON or as server-sent events (:class:`ChatCompletionHandler`).

The preparation is the ingress's CPU work: decode and validate images, apply the chat template, expand
image placeholders, tokenize and check the request against the model's limits. Nothing here knows how
the backend reaches the vision encoder and the engine (Ray Serve handles, or the same process).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import jinja2
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zipvl_ray.api.auth import AuthSettings
from zipvl_ray.api.errors import APIError, describe_validation_errors, error_payload
from zipvl_ray.api.images import ImageLimits, PixelBudget, load_pixels, open_image_url
from zipvl_ray.api.middleware import IngressCounters
from zipvl_ray.api.schemas import (
    AssistantMessage,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    Usage,
    ZipVLReport,
)
from zipvl_ray.api.sse import SSE_DONE, SSE_HEADERS, SSE_MEDIA_TYPE, sse_event
from zipvl_ray.config import ZipVLConfig
from zipvl_ray.engine.types import RequestError, RequestOutput, SamplingParams
from zipvl_ray.multimodal import PreparedPrompt, PromptError, PromptProcessor
from zipvl_ray.routing.footprint import RoutingHints

logger = logging.getLogger(__name__)

#: OpenAI's default temperature (used when the request does not set one).
DEFAULT_TEMPERATURE = 1.0

#: Characters of message text per token of ``max_model_len`` beyond which a conversation is refused
#: unread (``ServingSettings.max_prompt_chars``): tokenizers average 3-5 characters per token on prose.
PROMPT_CHARS_PER_TOKEN = 32


class ServingSettings(BaseModel):
    """What the HTTP layer needs to know about the served model and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    served_model_name: str = Field(description="Name clients put in 'model' and GET /v1/models lists.")
    model_source: str = Field(description="The checkpoint behind it (built-in name, path or hub id).")
    max_model_len: int = Field(
        ge=2, description="Longest prompt + generation, in tokens (the engine's limit)."
    )
    default_max_tokens: int = Field(
        256,
        ge=1,
        description="Generation budget when the request sets none (cut to what max_model_len leaves).",
    )
    zipvl: ZipVLConfig = Field(default_factory=ZipVLConfig, description="Server-side ZipVL defaults.")
    images: ImageLimits = Field(default_factory=ImageLimits, description="Image limits and URL policy.")
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest request body, in bytes (413 above)."
    )
    max_request_containers: int = Field(
        200_000,
        ge=1000,
        description=(
            "Most '{' and '[' characters in a request body (JSON objects and arrays, and those inside strings), "
            "counted as the body arrives, before it is parsed (400 above). A body over 64 KiB is parsed and "
            "validated in a worker thread, which still takes CPU from the replica: 2.1M empty messages in a "
            "62 MB body took 14 s on the event loop before. A conversation that fits max_model_len has at most a "
            "few per token."
        ),
    )
    health_timeout_s: float = Field(5.0, gt=0, description="How long GET /health waits for each stage.")
    max_prompt_chars: int | None = Field(
        None,
        ge=1,
        description=(
            "Most characters of text in one conversation (all messages), checked before the chat template and "
            "the tokenizer run, so that a huge prompt costs no CPU before it is refused. None: "
            f"{PROMPT_CHARS_PER_TOKEN} x max_model_len, at most 1 MiB (a prompt that fits the context has far "
            "fewer characters per token)."
        ),
    )

    @property
    def prompt_chars_limit(self) -> int:
        """``max_prompt_chars``, or the limit derived from ``max_model_len``."""
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return min(PROMPT_CHARS_PER_TOKEN * self.max_model_len, 1024 * 1024)

    auth: AuthSettings = Field(
        default_factory=AuthSettings,
        description="Where the ingress reads its API keys (Authorization: Bearer); no keys: no authentication.",
    )


class InferenceBackend(Protocol):
    """Where prepared prompts go: vision encoding and generation."""

    def generate(
        self,
        request_id: str,
        prompt: PreparedPrompt,
        sampling: SamplingParams,
        zipvl: dict[str, Any] | None,
        hints: RoutingHints,
        *,
        stream: bool = True,
    ) -> AsyncIterator[RequestOutput]:
        """Encode the prompt's images and stream the request's outputs.

        With ``stream=False`` the client waits for the whole answer, so the backend may deliver only
        the final output (which carries the full text and token ids).

        Raises :class:`APIError` or :class:`RequestError` before the first output for a bad request.
        Closing the iterator early (client gone) must abort the request and free its KV.
        """
        ...

    async def health(self) -> dict[str, str | None]:
        """Per stage: None when ready, else why not."""
        ...

    async def stats(self) -> dict[str, Any]:
        """Per stage and replica statistics (KV use, encoder cache...)."""
        ...


class ClosingStreamingResponse(StreamingResponse):
    """A ``StreamingResponse`` that closes its body iterator however the response ends.

    When the server's ``send`` raises (a closed connection, on ASGI servers that report it so), Starlette
    leaves the generator to the garbage collector: the request kept generating and holding its KV until it
    ran out of tokens. Closing it runs the stream's ``finally``, which aborts the request. The send's
    error (``ClientDisconnect`` under ASGI spec 2.4) is the client's doing: logged at INFO, not raised into
    the server-error handler, which would log it as an unhandled error and try to send a 500 mid-stream.
    """

    async def __call__(self, scope, receive, send) -> None:
        from starlette.requests import ClientDisconnect

        try:
            await super().__call__(scope, receive, send)
        except (OSError, ClientDisconnect) as exc:  # the response started; nothing more can reach the client
            logger.info("client disconnected mid-stream (%s)", type(exc).__name__)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass
class PreparedChat:
    """A validated request, ready for the backend."""

    request_id: str
    prompt: PreparedPrompt
    sampling: SamplingParams
    zipvl: dict[str, Any] | None
    hints: RoutingHints


class ChatPreparer:
    """The ingress's CPU work: images, chat template, placeholders, tokens, limits.

    Parameters
    ----------
    processor : PromptProcessor
        Built from the served model's processor.
    settings : ServingSettings
    """

    def __init__(self, processor: PromptProcessor, settings: ServingSettings):
        self.processor = processor
        self.settings = settings
        # Tokenizers are not safe to share between threads; images are processed concurrently.
        self._tokenizer_lock = threading.Lock()
        #: Each token id's text, decoded alone (``logprobs``); at most the vocabulary.
        self._token_texts: dict[int, str] = {}
        #: Decoded pixels of the requests being prepared (``ImageLimits.max_pending_pixels``).
        self.pixel_budget = PixelBudget(settings.images.pending_pixel_budget)

    async def load_images(
        self, request: ChatCompletionRequest, hold: contextlib.AsyncExitStack | None = None
    ) -> list[Image.Image]:
        """Decode and validate every image of the conversation, concurrently, in template order.

        The decoded pixels count against :attr:`pixel_budget` (waiting for room first): until ``hold`` is
        closed when one is given (:meth:`prepare` holds them through image preprocessing), else until the
        images are decoded.
        """
        locations = [
            f"messages[{i}].content[{j}].image_url.url"
            for i, message in enumerate(request.messages)
            if not isinstance(message.content, str)
            for j, part in enumerate(message.content)
            if part.type == "image_url"
        ]
        urls = request.image_urls()
        limit = self.settings.images.max_images
        if len(urls) > limit:
            raise APIError(
                f"the request has {len(urls)} images; this server accepts at most {limit}",
                param="messages",
                code="too_many_images",
            )
        if not urls:
            return []
        limits = self.settings.images
        # Headers first, all of them: their pixels are counted together before any image is decoded.
        opened = await _gather_first_api_error(
            open_image_url(url, limits, where=where) for url, where in zip(urls, locations, strict=True)
        )
        total = sum(image.width * image.height for image in opened)
        if total > limits.max_total_pixels:
            raise APIError(
                f"the request's {len(opened)} images hold {total} pixels together, over the limit of "
                f"{limits.max_total_pixels}",
                param="messages",
                code="image_too_large",
            )
        async with contextlib.AsyncExitStack() as own:
            granted = await self.pixel_budget.acquire(total)
            (hold if hold is not None else own).callback(self.pixel_budget.release, granted)
            return await _gather_first_api_error(
                asyncio.to_thread(load_pixels, image, where=where)
                for image, where in zip(opened, locations, strict=True)
            )

    def _prepare_sync(self, request: ChatCompletionRequest, images: list[Image.Image]) -> PreparedPrompt:
        inputs = []
        for index, image in enumerate(images):
            try:
                inputs.append(self.processor.preprocess_image(image))
            except ValueError as exc:  # e.g. Qwen2-VL's processor refuses aspect ratios over 200
                raise PromptError(f"image {index}: the model's image processor refused it: {exc}") from None
        self.processor.check_message_text(request.message_texts())
        with self._tokenizer_lock:
            try:
                text = self.processor.render(request.template_messages())
            except jinja2.TemplateError as exc:  # a hub template's raise_exception ("roles must alternate")
                raise PromptError(f"the model's chat template refused the messages: {exc}") from None
            if not text:
                raise PromptError("the prompt is empty")
            token_ids = self.processor.expand(text, inputs)
        if not token_ids:
            raise PromptError("the prompt is empty after tokenization")
        return PreparedPrompt(
            token_ids=list(token_ids), images=inputs, image_token_id=self.processor.image_token_id
        )

    def zipvl_overrides(self, request: ChatCompletionRequest) -> dict[str, Any] | None:
        """The request's ZipVL knobs, checked against the server's defaults (400 when inconsistent)."""
        if request.zipvl is None:
            return None
        overrides = request.zipvl.overrides()
        if not overrides:
            return None
        try:
            self.settings.zipvl.with_overrides(**overrides)
        except ValidationError as exc:
            error = describe_validation_errors(list(exc.errors()))
            raise APIError(f"zipvl: {error.message}", param="zipvl", code="invalid_value") from None
        return overrides

    def check_text_size(self, request: ChatCompletionRequest) -> None:
        """Refuse a conversation with more text than ``max_prompt_chars``, or with more messages and content
        parts than ``max_model_len``, before any tokenization (400).

        Empty messages and parts have no characters, but the chat template and the tokenizer still loop over
        them (under the tokenizer lock that every request's preparation takes): two million of them fit in
        a 64 MiB body and cost about a minute of CPU. Each message adds at least one token in a chat
        template, so a conversation of more items than ``max_model_len`` tokens cannot be served anyway.
        """
        items = request.content_items()
        if items > self.settings.max_model_len:
            raise APIError(
                f"the conversation has {items} messages and content parts; this server accepts at most "
                f"max_model_len ({self.settings.max_model_len})",
                param="messages",
                code="context_length_exceeded",
            )
        limit = self.settings.prompt_chars_limit
        total = request.text_chars()
        if total > limit:
            raise APIError(
                f"the conversation has {total} characters of text; this server accepts at most {limit} "
                f"(and max_model_len is {self.settings.max_model_len} tokens)",
                param="messages",
                code="context_length_exceeded",
            )

    def sampling_params(self, request: ChatCompletionRequest, prompt_tokens: int) -> SamplingParams:
        """Sampling parameters within the model's context (400 when the prompt leaves no room)."""
        limit = self.settings.max_model_len
        room = limit - prompt_tokens
        if room < 1:
            raise APIError(
                f"the prompt has {prompt_tokens} tokens, which leaves no room to generate within the model's "
                f"max_model_len of {limit} tokens; shorten the conversation or send fewer images",
                param="messages",
                code="context_length_exceeded",
            )
        requested = request.requested_max_tokens
        if requested is not None and requested > room:
            field_name = (
                "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
            )
            raise APIError(
                f"{field_name} is {requested} but the prompt has {prompt_tokens} tokens and max_model_len is {limit}: "
                f"at most {room} tokens can be generated",
                param=field_name,
                code="context_length_exceeded",
            )
        max_tokens = requested if requested is not None else min(self.settings.default_max_tokens, room)
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=DEFAULT_TEMPERATURE
                if request.temperature is None
                else float(request.temperature),
                top_p=1.0 if request.top_p is None else float(request.top_p),
                top_k=request.top_k or 0,
                seed=request.seed,
                stop=list(request.stop or []),
                ignore_eos=request.ignore_eos,
                logprobs=(request.top_logprobs or 0) if request.logprobs else None,
                presence_penalty=float(request.presence_penalty or 0.0),
                frequency_penalty=float(request.frequency_penalty or 0.0),
                repetition_penalty=1.0
                if request.repetition_penalty is None
                else float(request.repetition_penalty),
                # A non-streamed answer is sent whole: the engine builds no output before the last.
                output_kind="stream" if request.stream else "final_only",
            )
        except RequestError as exc:
            raise APIError(str(exc), code="invalid_value") from None

    async def logprobs(self, entries: list[dict], top: int) -> ChoiceLogprobs:
        """OpenAI's ``logprobs`` object for engine entries (``{"token_id", "logprob", "top"}``).

        A token's text is the tokenizer's decoding of it alone (as vLLM reports it), cached per id; ids not
        decoded yet are decoded in a thread under the tokenizer lock, which the preparation holds.
        """
        ids = {e["token_id"] for e in entries} | {i for e in entries for i, _ in e.get("top", ())[:top]}
        missing = [i for i in ids if i not in self._token_texts]
        if missing:
            await asyncio.to_thread(self._decode_tokens, missing)
        texts = self._token_texts

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = texts[token_id]
            # -inf / NaN are not JSON: OpenAI and vLLM report an impossible token at -9999.0
            value = float(logprob) if math.isfinite(logprob) else -9999.0
            return {"token": text, "logprob": max(value, -9999.0), "bytes": list(text.encode("utf-8"))}

        return ChoiceLogprobs(
            content=[
                TokenLogprob(
                    **item(e["token_id"], e["logprob"]),
                    top_logprobs=[TopLogprob(**item(i, lp)) for i, lp in e.get("top", ())[:top]],
                )
                for e in entries
            ]
        )

    def _decode_tokens(self, token_ids: list[int]) -> None:
        with self._tokenizer_lock:
            for token_id in token_ids:
                self._token_texts[token_id] = self.processor.tokenizer.decode([token_id])

    async def prepare(self, request: ChatCompletionRequest) -> PreparedChat:
        """Validate ``request`` and turn it into a :class:`PreparedChat` (raises :class:`APIError`)."""
        if request.model != self.settings.served_model_name:
            raise APIError(
                f"model {request.model[:100]!r} is not served here; use {self.settings.served_model_name!r}",
                status_code=404,
                param="model",
                code="model_not_found",
            )
        zipvl = self.zipvl_overrides(request)
        self.check_text_size(request)
        async with contextlib.AsyncExitStack() as hold:  # the decoded pixels count until preprocessed
            images = await self.load_images(request, hold)
            try:
                prompt = await asyncio.to_thread(self._prepare_sync, request, images)
            except PromptError as exc:
                raise APIError(str(exc), param="messages", code="invalid_prompt") from None
            del images
        sampling = self.sampling_params(request, prompt.num_tokens)
        hints = RoutingHints(
            prompt_tokens=prompt.num_tokens,
            image_tokens=prompt.num_image_tokens,
            max_tokens=sampling.max_tokens,
            tau=(zipvl or {}).get("tau"),
            max_keep_ratio=(zipvl or {}).get("max_keep_ratio"),
            zipvl_enabled=(zipvl or {}).get("enabled"),
        )
        return PreparedChat(
            request_id=f"chatcmpl-{uuid.uuid4().hex}",
            prompt=prompt,
            sampling=sampling,
            zipvl=zipvl,
            hints=hints,
        )


def _finish_reason(output: RequestOutput) -> str:
    return (
        output.finish_reason
        if output.finish_reason in ("stop", "length")
        else (output.finish_reason or "stop")
    )


class ChatCompletionHandler:
    """Runs one chat completion against a backend, streaming or not."""

    def __init__(self, backend: InferenceBackend, preparer: ChatPreparer, counters: IngressCounters):
        self.backend = backend
        self.preparer = preparer
        self.counters = counters

    @property
    def model_name(self) -> str:
        return self.preparer.settings.served_model_name

    async def __call__(self, request: ChatCompletionRequest):
        created = int(time.time())
        chat = await self.preparer.prepare(request)
        streams = [
            self.backend.generate(
                request_id, chat.prompt, sampling, chat.zipvl, chat.hints, stream=request.stream
            )
            for request_id, sampling in _choices(chat, request.n or 1)
        ]
        try:
            firsts = await _each(streams, _first_output)
        except BaseException:
            await _close_all(streams)
            raise
        failed = next((f for f in firsts if f.finished and f.finish_reason == "error"), None)
        if failed is not None:  # failed before any token: no stream to open
            await _close_all(streams)
            raise APIError(
                f"generation failed: {failed.error or 'engine error'}", status_code=500, code="engine_error"
            )
        if request.stream:
            return ClosingStreamingResponse(
                self._stream(chat, request, created, list(zip(firsts, streams, strict=True))),
                media_type=SSE_MEDIA_TYPE,
                headers=SSE_HEADERS,
            )
        try:
            finals = await _each(list(zip(firsts, streams, strict=True)), _final_output)
        finally:
            await _close_all(streams)
        failed = next((f for f in finals if f.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(
                f"generation failed: {failed.error or 'engine error'}", status_code=500, code="engine_error"
            )
        choices = [
            ChatCompletionChoice(
                index=index,
                message=AssistantMessage(content=final.text),
                finish_reason=_finish_reason(final),
                logprobs=await self.preparer.logprobs(final.logprobs or [], request.top_logprobs or 0)
                if request.logprobs
                else None,
            )
            for index, final in enumerate(finals)
        ]
        response = ChatCompletionResponse(
            id=chat.request_id,
            created=created,
            model=self.model_name,
            choices=choices,
            usage=_usage(chat, finals),
            zipvl=ZipVLReport.from_metrics(finals[0].metrics),
        )
        self.counters.completed += 1
        return JSONResponse(response.model_dump(mode="json"))

    async def _stream(
        self,
        chat: PreparedChat,
        request: ChatCompletionRequest,
        created: int,
        streams: list[tuple[RequestOutput, AsyncIterator[RequestOutput]]],
    ) -> AsyncIterator[str]:
        """The server-sent events of ``streams`` (one per choice: its first output and the rest), in the
        order their outputs arrive; each choice's chunks carry its ``index``."""
        include_usage = request.include_usage
        chunk_usage: dict[str, Any] = {"usage": None} if include_usage else {}
        # With logprobs, per choice: the entries of tokens whose text has not been sent yet (a token may add
        # no visible text, a partial character or a possible stop string held back); they go with the next
        # text. And the entries received so far.
        unsent: list[list[dict]] = [[] for _ in streams]
        received = [0 for _ in streams]

        def new_entries(index: int, output: RequestOutput) -> list[dict]:
            # An LLM replica older than delta_logprobs (a rolling update) sends the whole list every time.
            delta = getattr(output, "delta_logprobs", None)
            entries = delta if delta is not None else (output.logprobs or [])[received[index] :]
            received[index] += len(entries)
            return entries

        async def chunk(
            index: int,
            delta: DeltaMessage,
            finish_reason: str | None = None,
            zipvl: ZipVLReport | None = None,
        ) -> str:
            body = ChatCompletionChunk(
                id=chat.request_id,
                created=created,
                model=self.model_name,
                choices=[ChatCompletionChunkChoice(index=index, delta=delta, finish_reason=finish_reason)],
                zipvl=zipvl,
            ).model_dump(mode="json", exclude_none=True)
            body["choices"][0].setdefault("finish_reason", None)
            body["choices"][0]["logprobs"] = None
            if unsent[index] and (delta.content or finish_reason is not None):
                rendered = await self.preparer.logprobs(unsent[index], request.top_logprobs or 0)
                body["choices"][0]["logprobs"] = rendered.model_dump(mode="json")
                unsent[index].clear()
            return sse_event({**body, **chunk_usage})

        # True once the generation ended (normally or with an error event); False in the finally
        # clause means the client went away mid-stream (the stream was closed or cancelled).
        ended = False
        finals: list[RequestOutput | None] = [None for _ in streams]
        merged = _interleaved(streams)
        try:
            for index in range(len(streams)):
                yield await chunk(index, DeltaMessage(role="assistant", content=""))
            async for index, output in merged:
                if request.logprobs:
                    unsent[index].extend(new_entries(index, output))
                if output.delta_text:
                    yield await chunk(index, DeltaMessage(content=output.delta_text))
                if not output.finished:
                    continue
                if output.finish_reason == "error":
                    ended = True
                    yield sse_event(
                        error_payload(
                            f"generation failed: {output.error or 'engine error'}",
                            type="server_error",
                            code="engine_error",
                        )
                    )
                    yield SSE_DONE
                    return
                finals[index] = output
                yield await chunk(
                    index, DeltaMessage(), _finish_reason(output), ZipVLReport.from_metrics(output.metrics)
                )
            ended = True
            if include_usage:
                body = ChatCompletionChunk(
                    id=chat.request_id,
                    created=created,
                    model=self.model_name,
                    choices=[],
                    usage=_usage(chat, [f for f in finals if f is not None]),
                ).model_dump(mode="json", exclude_none=True)
                yield sse_event(body)
            self.counters.completed += 1
            yield SSE_DONE
        except StreamEndedEarly:
            ended = True
            yield sse_event(
                error_payload("the engine ended the stream early", type="server_error", code="engine_error")
            )
            yield SSE_DONE
        except APIError as exc:
            ended = True
            yield sse_event(exc.to_dict())
            yield SSE_DONE
        except Exception as exc:  # headers are sent: report in the stream, never a stack trace
            ended = True
            logger.error("stream %s failed: %s", chat.request_id, type(exc).__name__, exc_info=exc)
            yield sse_event(
                error_payload("internal server error", type="server_error", code="internal_error")
            )
            yield SSE_DONE
        finally:
            if not ended:
                self.counters.disconnected += 1
            await merged.aclose()  # first: its tasks may be waiting on the streams
            await _close_all([outputs for _, outputs in streams])


def _choices(chat: PreparedChat, n: int) -> list[tuple[str, SamplingParams]]:
    """The engine request id and sampling parameters of each of ``n`` choices: one request each, choice
    ``i`` seeded with ``seed + i`` when the request sets a seed (so that seeded choices differ and repeat)."""
    if n == 1:
        return [(chat.request_id, chat.sampling)]
    seed = chat.sampling.seed
    return [
        (
            f"{chat.request_id}-{i}",
            dataclasses.replace(chat.sampling, seed=None if seed is None else seed + i),
        )
        for i in range(n)
    ]


class StreamEndedEarly(Exception):
    """A backend stream ended without a finished output."""


async def _each(items: list, step) -> list:
    """``step`` of every item: directly for one, concurrently for several (the first error any raised
    is raised as it is, and the others are cancelled)."""
    if len(items) == 1:
        return [await step(items[0])]
    tasks = [asyncio.ensure_future(step(item)) for item in items]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _final_output(first_and_rest: tuple[RequestOutput, AsyncIterator[RequestOutput]]) -> RequestOutput:
    final, outputs = first_and_rest
    try:
        while not final.finished:
            final = await anext(outputs)
    except StopAsyncIteration:
        raise APIError(
            "the engine ended the request without a result", status_code=500, code="internal_error"
        ) from None
    return final


async def _interleaved(
    streams: list[tuple[RequestOutput, AsyncIterator[RequestOutput]]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """``(index, output)`` of every stream until each has finished, in the order the outputs arrive (each
    stream's first output first). A stream that ends without a finished output raises
    :class:`StreamEndedEarly`, and an error a stream raises is raised here, as iterating it alone would."""
    if len(streams) == 1:  # no task in between: one choice streams as it always did
        output, outputs = streams[0]
        yield 0, output
        while not output.finished:
            output = await _next_output(outputs)
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, output: RequestOutput, outputs: AsyncIterator[RequestOutput]) -> None:
        try:
            await queue.put((index, output, None))
            while not output.finished:
                output = await _next_output(outputs)
                await queue.put((index, output, None))
        except BaseException as exc:  # handed to the consumer (cancellation aside)
            if not isinstance(exc, asyncio.CancelledError):
                await queue.put((index, None, exc))
            raise

    tasks = [asyncio.ensure_future(pump(i, first, rest)) for i, (first, rest) in enumerate(streams)]
    try:
        unfinished = len(streams)
        while unfinished:
            index, output, error = await queue.get()
            if error is not None:
                raise error
            if output.finished:
                unfinished -= 1
            yield index, output
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _gather_first_api_error(coroutines) -> list[Any]:
    """Run ``coroutines`` concurrently; their results in order, or the first :class:`APIError` any raised
    (the others are cancelled)."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in coroutines]
    except BaseExceptionGroup as group_error:
        api_errors = [e for e in group_error.exceptions if isinstance(e, APIError)]
        if api_errors:
            raise api_errors[0] from None
        raise
    return [task.result() for task in tasks]


async def _first_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(outputs)
    except RequestError as exc:
        raise APIError(str(exc), code="invalid_request") from None
    except PromptError as exc:
        raise APIError(str(exc), param="messages", code="invalid_prompt") from None
    except StopAsyncIteration:
        raise APIError("the engine returned no output", status_code=500, code="internal_error") from None


async def _close(outputs: AsyncIterator[RequestOutput]) -> None:
    aclose = getattr(outputs, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _next_output(outputs: AsyncIterator[RequestOutput]) -> RequestOutput:
    try:
        return await anext(outputs)
    except StopAsyncIteration:  # not raised through an async generator (it would become a RuntimeError)
        raise StreamEndedEarly() from None


async def _close_all(streams: list[AsyncIterator[RequestOutput]]) -> None:
    for outputs in streams:
        await _close(outputs)


def _usage(chat: PreparedChat, finals: list[RequestOutput]) -> Usage:
    """The prompt counted once (the choices share it, as in OpenAI's usage), every choice's tokens."""
    prompt_tokens = chat.prompt.num_tokens
    completion = sum(len(final.token_ids) for final in finals)
    return Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion
    )
