"""Reliability and security of the Ray Serve application, fake engine, real local cluster, real HTTP.

One cluster for the module, two applications (the fake engine answers a function of the prompt, so
mixed-up or lost answers are visible, and it accounts "KV" like the real engine):

* ``zipvl`` at ``/``: two LLM replicas behind the KV-packing router (spread), API keys required
  (read from ``ZIPVL_API_KEYS`` in the node environment, as a Kubernetes Secret would set it),
  loopback and private hosts allowlisted with the SSRF guard on;
* ``tight`` at ``/tight``: small ``max_ongoing_requests`` / ``max_queued_requests`` at the ingress and
  the LLM stage (backpressure), and the loopback image host allowlisted with private networks
  allowed (slow and oversized remote bodies).

Serve's proxy runs zipvl-ray's proxy callback (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``), so
its own answers (backpressure, a dead ingress) are OpenAI errors too. The last test kills an LLM
replica under load.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import statistics
import time
from collections import Counter

import httpx
import pytest

from tests.api.helpers import encode, random_image
from tests.deployments.fakes import TOKEN_DELAY_ENV
from tests.reliability import matrix
from tests.reliability.image_server import image_host
from tests.reliability.load import drop_after_events, percentile, run_streams
from tests.reliability.service import (
    API_KEYS,
    Service,
    proxy_actors,
    ray_cluster,
    replica_actors,
    replica_pid,
    rss_bytes,
)
from zipvl_ray.api.auth import DEFAULT_API_KEYS_ENV
from zipvl_ray.api.images import ImageLimits

pytestmark = pytest.mark.ray

MAX_MODEL_LEN = 512
MAX_REQUEST_BYTES = 1_000_000
LLM_REPLICAS = 2
LOAD_REQUESTS = 200
#: The fake's answers are about 50 characters: 64 tokens finish every answer.
LOAD_MAX_TOKENS = 64
#: Seconds per token of the fake engine: an answer takes about 5 s, long enough to hang up or kill a
#: replica in the middle, and 200 streams make about 2,000 events a second through the cluster.
MAIN_TOKEN_DELAY_S = 0.1
TIGHT_TOKEN_DELAY_S = 0.05

SSRF_HOSTS = ["localhost", "127.0.0.1", "::1", "10.0.0.1", "169.254.169.254"]
ROUTER = {
    "request_router_class": "zipvl_ray.routing.router:KVPackingRouter",
    "request_routing_stats_period_s": 0.5,
    "request_routing_stats_timeout_s": 5,
    "request_router_kwargs": {"strategy": "spread", "max_queue_len": 1000, "hold_when_saturated": False},
}


def _limits(**extra) -> dict:
    return {
        "max_images": 4,
        "max_image_bytes": 200_000,
        "max_image_pixels": 512 * 512,
        "max_image_side": 2048,
        **extra,
    }


def _app_args(images: dict, ingress: dict, llm: dict, token_delay_s: float) -> dict:
    return {
        "model": "tiny-llava",
        "engine": {"max_model_len": MAX_MODEL_LEN},
        "images": images,
        "default_max_tokens": 64,
        "max_request_bytes": MAX_REQUEST_BYTES,
        "engine_class": "tests.deployments.fakes:FakeEngine",
        "encoder_class": "tests.deployments.fakes:FakeVisionEncoder",
        "auth": {"required": True},
        "ingress": {"num_cpus": 0, **ingress},
        "vision": {"num_cpus": 0, "max_batch_size": 16, "batch_wait_timeout_s": 0.01},
        "llm": {"num_cpus": 0, "env_vars": {TOKEN_DELAY_ENV: str(token_delay_s)}, **llm},
    }


@pytest.fixture(scope="module")
def deployed():
    from ray import serve

    from deployments.app import AppArgs, build_app

    with (
        image_host(oversized_bytes=400_000) as host,
        ray_cluster(secret_env={DEFAULT_API_KEYS_ENV: ",".join(API_KEYS)}) as cluster,
    ):
        main_args = AppArgs.model_validate(
            _app_args(
                _limits(allowed_url_hosts=SSRF_HOSTS),
                {"max_ongoing_requests": 256},
                {"num_replicas": LLM_REPLICAS, "max_ongoing_requests": 128, "request_router_config": ROUTER},
                MAIN_TOKEN_DELAY_S,
            )
        )
        tight_args = AppArgs.model_validate(
            _app_args(
                _limits(
                    allowed_url_hosts=["127.0.0.1"], allow_private_networks=True, url_fetch_timeout_s=3.0
                ),
                {"max_ongoing_requests": 8, "max_queued_requests": 4},
                {"num_replicas": 1, "max_ongoing_requests": 2, "max_queued_requests": 2},
                TIGHT_TOKEN_DELAY_S,
            )
        )
        # Both applications start together (their replicas load in parallel).
        serve.run_many(
            [
                serve.RunTarget(build_app(main_args), name="zipvl", route_prefix="/"),
                serve.RunTarget(build_app(tight_args), name="tight", route_prefix="/tight"),
            ]
        )
        common = dict(model="tiny-llava", max_model_len=MAX_MODEL_LEN, api_key=API_KEYS[0])
        yield {
            "main": Service(
                base_url=cluster.url("/"),
                app_name="zipvl",
                limits=ImageLimits.model_validate(main_args.images.model_dump()),
                **common,
            ),
            "tight": Service(
                base_url=cluster.url("/tight"),
                app_name="tight",
                limits=ImageLimits.model_validate(tight_args.images.model_dump()),
                **common,
            ),
            "host": host,
            "cluster": cluster,
        }


@pytest.fixture(scope="module")
def main(deployed) -> Service:
    return deployed["main"]


@pytest.fixture(scope="module")
def tight(deployed) -> Service:
    return deployed["tight"]


# ---------------------------------------------------------------------------------------------------
# 1. Input validation matrix


def test_validation_matrix_answers_4xx_in_openai_format(deployed, main, tight, record_figures):
    host = deployed["host"]
    before = {name: s.wait_llm_idle() for name, s in (("main", main), ("tight", tight))}
    started = time.perf_counter()
    sent = matrix.run_matrix(
        main, matrix.cases(main, host, max_request_bytes=MAX_REQUEST_BYTES), matrix.Needs.SSRF_GUARD
    )
    sent += matrix.run_matrix(tight, matrix.cases(tight, host), matrix.Needs.PRIVATE_FETCH)
    elapsed = time.perf_counter() - started
    assert not matrix.failures(sent), matrix.failures(sent)
    names = {o.case.name for o in sent}
    assert len(names) >= 30
    assert all(400 <= o.status < 500 for o in sent)
    # The hostile image host was really asked (slow, oversized), and never through the SSRF guard.
    assert {"/slow.png", "/declared-huge.png", "/endless.png"} <= set(host.hits)
    assert host.hits.get("/good.png", 0) == 0
    for name, service in (("main", main), ("tight", tight)):
        assert service.healthy()
        after = service.wait_llm_idle()
        assert after["kv_bytes_used"] == before[name]["kv_bytes_used"] == 0
        assert after["num_finished"] == before[name]["num_finished"]  # nothing reached the engine
    record_figures(
        "validation_matrix_fake",
        {
            "requests": len(sent),
            "distinct_cases": len(names),
            "statuses": dict(Counter(str(o.status) for o in sent)),
            "server_errors": sum(o.status >= 500 for o in sent),
            "seconds": round(elapsed, 2),
        },
    )


# ---------------------------------------------------------------------------------------------------
# 7. Security: API keys, size limits, no stack traces


@pytest.mark.parametrize(
    "method, path, headers, status, code",
    [
        ("GET", "/health", {}, 200, None),
        ("GET", "/v1/models", {}, 401, "missing_api_key"),
        ("GET", "/v1/models/tiny-llava", {}, 401, "missing_api_key"),
        ("GET", "/v1/stats", {}, 401, "missing_api_key"),
        ("GET", "/openapi.json", {}, 401, "missing_api_key"),
        ("GET", "/docs", {}, 401, "missing_api_key"),
        ("POST", "/v1/chat/completions", {}, 401, "missing_api_key"),
        ("GET", "/v1/models", {"Authorization": "Bearer zk-not-a-valid-key-000"}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": f"Basic {API_KEYS[0]}"}, 401, "invalid_authorization_header"),
        ("GET", "/v1/models", {"Authorization": "Bearer"}, 401, "invalid_authorization_header"),
        ("GET", "/v1/models", {"Authorization": f"Bearer {API_KEYS[0]}x"}, 401, "invalid_api_key"),
        ("GET", "/v1/models", {"Authorization": f"Bearer {API_KEYS[0]}"}, 200, None),
        ("GET", "/v1/models", {"Authorization": f"bearer {API_KEYS[1]}"}, 200, None),
        ("GET", "/v1/nothing-here", {"Authorization": f"Bearer {API_KEYS[1]}"}, 404, None),
    ],
)
def test_api_keys_guard_every_route_but_health(main, tight, method, path, headers, status, code):
    for service in (main, tight):
        with httpx.Client(base_url=service.base_url, timeout=30) as client:
            response = client.request(method, path, headers=headers, json={} if method == "POST" else None)
        assert response.status_code == status, response.text
        if status == 401:
            error = response.json()["error"]
            assert error["code"] == code and error["type"] == "authentication_error"
            assert response.headers["www-authenticate"].startswith("Bearer")
            assert all(key not in response.text for key in API_KEYS)


def test_key_in_the_query_string_is_not_accepted(main):
    with httpx.Client(base_url=main.base_url, timeout=30) as client:
        response = client.get("/v1/models", params={"api_key": API_KEYS[0]})
    assert response.status_code == 401


def test_unauthenticated_requests_are_refused_before_the_body_is_parsed(main):
    """A client without a key gets 401, not a parse error: the service did not look at its body."""
    with httpx.Client(base_url=main.base_url, timeout=30) as client:
        response = client.post("/v1/chat/completions", content=b"{" * (MAX_REQUEST_BYTES // 2))
    assert response.status_code == 401


@pytest.mark.parametrize("chunked", [False, True])
def test_body_size_limit_with_and_without_content_length(main, chunked):
    payload = (
        b'{"model": "tiny-llava", "messages": [{"role": "user", "content": "'
        + b"y" * MAX_REQUEST_BYTES
        + b'"}]}'
    )
    content = iter([payload[:4096], payload[4096:]]) if chunked else payload
    with main.client() as client:
        response = client.post(
            "/v1/chat/completions", content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


# ---------------------------------------------------------------------------------------------------
# 2. Fuzzing


def test_schemathesis_finds_no_server_error(main, record_figures):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable

    schema = schemathesis.openapi.from_url(f"{main.base_url}/openapi.json", headers=main.headers)
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    statuses: Counter = Counter()
    server_errors: list[str] = []
    examples = {"POST /v1/chat/completions": 75}

    def fuzz(operation, mode) -> None:
        @given(operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=examples.get(operation.label, 10),
            deadline=None,
            database=None,
            # The same examples every run: a random draw of 75 positive chat bodies once held no body
            # the API accepts (all 400), failing the 200 check below by chance.
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def call(case):
            if mode is schemathesis.GenerationMode.POSITIVE and isinstance(case.body, dict):
                # Let valid bodies reach the engine, with short answers (the fake takes 0.1 s a token).
                case.body = {**case.body, "model": main.model, "max_tokens": 3}
                case.body.pop("max_completion_tokens", None)
            response = case.call(base_url=main.base_url, headers=main.headers, timeout=60)
            statuses[(operation.label, response.status_code)] += 1
            if response.status_code >= 500 or "Traceback" in response.text:
                server_errors.append(f"{operation.label} {response.status_code} {response.text[:200]}")

        with contextlib.suppress(Unsatisfiable):  # no way to violate a schema without parameters
            call()

    for result in schema.get_all_operations():
        for mode in modes:
            fuzz(result.ok(), mode)
    total = sum(statuses.values())
    assert not server_errors, "\n".join(server_errors[:10])
    assert total >= 150
    assert any(status == 200 for (label, status) in statuses if label == "POST /v1/chat/completions")
    assert main.healthy()
    main.wait_llm_idle()
    record_figures(
        "fuzzing",
        {
            "requests": total,
            "server_errors": len(server_errors),
            "by_operation_and_status": {
                f"{label} {status}": n for (label, status), n in sorted(statuses.items())
            },
        },
    )


# ---------------------------------------------------------------------------------------------------
# 3. Disconnects and cancellation


def test_many_clients_dropping_mid_stream_free_their_kv(main, record_figures):
    clients = 40
    before = main.wait_llm_idle()
    bodies = [main.body(f"drop me {i}", max_tokens=LOAD_MAX_TOKENS) for i in range(clients)]

    async def drop_all():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
        async with main.async_client(limits=limits) as client:
            return await asyncio.gather(*(drop_after_events(client, body, 4) for body in bodies))

    assert all(n == 4 for n in asyncio.run(drop_all()))
    dropped_at = time.perf_counter()
    after = main.wait_llm_idle(timeout_s=20)
    freed_s = time.perf_counter() - dropped_at
    # An answer takes about 5 s: every request was aborted, none finished in the background.
    assert after["num_aborted"] - before["num_aborted"] == clients
    assert after["num_finished"] == before["num_finished"]
    time.sleep(2 * MAIN_TOKEN_DELAY_S)
    assert main.wait_llm_idle()["num_finished"] == before["num_finished"]
    record_figures("disconnect_mid_stream_fake", {"clients": clients, "kv_freed_within_s": round(freed_s, 2)})


def test_many_clients_dropping_non_streamed_requests_free_their_kv(main):
    clients = 20
    before = main.wait_llm_idle()
    bodies = [main.body(f"hang up {i}", max_tokens=LOAD_MAX_TOKENS) for i in range(clients)]

    async def drop_all():
        limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
        async with main.async_client(limits=limits) as client:
            tasks = [asyncio.create_task(client.post("/v1/chat/completions", json=body)) for body in bodies]
            # Hang up once every request runs in the engine (an answer takes about 5 s), not after a fixed
            # time: a request still on its way to the engine would be cancelled before it counts.
            deadline = time.monotonic() + 20
            while (await asyncio.to_thread(main.llm_totals))["num_running"] < clients:
                assert time.monotonic() < deadline and not any(t.done() for t in tasks), (
                    "requests did not all run"
                )
                await asyncio.sleep(0.1)
            for task in tasks:
                task.cancel()
            return [
                isinstance(r, asyncio.CancelledError)
                for r in await asyncio.gather(*tasks, return_exceptions=True)
            ]

    assert all(asyncio.run(drop_all()))
    after = main.wait_llm_idle(timeout_s=20)
    assert after["num_aborted"] - before["num_aborted"] == clients
    assert after["num_finished"] == before["num_finished"]


# ---------------------------------------------------------------------------------------------------
# 4. Exhaustion and backpressure


def test_overload_is_answered_with_503_and_retry_after_and_nothing_is_lost(tight, record_figures):
    requests = 40
    replicas_before = set(replica_actors("tight", "LLMServer")) | set(
        replica_actors("tight", "OpenAIIngress")
    )
    bodies = [tight.body(f"burst {i:03d}", max_tokens=40, ignore_eos=True) for i in range(requests)]
    # A ramp first: 8 requests 0.1 s apart each reach the ingress (Serve's proxy routes a lone request
    # at once) and outnumber the LLM stage's 2 running + 2 queued (each runs ~2 s), so the ingress
    # refuses some. Then the other 32 at once: the proxy queues 4 while it routes and drops the rest.
    # (All 40 at once can leave the ingress under its limit: the proxy may drop 36 before routing any.)
    ramp = 8
    start_after_s = [0.1 * i for i in range(ramp)] + [0.1 * ramp + 0.2] * (requests - ramp)
    results = asyncio.run(run_streams(tight, bodies, timeout_s=120, start_after_s=start_after_s))
    assert all(r.answered for r in results), [r for r in results if not r.answered][:3]
    by_status = Counter(r.status for r in results)
    assert set(by_status) <= {200, 503}, by_status
    refused = [r for r in results if r.status == 503]
    served = [r for r in results if r.status == 200]
    assert refused and served
    for r in refused:
        assert r.error is not None and set(r.error) == matrix.ERROR_KEYS, r.error
        assert r.error["type"] == "service_unavailable" and r.error["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
    # Both places that bound the load answered: Serve's proxy (the ingress queue) and the ingress (the LLM queue).
    proxy_refusals = [r for r in refused if "Request dropped due to backpressure" in r.error["message"]]
    ingress_refusals = [r for r in refused if "too many queued requests" in r.error["message"]]
    assert proxy_refusals and ingress_refusals
    for r in served:
        assert r.done and r.error is None and r.finish_reason == "length" and len(r.text) == 40
        assert f"burst {r.index:03d}" in r.text
    replicas_after = set(replica_actors("tight", "LLMServer")) | set(replica_actors("tight", "OpenAIIngress"))
    assert replicas_after == replicas_before  # nothing crashed
    assert tight.healthy()
    tight.wait_llm_idle()
    record_figures(
        "backpressure",
        {
            "requests": requests,
            "served": len(served),
            "refused_503_by_proxy": len(proxy_refusals),
            "refused_503_by_ingress": len(ingress_refusals),
            "lost": sum(not r.answered for r in results),
        },
    )


def test_health_answers_200_while_the_llm_stage_is_saturated(tight):
    """/health asks the replicas' own health checks, as Serve's controller does, not a routed call that
    waits behind ``max_ongoing_requests`` (2 here): a stage busy with requests is up, not down."""
    import threading

    tight.wait_llm_idle()
    # Two streams fill the LLM replica (max_ongoing_requests 2); a third could meet the handle's queue limit.
    bodies = [tight.body(f"busy {i}", max_tokens=160, ignore_eos=True) for i in range(2)]
    results: list = []
    worker = threading.Thread(
        target=lambda: results.extend(asyncio.run(run_streams(tight, bodies, timeout_s=120)))
    )
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while tight.llm_totals()["num_running"] < 2:  # the LLM replica is full
            assert time.monotonic() < deadline, tight.llm_totals()
            time.sleep(0.1)
        with httpx.Client(base_url=tight.base_url, timeout=30) as client:
            response = client.get("/health")  # a routed ping would wait out health_timeout_s: 503
        assert response.status_code == 200, response.text
    finally:
        worker.join(150)
    assert len(results) == 2 and all(r.status == 200 and r.done for r in results), [
        (r.status, r.done, r.error) for r in results
    ]


# ---------------------------------------------------------------------------------------------------
# 6. Load


def _replica_rss(app_name: str) -> dict[str, int]:
    """Resident memory of the application's replicas and of Serve's HTTP proxy."""
    pids = {
        f"{deployment}#{replica}": replica_pid(actor)
        for deployment in ("OpenAIIngress", "LLMServer", "VisionEncoder")
        for replica, actor in replica_actors(app_name, deployment).items()
    }
    pids |= {f"proxy#{name[-6:]}": replica_pid(actor) for name, actor in proxy_actors().items()}
    return {name: rss_bytes(pid) for name, pid in pids.items()}


def _load_round(service: Service, offset: int) -> tuple[list, float]:
    bodies = [
        service.body(f"load {offset + i:04d}", max_tokens=LOAD_MAX_TOKENS) for i in range(LOAD_REQUESTS)
    ]
    started = time.perf_counter()
    results = asyncio.run(run_streams(service, bodies, timeout_s=180))
    return results, time.perf_counter() - started


def test_200_concurrent_streams_lose_nothing_mix_nothing_and_keep_memory_flat(main, record_figures):
    reference = main.body("load 0000", max_tokens=LOAD_MAX_TOKENS)
    with main.client() as client:
        expected_0 = client.post("/v1/chat/completions", json=reference).json()["choices"][0]["message"][
            "content"
        ]
    assert " 0000\n" in expected_0

    def check(results, offset):
        problems = []
        for r in results:
            want = expected_0.replace(" 0000\n", f" {offset + r.index:04d}\n")
            if not (r.status == 200 and r.done and r.error is None and r.text == want):
                problems.append(f"#{r.index}: {r.status} {r.error} {r.transport_error} {r.text!r}")
        return problems

    warm, _ = _load_round(main, 1000)  # allocators and connection pools reach their working size
    assert not check(warm, 1000)
    main.wait_llm_idle()
    rss_before = _replica_rss("zipvl")
    results, duration = _load_round(main, 2000)
    problems = check(results, 2000)
    assert not problems, "\n".join(problems[:10])
    assert duration < 150
    main.wait_llm_idle()
    rss_after = _replica_rss("zipvl")
    # The ingress's KV router released every hold: each one is tied to its accepted attempt's result.
    deadline = time.monotonic() + 10
    while (router := main.stats()["router"])["num_holds"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert router["num_holds"] == 0 and not router["held_bytes"], router
    assert router["counters"]["released_by_result"] >= 2 * len(results), router["counters"]
    growth = {name: rss_after[name] - rss_before[name] for name in rss_before}
    # Flat: a second round of 200 streams grows no replica by more than 32 MiB.
    assert max(growth.values()) < 32 * 1024 * 1024, growth
    ttft = [r.ttft_s for r in results]
    total = [r.total_s for r in results]
    finished_per_replica = {r["replica"]: r.get("num_finished", 0) for r in main.stats()["llm"]}
    record_figures(
        "load_200_streams",
        {
            "requests": len(results),
            "lost": sum(not r.answered for r in results),
            "mixed_up": sum(bool(p) for p in problems),
            "duration_s": round(duration, 2),
            "ttft_p50_s": round(statistics.median(ttft), 3),
            "ttft_p95_s": round(percentile(ttft, 0.95), 3),
            "latency_p50_s": round(statistics.median(total), 3),
            "latency_p95_s": round(percentile(total, 0.95), 3),
            "rss_growth_mib": {k: round(v / 2**20, 1) for k, v in growth.items()},
            "finished_per_llm_replica": sorted(finished_per_replica.values()),
        },
    )


# ---------------------------------------------------------------------------------------------------
# 7. Logs never hold image bytes or keys


def test_logs_hold_no_image_bytes_and_no_keys(deployed, main):
    cluster = deployed["cluster"]
    image = base64.b64encode(encode(random_image(4242, (64, 48)), "PNG")).decode()
    marker = image[200:264]  # inside the pixel data: no other image shares it
    good = main.body("look at this", [f"data:image/png;base64,{image}"])
    broken = main.body("look at this", [f"data:image/png;base64,{image[:400]}"])  # truncated
    wrong_type = main.body("look", [f"data:image/png;base64,{image}"], temperature="hot")
    with main.client() as client:
        assert client.post("/v1/chat/completions", json=good).status_code == 200
        assert client.post("/v1/chat/completions", json=broken).status_code == 400
        assert client.post("/v1/chat/completions", json=wrong_type).status_code == 400
    with httpx.Client(base_url=main.base_url, timeout=30) as client:
        for key in ("zk-guessed-key-1234567", API_KEYS[1][:-1]):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 401
    time.sleep(2.0)  # log files are flushed asynchronously
    secrets = [marker, *API_KEYS, "zk-guessed-key-1234567", API_KEYS[1][:-1]]
    files = [
        p for p in cluster.logs_dir.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", "")
    ]
    serve_logs = [p for p in files if "serve" in p.parts]
    assert any("OpenAIIngress" in p.name for p in serve_logs) and any(
        "LLMServer" in p.name for p in serve_logs
    )
    leaks = []
    for path in files:
        text = path.read_text(errors="replace")
        leaks += [f"{path.name}: {secret[:12]}..." for secret in secrets if secret in text]
    assert not leaks, leaks
    # The ingress did log these requests (the check read the right files).
    ingress_text = "".join(p.read_text(errors="replace") for p in serve_logs if "OpenAIIngress" in p.name)
    assert "chat completion chatcmpl-" in ingress_text


# ---------------------------------------------------------------------------------------------------
# 5. Failure: an LLM replica killed under load (last: it changes the cluster)


def test_llm_replica_killed_mid_load(main, record_figures):
    import ray

    replicas = replica_actors("zipvl", "LLMServer")
    assert len(replicas) == LLM_REPLICAS
    requests = 40

    async def load_and_kill():
        streamed = [
            main.body(f"kill stream {i:02d}", max_tokens=LOAD_MAX_TOKENS) for i in range(requests // 2)
        ]
        whole = [main.body(f"kill whole {i:02d}", max_tokens=LOAD_MAX_TOKENS) for i in range(requests // 2)]
        limits = httpx.Limits(max_connections=requests + 4, max_keepalive_connections=0)
        async with main.async_client(limits=limits, timeout=120) as client:
            from tests.reliability.load import stream_one

            async def whole_one(body, i):
                response = await client.post("/v1/chat/completions", json=body)
                return i, response.status_code, response.json(), dict(response.headers)

            tasks = [asyncio.create_task(stream_one(client, b, i)) for i, b in enumerate(streamed)]
            tasks += [asyncio.create_task(whole_one(b, i)) for i, b in enumerate(whole)]
            # Wait until both replicas run requests, then kill the busier one.
            deadline = time.monotonic() + 30
            while True:
                await asyncio.sleep(0.3)
                running = {  # a replica that missed the stats deadline is no evidence either way
                    r["replica"]: r.get("num_running", 0)
                    for r in await asyncio.to_thread(lambda: main.stats()["llm"])
                    if "error" not in r
                }
                if sum(v > 0 for v in running.values()) == LLM_REPLICAS or time.monotonic() > deadline:
                    break
            victim = max(running, key=running.get)
            ray.kill(replicas[victim], no_restart=True)
            return victim, running, await asyncio.gather(*tasks)

    victim, running, outcomes = asyncio.run(load_and_kill())
    assert running[victim] > 0
    stream_results, whole_results = outcomes[: requests // 2], outcomes[requests // 2 :]
    # Non-streamed requests see nothing before the end: the ingress ran the victim's again elsewhere.
    for i, status, body, _ in whole_results:
        assert status == 200, body
        assert f"kill whole {i:02d}" in body["choices"][0]["message"]["content"]
    # Streams that had tokens from the victim end with a clear error event; the others finish.
    failed = [r for r in stream_results if r.error is not None]
    for r in stream_results:
        assert r.answered, r
        if r.error is None:
            assert r.done and r.finish_reason == "stop" and f"kill stream {r.index:02d}" in r.text
        else:
            assert r.status == 200 and r.done and r.error["code"] == "replica_failed", r.error
            assert "retry the request" in r.error["message"] and "Traceback" not in r.error["message"]
    # New requests succeed on the survivor while Serve restarts the victim.
    with main.client() as client:
        for i in range(4):
            response = client.post("/v1/chat/completions", json=main.body(f"after kill {i}"))
            assert response.status_code == 200, response.text
    deadline = time.monotonic() + 90
    while True:
        now = replica_actors("zipvl", "LLMServer")
        if len(now) == LLM_REPLICAS and victim not in now and main.healthy():
            stats = main.stats()
            if len([r for r in stats["llm"] if "error" not in r]) == LLM_REPLICAS:
                break
        assert time.monotonic() < deadline, f"Serve did not replace the killed replica: {list(now)}"
        time.sleep(1.0)
    # The router in the ingress holds nothing for the dead replica any more.
    router = stats["router"]
    assert victim not in router["held_bytes"]
    # (How they went is a race: dropped when Serve removed the replica, or released first by the failed
    # attempts' results, whose done-callbacks fire as the actor dies; `dropped_dead` counts only the former,
    # and asserting it failed once on a loaded machine. The test above is the invariant: none is left.)
    main.wait_llm_idle()
    record_figures(
        "replica_killed",
        {
            "requests_in_flight": requests,
            "non_streamed_ok_after_retry": sum(s == 200 for _, s, _, _ in whole_results),
            "streams_finished": sum(r.error is None for r in stream_results),
            "streams_failed_with_replica_failed": len(failed),
            "victim_running_at_kill": running[victim],
            "router_holds_dropped_dead": router["counters"]["dropped_dead"],
        },
    )
