"""``logprobs`` / ``top_logprobs`` in OpenAI's format, over the real engine in this process (zipvl-tiny,
the trained built-in model, whose answers are words: a random model's are partial characters).

The engine's entries (its own tests check them against ``log_softmax`` of the logits) become
``choices[].logprobs.content``: one entry per generated token, the streamed chunks carrying the entries of
the tokens their text comes from, so that a stream's entries are the non-streamed answer's.
"""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from tests.api.helpers import chat_body
from zipvl_ray.api.local import LocalBackend
from zipvl_ray.api.server import ServingSettings, build_openai_app
from zipvl_ray.config import EngineConfig
from zipvl_ray.engine import AsyncLLMEngine
from zipvl_ray.models import load_processor
from zipvl_ray.multimodal import PromptProcessor

SETTINGS = ServingSettings(served_model_name="zipvl-tiny", model_source="zipvl-tiny", max_model_len=512)


@pytest.fixture(scope="module")
def tokenizer():
    return load_processor("zipvl-tiny").tokenizer


@pytest.fixture(scope="module")
def app():
    engine = AsyncLLMEngine.from_pretrained(
        "zipvl-tiny", device="cpu", engine=EngineConfig(max_model_len=512, kv_cache_bytes=1 << 20)
    )
    yield build_openai_app(LocalBackend(engine), PromptProcessor(load_processor("zipvl-tiny")), SETTINGS)
    engine.shutdown()


def post(app, body: dict) -> httpx.Response:
    async def run():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/chat/completions", json=body)

    return asyncio.run(run())


def stream_events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def body(**extra) -> dict:
    """A question zipvl-tiny answers with a word; 12 tokens (its end-of-turn token repeated after it)."""
    fields = {"max_tokens": 12, "ignore_eos": True, "temperature": 0, "model": "zipvl-tiny", **extra}
    return chat_body("What shape is in the image?", **fields)


@pytest.mark.parametrize("top", [0, 3, 20])
def test_each_generated_token_has_its_logprob_and_the_most_likely_alternatives(app, tokenizer, top):
    response = post(app, body(logprobs=True, top_logprobs=top))
    assert response.status_code == 200, response.text
    answer = response.json()
    choice = answer["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == answer["usage"]["completion_tokens"] == 12
    for entry in content:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode("utf-8"))
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        assert [a["logprob"] for a in alternatives] == sorted(
            (a["logprob"] for a in alternatives), reverse=True
        )
        if top:  # greedy: the chosen token is the most likely one
            assert (alternatives[0]["token"], alternatives[0]["logprob"]) == (
                entry["token"],
                entry["logprob"],
            )
    # The tokens are the answer's (its text leaves out the special ones, the end-of-turn token here).
    text = "".join(e["token"] for e in content if e["token"] not in tokenizer.all_special_tokens)
    assert text == choice["message"]["content"] and text
    probabilities = [math.exp(a["logprob"]) for a in content[0]["top_logprobs"]]
    assert sum(probabilities) <= 1 + 1e-6


def test_a_stream_carries_the_same_entries_as_the_answer(app):
    whole = post(app, body(logprobs=True, top_logprobs=2)).json()["choices"][0]["logprobs"]["content"]
    events = stream_events(post(app, body(logprobs=True, top_logprobs=2, stream=True)))
    streamed = []
    for event in events:
        choice = event["choices"][0]
        if choice["logprobs"] is not None:
            # Entries travel with text (or the finishing chunk), never alone in an empty delta.
            assert choice["delta"].get("content") or choice["finish_reason"] is not None
            streamed += choice["logprobs"]["content"]
    assert streamed == whole
    assert (
        "".join(e["choices"][0]["delta"].get("content") or "" for e in events)
        == post(app, body()).json()["choices"][0]["message"]["content"]
    )


def test_without_logprobs_every_choice_says_null(app):
    assert post(app, body()).json()["choices"][0]["logprobs"] is None
    assert post(app, body(logprobs=False, top_logprobs=0)).json()["choices"][0]["logprobs"] is None
    assert all(e["choices"][0]["logprobs"] is None for e in stream_events(post(app, body(stream=True))))


def test_a_stop_string_ends_the_entries_with_the_token_that_completed_it(app):
    """The entries cover every generated token, the one that completed the stop string included (the text
    is cut before the stop string, as OpenAI and vLLM cut it)."""
    free = post(app, body(logprobs=True)).json()["choices"][0]
    word = free["message"]["content"]
    assert len(word) >= 3, word
    stopped = post(app, body(logprobs=True, stop=[word[1:]])).json()["choices"][0]
    assert (stopped["finish_reason"], stopped["message"]["content"]) == ("stop", word[:1])
    assert stopped["logprobs"]["content"] == free["logprobs"]["content"][:1]


def test_penalties_reach_the_engine(app):
    """``presence_penalty`` / ``frequency_penalty`` through the API: each greedy token is the best of the
    top 20 raw log-probabilities less the penalty of the tokens before it (zipvl-tiny repeats its
    end-of-turn token after the answer, so the penalty has something to change)."""
    weight = 1.5
    content = post(app, body(logprobs=True, top_logprobs=20, frequency_penalty=weight)).json()["choices"][0]
    entries = content["logprobs"]["content"]
    tokens = [e["token"] for e in entries]
    for t, entry in enumerate(entries):
        before = tokens[:t]
        best = max(a["logprob"] - weight * before.count(a["token"]) for a in entry["top_logprobs"])
        assert entry["logprob"] - weight * before.count(entry["token"]) >= best - 1e-4
    plain = [e["token"] for e in post(app, body(logprobs=True)).json()["choices"][0]["logprobs"]["content"]]
    assert tokens != plain
    refused = post(app, body(presence_penalty=2.5))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "presence_penalty"


def test_a_stream_from_an_llm_replica_older_than_delta_logprobs_still_carries_every_entry(prompt_processor):
    """During a rolling update a new ingress may stream from an old LLM replica, whose updates carry the
    whole list so far and no ``delta_logprobs``: the ingress takes the new entries from the list."""
    from zipvl_ray.engine.types import RequestOutput

    entries = [{"token_id": 100 + i, "logprob": -0.5 * i, "top": [(100 + i, -0.5 * i)]} for i in range(3)]

    def old_style(i: int, finished: bool = False) -> RequestOutput:
        out = RequestOutput(
            "r", delta_token_ids=[100 + i], delta_text="abc"[i], logprobs=entries[: i + 1], finished=finished
        )
        out.delta_logprobs = None  # what an old replica's pickled output reads as
        if finished:
            out.finish_reason = "length"
            out.token_ids = [100, 101, 102]
            out.text = "abc"
        return out

    class OldReplica:
        async def generate(self, *args, **kwargs):
            for i in range(3):
                yield old_style(i, finished=i == 2)

        async def health(self):
            return {}

        async def stats(self):
            return {}

    app = build_openai_app(
        OldReplica(),
        prompt_processor,
        ServingSettings(served_model_name="tiny-llava", model_source="tiny-llava", max_model_len=512),
    )
    request = chat_body("hi", max_tokens=3, logprobs=True, top_logprobs=1, stream=True)
    streamed = [
        entry
        for event in stream_events(post(app, request))
        if event["choices"] and event["choices"][0]["logprobs"] is not None
        for entry in event["choices"][0]["logprobs"]["content"]
    ]
    assert [e["logprob"] for e in streamed] == [0.0, -0.5, -1.0]
    assert [len(e["top_logprobs"]) for e in streamed] == [1, 1, 1]
