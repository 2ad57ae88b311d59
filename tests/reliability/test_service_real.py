"""Reliability of the Ray Serve application with the real engine and the built-in tiny-llava model.

Where KV accounting and answers matter: the engine's own KV pool (a small one, so that a few requests
fill it), its running / waiting queues and its greedy answers. One cluster for the module; remote
image URLs are off (the default) and no API key is configured (the service is open).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter

import httpx
import pytest

from tests.api.helpers import image_data_url
from tests.reliability import matrix
from tests.reliability.service import Service, ray_cluster, replica_actors
from zipvl_ray.api.auth import DEFAULT_API_KEYS_ENV
from zipvl_ray.api.images import ImageLimits

pytestmark = pytest.mark.ray

MAX_MODEL_LEN = 1024
#: 128 blocks of 16 tokens x 4 layers: two requests with two images (about 150 tokens each) at once.
KV_CACHE_BYTES = 512 * 1024
IMAGES = {"max_images": 12, "max_image_bytes": 200_000, "max_image_pixels": 512 * 512, "max_image_side": 2048}


@pytest.fixture(scope="module")
def service():
    from ray import serve

    from deployments.app import AppArgs, build_app

    with ray_cluster(**{DEFAULT_API_KEYS_ENV: ""}) as cluster:
        args = AppArgs.model_validate(
            {
                "model": "tiny-llava",
                "dtype": "float32",
                "device": "cpu",
                "zipvl": {"tau": 0.9},
                "engine": {
                    "kv_cache_bytes": KV_CACHE_BYTES,
                    "max_model_len": MAX_MODEL_LEN,
                    "max_num_seqs": 8,
                },
                "images": IMAGES,
                "default_max_tokens": 16,
                "ingress": {"num_cpus": 0, "max_ongoing_requests": 64},
                "vision": {"num_cpus": 0},
                "llm": {"num_cpus": 0, "max_ongoing_requests": 64},
            }
        )
        serve.run(build_app(args), name="zipvl", route_prefix="/")
        yield Service(
            base_url=cluster.url("/"),
            app_name="zipvl",
            model="tiny-llava",
            max_model_len=MAX_MODEL_LEN,
            limits=ImageLimits.model_validate(IMAGES),
            timeout_s=120,
        )


def _two_image_body(service: Service, i: int, **extra) -> dict:
    return service.body(
        f"request {i:02d}: compare the pictures.",
        [image_data_url(300 + i, size=(48, 40)), image_data_url(400 + i, size=(40, 48))],
        **extra,
    )


class StatsSampler:
    """Samples the LLM replicas' statistics in a background thread while something runs."""

    def __init__(self, service: Service, interval_s: float = 0.2):
        self.service = service
        self.interval_s = interval_s
        self.samples: list[dict[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(httpx.HTTPError, AssertionError):  # a slow answer: try again
                totals = self.service.llm_totals()
                if totals["replicas"]:  # no LLM replica answered in time: no sample, not zeros
                    self.samples.append(totals)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> StatsSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def peak(self, key: str) -> float:
        return max((s[key] for s in self.samples), default=0.0)


def test_validation_matrix_leaves_the_kv_pool_at_baseline(service, record_figures):
    before = service.wait_llm_idle()
    sent = matrix.run_matrix(service, matrix.cases(service), matrix.Needs.REMOTE_OFF)
    assert not matrix.failures(sent), matrix.failures(sent)
    assert len({o.case.name for o in sent}) >= 30
    assert service.healthy()
    after = service.wait_llm_idle()
    assert after["kv_bytes_used"] == before["kv_bytes_used"] == 0
    assert after["num_finished"] == before["num_finished"] and after["num_aborted"] == before["num_aborted"]
    record_figures(
        "validation_matrix_real",
        {
            "requests": len(sent),
            "statuses": dict(Counter(str(o.status) for o in sent)),
            "server_errors": sum(o.status >= 500 for o in sent),
            "kv_bytes_used_after": after["kv_bytes_used"],
        },
    )


def test_logprobs_cross_the_stages_whole_and_streamed(service):
    """``logprobs`` through the Ray stages: a stream's entries (the LLM replica sends each update's own, not
    the list so far) are the non-streamed answer's, one per generated token, with an image in the prompt."""
    import json

    body = _two_image_body(service, 90, max_tokens=24, ignore_eos=True, logprobs=True, top_logprobs=2)
    with service.client() as client:
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 200, whole.text
        streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 200, streamed.text
    content = whole.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == whole.json()["usage"]["completion_tokens"] == 24
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: ")]
    entries = []
    for event in events[:-1]:
        choices = json.loads(event)["choices"]
        if choices and choices[0]["logprobs"] is not None:
            entries += choices[0]["logprobs"]["content"]
    assert entries == content


def test_choices_cross_the_stages_as_engine_requests_of_their_own(service):
    """``n = 3`` through the Ray stages: three engine requests (ids ``<id>-0`` ...), choice ``i`` seeded
    with ``seed + i`` gives a single request's answer with that seed, streamed or not, and the pool is
    back at its baseline afterwards."""
    import json

    body = _two_image_body(service, 95, max_tokens=8, ignore_eos=True, temperature=1.0, seed=21)
    with service.client() as client:
        whole = client.post("/v1/chat/completions", json={**body, "n": 3})
        assert whole.status_code == 200, whole.text
        singles = [
            client.post("/v1/chat/completions", json={**body, "seed": 21 + i}).json()["choices"][0]["message"]
            for i in range(3)
        ]
        streamed = client.post("/v1/chat/completions", json={**body, "n": 3, "stream": True})
        assert streamed.status_code == 200, streamed.text
    answer = whole.json()
    assert [c["message"] for c in answer["choices"]] == singles
    assert answer["usage"]["completion_tokens"] == 24
    texts = {0: "", 1: "", 2: ""}
    for line in streamed.text.splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                texts[choice["index"]] += choice["delta"].get("content") or ""
    assert [texts[i] for i in range(3)] == [m["content"] for m in singles]
    assert service.wait_llm_idle()["kv_bytes_used"] == 0


def test_a_request_larger_than_the_whole_kv_pool_is_a_client_error(service):
    images = [image_data_url(900 + i, size=(32, 32)) for i in range(12)]
    body = service.body("too big for the pool", images, zipvl={"enabled": False}, max_tokens=8)
    for stream in (False, True):
        with service.client() as client:
            response = client.post("/v1/chat/completions", json={**body, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "kv_capacity_exceeded"
        assert f"({KV_CACHE_BYTES} bytes)" in error["message"]
    assert service.healthy()
    assert service.wait_llm_idle()["kv_bytes_used"] == 0


def test_more_requests_than_the_kv_pool_holds_queue_and_all_finish(service, record_figures):
    requests = 12
    bodies = [_two_image_body(service, i, max_tokens=24, ignore_eos=True) for i in range(requests)]
    with service.client() as client:
        alone = {i: client.post("/v1/chat/completions", json=bodies[i]).json() for i in (0, requests - 1)}

    async def burst():
        limits = httpx.Limits(max_connections=requests + 4, max_keepalive_connections=0)
        async with service.async_client(limits=limits) as client:
            return await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))

    before = service.wait_llm_idle()
    started = time.perf_counter()
    with StatsSampler(service, interval_s=0.05) as sampler:  # a loaded machine slows each sample
        responses = asyncio.run(burst())
    elapsed = time.perf_counter() - started
    assert [r.status_code for r in responses] == [200] * requests, [r.text[:200] for r in responses]
    for r in responses:
        body = r.json()
        assert body["usage"]["completion_tokens"] == 24 and body["choices"][0]["finish_reason"] == "length"
    for i, answer in alone.items():  # queueing and preemption change no answer
        assert (
            responses[i].json()["choices"][0]["message"]["content"]
            == answer["choices"][0]["message"]["content"]
        )
    # The pool was the limit: requests waited in the engine and the pool was (nearly) full.
    assert sampler.peak("num_waiting") >= 1
    assert sampler.peak("kv_bytes_used") > KV_CACHE_BYTES / 4
    after = service.wait_llm_idle()
    assert after["num_finished"] - before["num_finished"] == requests
    record_figures(
        "kv_exhaustion_real",
        {
            "requests": requests,
            "succeeded": sum(r.status_code == 200 for r in responses),
            "peak_waiting": sampler.peak("num_waiting"),
            "peak_running": sampler.peak("num_running"),
            "peak_kv_bytes_used": sampler.peak("kv_bytes_used"),
            "kv_bytes_capacity": KV_CACHE_BYTES,
            "seconds": round(elapsed, 2),
        },
    )


def test_clients_dropping_before_and_after_their_first_token_free_everything(service, record_figures):
    # The pool runs two of these at a time and every mid-stream client frees its slot after 3 events, so
    # on an idle machine 12 clients all got their first token within the 2 s (the engine cycles through
    # them in well under a second); 48 keep some queued past 2 s on a fast machine as on a loaded one.
    clients = 48
    bodies = [
        _two_image_body(service, 50 + i, max_tokens=600, ignore_eos=True, stream=True) for i in range(clients)
    ]
    replicas_before = set(replica_actors("zipvl", "LLMServer"))
    before = service.wait_llm_idle()

    async def one(client: httpx.AsyncClient, body: dict, streaming: asyncio.Event) -> str:
        """Hang up after 3 events, or, without an answer after 2 s (still queued or prefilling), once some
        other client is streaming (so the engine runs requests and the rest queue behind them). A client
        whose answer starts while it waits reads it like the others: on a loaded machine every client may
        pass the 2 s mark, and if none read, none would ever stream."""
        request = client.build_request("POST", "/v1/chat/completions", json=body)
        send = asyncio.ensure_future(client.send(request, stream=True))
        if not (await asyncio.wait({send}, timeout=2.0))[0]:
            someone_streams = asyncio.ensure_future(streaming.wait())
            done, _ = await asyncio.wait(
                {send, someone_streams}, timeout=60, return_when=asyncio.FIRST_COMPLETED
            )
            someone_streams.cancel()
            assert done, "no answer started and no client streamed within 60 s"
            if not send.done():
                send.cancel()
                await asyncio.gather(send, return_exceptions=True)
                return "before first token"
        response = send.result()
        try:
            events = 0
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if events >= 3:
                    streaming.set()
                    return "mid-stream"
            return "finished"
        finally:
            await response.aclose()

    async def drop_all() -> list[str]:
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
        streaming = asyncio.Event()
        async with service.async_client(limits=limits) as client:
            return await asyncio.gather(*(one(client, body, streaming) for body in bodies))

    with StatsSampler(service) as sampler:
        outcomes = Counter(asyncio.run(drop_all()))
        dropped_at = time.perf_counter()
        after = service.wait_llm_idle(timeout_s=30)
    freed_s = time.perf_counter() - dropped_at
    assert outcomes["finished"] == 0
    assert outcomes["before first token"] >= 1 and outcomes["mid-stream"] >= 1, outcomes
    # Some were still queued in the engine when their client left (a total, not a sample: a loaded
    # replica may answer the sampler late).
    assert after["num_aborted_waiting"] - before["num_aborted_waiting"] >= 1, (before, after)
    assert after["num_finished"] == before["num_finished"]
    assert after["num_aborted"] - before["num_aborted"] >= outcomes["mid-stream"]
    time.sleep(2.0)  # nothing finishes later in the background
    later = service.wait_llm_idle()
    assert later["num_finished"] == before["num_finished"] and later["kv_bytes_used"] == 0
    assert later["num_running"] == later["num_waiting"] == 0
    assert set(replica_actors("zipvl", "LLMServer")) == replicas_before
    assert service.healthy()
    record_figures(
        "disconnect_real",
        {
            "clients": clients,
            "dropped_before_first_token": outcomes["before first token"],
            "dropped_mid_stream": outcomes["mid-stream"],
            "aborted_in_engine": after["num_aborted"] - before["num_aborted"],
            "peak_waiting": sampler.peak("num_waiting"),
            "aborted_while_waiting": after["num_aborted_waiting"] - before["num_aborted_waiting"],
            "kv_freed_within_s": round(freed_s, 2),
        },
    )
