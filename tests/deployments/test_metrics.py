"""The ``zipvl_*`` metrics, scraped from Ray's Prometheus endpoint after real requests on a local cluster.

Fake engine and encoder (``tests/deployments/fakes.py``; the engine wrapped to report the real engine's
timestamps), two LLM replicas behind the ``KVPackingRouter`` (so router counters exist), Ray's metrics
export port on a free port, a 0.5 s report interval. Every metric of :data:`zipvl_ray.telemetry.METRICS`
must be exported with values that fit the requests sent; KV bytes in use must be back to zero when
the requests are over.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.api.helpers import image_data_url
from tests.deployments.conftest import free_port, ray_test_env
from tests.deployments.fakes import CAPACITY_BYTES, NUM_LAYERS, TOKEN_DELAY_ENV, FakeEngine
from zipvl_ray import telemetry

pytestmark = pytest.mark.ray

LLM_REPLICAS = 2
OK_REQUESTS = 6  # non-streamed + streamed chat completions that finish
#: Calls the KV router packs: the finished requests and the aborted one (the 400 never reaches the LLM
#: stage; GET /health's ping goes through the handle but bypasses packing: kv_routed_methods).
LLM_CALLS = OK_REQUESTS + 1
IMAGES = [image_data_url(31), image_data_url(32), image_data_url(31)]  # the third is a cache hit


class TimestampedFakeEngine(FakeEngine):
    """The fake engine, plus what the real engine writes into ``RequestMetrics``: wall-clock stage
    timestamps, queue time, time to first token and decode time."""

    async def generate(self, request_id, prompt, sampling=None, zipvl=None):
        arrival = time.time_ns()
        async for output in super().generate(request_id, prompt, sampling, zipvl):
            m = output.metrics
            now = time.time_ns()
            if not m.arrival_ns:
                m.arrival_ns, m.prefill_start_ns, m.first_token_ns = arrival, arrival + 1000, now
                m.queue_time_s = 1e-6
                m.ttft_s = (now - arrival) / 1e9
            if output.finished:
                m.finish_ns = now
                m.decode_time_s = (now - m.first_token_ns) / 1e9
            yield output


@pytest.fixture(scope="module")
def service():
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import AppArgs, build_app

    metrics_port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": ray_test_env(**{TOKEN_DELAY_ENV: "0.01"})},
        _metrics_export_port=metrics_port,
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs.model_validate(
            {
                "model": "tiny-llava",
                "engine": {"max_model_len": 512},
                "default_max_tokens": 16,
                "engine_class": "tests.deployments.test_metrics:TimestampedFakeEngine",
                "encoder_class": "tests.deployments.fakes:FakeVisionEncoder",
                "ingress": {"num_cpus": 0},
                "vision": {"num_cpus": 0, "max_batch_size": 4},
                "llm": {
                    "num_cpus": 0,
                    "num_replicas": LLM_REPLICAS,
                    "request_router_config": {
                        "request_router_class": "zipvl_ray.routing.router:KVPackingRouter",
                        "request_routing_stats_period_s": 0.5,
                    },
                },
                "telemetry": {"metrics_interval_s": 0.5},
            }
        )
        serve.run(build_app(args), name="zipvl", route_prefix="/")
        yield {"url": f"http://127.0.0.1:{port}", "metrics_url": f"http://127.0.0.1:{metrics_port}/metrics"}
    finally:
        serve.shutdown()
        ray.shutdown()


def _body(text: str, image: str | None = None, **extra) -> dict:
    content = [{"type": "text", "text": text}]
    if image is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {
        "model": "tiny-llava",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        **extra,
    }


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus exposition text -> sample name -> [(labels, value)] (the official parser)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def _total(samples, name: str, **labels: str) -> float:
    return sum(v for lab, v in samples.get(name, []) if all(lab.get(k) == want for k, want in labels.items()))


def _exported(samples, spec: telemetry.MetricSpec) -> bool:
    name = spec.prometheus_name
    return (name + "_count" if spec.kind == "histogram" else name) in samples


@pytest.fixture(scope="module")
def scraped(service):
    url = service["url"]
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/v1/models").status_code == 200
        for i, image in enumerate(IMAGES):
            assert (
                client.post(
                    "/v1/chat/completions", json=_body(f"picture {i}", image, max_tokens=12)
                ).status_code
                == 200
            )
        assert client.post("/v1/chat/completions", json=_body("text only", max_tokens=12)).status_code == 200
        for i in range(OK_REQUESTS - len(IMAGES) - 1):
            with client.stream(
                "POST", "/v1/chat/completions", json=_body(f"stream {i}", max_tokens=12, stream=True)
            ) as response:
                assert response.status_code == 200
                assert list(response.iter_lines())[-2] == "data: [DONE]"
        bad = client.post("/v1/chat/completions", json=_body("bad", zipvl={"tau": 1.5}))
        assert bad.status_code == 400
        # A client that leaves mid-stream: the LLM replica aborts the request.
        with client.stream(
            "POST",
            "/v1/chat/completions",
            json=_body("leave early", max_tokens=300, ignore_eos=True, stream=True),
        ) as response:
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 3:  # the role chunk and two tokens, then leave
                    break
    deadline = time.monotonic() + 60
    while True:
        samples = _samples(httpx.get(service["metrics_url"], timeout=10).text)
        settled = (
            all(_exported(samples, spec) for spec in telemetry.METRICS)
            and _total(samples, "ray_zipvl_time_to_first_token_seconds_count") >= OK_REQUESTS
            and _total(samples, "ray_zipvl_llm_requests_total", finish_reason="abort") >= 1
            # one scrape once showed 0 KV bytes but 1 running request on a replica (a snapshot taken
            # mid-step, or gauges exported at different moments): wait for the whole baseline
            and _total(samples, "ray_zipvl_kv_cache_used_bytes") == 0
            and _total(samples, "ray_zipvl_running_requests") == 0
            and _total(samples, "ray_zipvl_waiting_requests") == 0
            and _total(samples, "ray_zipvl_router_routed_total") >= LLM_CALLS
            and _total(samples, "ray_zipvl_router_held_kv_bytes") == 0
        )
        if settled or time.monotonic() > deadline:
            return samples
        time.sleep(0.5)


def test_every_documented_metric_is_exported(scraped):
    missing = [spec.prometheus_name for spec in telemetry.METRICS if not _exported(scraped, spec)]
    assert missing == []
    # Serve labels every series with its deployment and replica.
    deployments = {"ingress": "OpenAIIngress", "vision": "VisionEncoder", "llm": "LLMServer"}
    for spec in telemetry.METRICS:
        name = spec.prometheus_name + ("_count" if spec.kind == "histogram" else "")
        labels = [lab for lab, _ in scraped[name]]
        assert {lab["deployment"] for lab in labels} == {deployments[spec.stage]}, spec.name
        assert all(lab.get("replica") for lab in labels), spec.name


def test_request_counts_and_latencies(scraped):
    route = "/v1/chat/completions"
    assert _total(scraped, "ray_zipvl_http_requests_total", route=route, status_code="200") == OK_REQUESTS + 1
    assert _total(scraped, "ray_zipvl_http_requests_total", route=route, status_code="400") == 1
    assert _total(scraped, "ray_zipvl_http_requests_total", route="/health", status_code="200") >= 1
    assert _total(scraped, "ray_zipvl_e2e_request_latency_seconds_count", route=route) == OK_REQUESTS + 2
    assert 0 < _total(scraped, "ray_zipvl_e2e_request_latency_seconds_sum", route=route) < 120
    finished = _total(scraped, "ray_zipvl_llm_requests_total", finish_reason="length")
    assert finished == OK_REQUESTS
    assert _total(scraped, "ray_zipvl_llm_requests_total", finish_reason="abort") == 1
    # Every finish reason's series exists, at 0 for those that never happened (created at start).
    for reason in ("error", "refused", "stop"):
        assert "ray_zipvl_llm_requests_total" in scraped and any(
            lab.get("finish_reason") == reason for lab, _ in scraped["ray_zipvl_llm_requests_total"]
        ), reason
        assert _total(scraped, "ray_zipvl_llm_requests_total", finish_reason=reason) == 0
    assert _total(scraped, "ray_zipvl_time_to_first_token_seconds_count") == OK_REQUESTS
    ttft_mean = _total(scraped, "ray_zipvl_time_to_first_token_seconds_sum") / OK_REQUESTS
    assert 0.005 <= ttft_mean < 10  # at least one fake token delay (10 ms)
    assert _total(scraped, "ray_zipvl_time_per_output_token_seconds_count") == OK_REQUESTS
    tpot_mean = _total(scraped, "ray_zipvl_time_per_output_token_seconds_sum") / OK_REQUESTS
    assert 0.005 <= tpot_mean < 1
    assert _total(scraped, "ray_zipvl_queue_time_seconds_count") == OK_REQUESTS
    assert _total(scraped, "ray_zipvl_generation_tokens_total") == 12 * OK_REQUESTS
    assert _total(scraped, "ray_zipvl_prompt_tokens_total") > 0


def test_kv_and_zipvl_figures(scraped):
    # Back to baseline once the requests are over; capacity per replica as the engine reports it.
    assert [v for _, v in scraped["ray_zipvl_kv_cache_used_bytes"]] == [0.0] * LLM_REPLICAS
    assert [v for _, v in scraped["ray_zipvl_kv_cache_capacity_bytes"]] == [
        float(CAPACITY_BYTES)
    ] * LLM_REPLICAS
    assert [v for _, v in scraped["ray_zipvl_running_requests"]] == [0.0] * LLM_REPLICAS
    assert [v for _, v in scraped["ray_zipvl_waiting_requests"]] == [0.0] * LLM_REPLICAS
    assert _total(scraped, "ray_zipvl_kv_cache_saved_bytes") == 0
    assert _total(scraped, "ray_zipvl_kv_saved_bytes_total") > 0
    assert _total(scraped, "ray_zipvl_preemptions_total") == 0
    layers = {lab["layer"] for lab, _ in scraped["ray_zipvl_layer_kept_ratio"]}
    assert layers == {str(i) for i in range(NUM_LAYERS)}
    assert all(0 < v <= 1 for _, v in scraped["ray_zipvl_layer_kept_ratio"])
    kept = _total(scraped, "ray_zipvl_kept_tokens_ratio_sum") / _total(
        scraped, "ray_zipvl_kept_tokens_ratio_count"
    )
    assert 0 < kept < 1
    saved = _total(scraped, "ray_zipvl_attention_flops_saved_ratio_sum") / OK_REQUESTS
    assert 0 < saved < 1
    assert len(scraped["ray_zipvl_kv_prediction_error_ratio"]) == LLM_REPLICAS


def test_encoder_cache_and_router(scraped):
    assert _total(scraped, "ray_zipvl_encoder_cache_misses_total") == 2
    assert _total(scraped, "ray_zipvl_encoder_cache_hits_total") == 1
    assert _total(scraped, "ray_zipvl_encoder_cache_entries") == 2
    decisions = sum(
        _total(scraped, "ray_zipvl_router_decisions_total", outcome=o) for o in telemetry.ROUTER_OUTCOMES
    )
    assert decisions >= LLM_CALLS
    assert _total(scraped, "ray_zipvl_router_routed_total") == LLM_CALLS
    assert _total(scraped, "ray_zipvl_router_predicted_kv_bytes_total") > 0
    assert _total(scraped, "ray_zipvl_router_held_kv_bytes") == 0
