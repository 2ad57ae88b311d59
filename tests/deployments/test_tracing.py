"""Traces and request-scoped logs of the Serve application on a real local Ray cluster, real tiny model.

Tracing is switched on the way an operator does it: ``RAY_SERVE_TRACING_*`` in the environment of
every Ray process (the HTTP proxy reads nothing else) and ``args.telemetry`` for the replicas. Spans
go to the ``file`` exporter of :mod:`zipvl_ray.telemetry` (the SDK's span JSON, one file per process),
which the test reads back: the proxy's, the ingress's, the vision replica's and the LLM replica's spans
of one request must form one trace with the right parent links and the ZipVL attributes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import httpx
import pytest

from tests.api.helpers import image_data_url
from tests.deployments.conftest import free_port, ray_test_env
from zipvl_ray import telemetry
from zipvl_ray.api.middleware import PROXY_CALLBACK_IMPORT_PATH, is_well_formed_request_id

pytestmark = pytest.mark.ray

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN_ID}-01"
REQUEST_ID = "trace-test-0001"

INGRESS_SPANS = {
    "zipvl.ingress.preprocess",
    "zipvl.ingress.image_decode",
    "zipvl.ingress.image_preprocess",
    "zipvl.ingress.chat_template",
    "zipvl.ingress.tokenize",
    "zipvl.ingress.generate",
}
#: Spans that carry the request id attribute (searchable by it in a trace store).
TAGGED_SPANS = {"zipvl.ingress.preprocess", "zipvl.ingress.generate", "zipvl.llm.generate"}
PROXY_SPAN = "proxy_http_request OpenAIIngress POST /v1/chat/completions"
STAGE_SPANS = INGRESS_SPANS | {
    "zipvl.vision.encode",
    "zipvl.llm.generate",
    "zipvl.llm.queue",
    "zipvl.llm.prefill",
    "zipvl.llm.decode",
}


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import AppArgs, build_app

    span_dir = tmp_path_factory.mktemp("spans")
    # The proxy is started by Serve, not by the application: it sees only the environment of the
    # processes Ray starts, which inherit this one.
    node_env = ray_test_env(
        **{
            telemetry.SERVE_EXPORTER_ENV: telemetry.EXPORTER_IMPORT_PATH,
            telemetry.SERVE_SAMPLING_ENV: "1.0",
            telemetry.EXPORTER_ENV: "file",
            telemetry.FILE_DIR_ENV: str(span_dir),
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK_IMPORT_PATH,
        }
    )
    with pytest.MonkeyPatch.context() as patch:
        for key, value in node_env.items():
            patch.setenv(key, value)
        ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": node_env})
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            args = AppArgs.model_validate(
                {
                    "model": "tiny-llava",
                    "dtype": "float32",
                    "device": "cpu",
                    "engine": {"kv_cache_bytes": 8 * 1024 * 1024, "max_model_len": 1024},
                    "zipvl": {"tau": 0.9},
                    "default_max_tokens": 8,
                    "ingress": {"num_cpus": 0},
                    "vision": {"num_cpus": 0},
                    "llm": {"num_cpus": 0},
                    "telemetry": {
                        "tracing": True,
                        "exporter": "file",
                        "sampling_ratio": 1.0,
                        "file_dir": str(span_dir),
                    },
                }
            )
            serve.run(build_app(args), name="zipvl", route_prefix="/")
            logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
            yield {"url": f"http://127.0.0.1:{port}", "span_dir": span_dir, "logs_dir": logs_dir}
        finally:
            serve.shutdown()
            ray.shutdown()


def _body(stream: bool = False) -> dict:
    return {
        "model": "tiny-llava",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_data_url(5)}},
                    {"type": "text", "text": "What is in the picture?"},
                ],
            }
        ],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _spans_of(span_dir: Path, trace_id: str, expected: set[str], timeout_s: float = 20.0) -> list[dict]:
    """The spans of one trace, once every ``expected`` name is there (the LLM's are written after the reply)."""
    deadline = time.monotonic() + timeout_s
    while True:
        spans = [
            s for s in telemetry.read_span_files(span_dir) if s["context"]["trace_id"] == f"0x{trace_id}"
        ]
        if expected <= {s["name"] for s in spans} or time.monotonic() > deadline:
            return spans
        time.sleep(0.2)


def _by_name(spans: list[dict]) -> dict[str, dict]:
    return {s["name"]: s for s in spans}


def _ancestors(span: dict, by_id: dict[str, dict]) -> list[str]:
    names = []
    while span["parent_id"] in by_id:
        span = by_id[span["parent_id"]]
        names.append(span["name"])
    return names


def _ns(timestamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@pytest.fixture(scope="module")
def traced_request(service):
    response = httpx.post(
        f"{service['url']}/v1/chat/completions",
        json=_body(),
        headers={"traceparent": TRACEPARENT, "x-request-id": REQUEST_ID},
        timeout=120,
    )
    assert response.status_code == 200, response.text
    spans = _spans_of(service["span_dir"], TRACE_ID, STAGE_SPANS | {PROXY_SPAN})
    return response, spans


def test_one_request_is_one_trace_under_the_incoming_traceparent(traced_request):
    response, spans = traced_request
    names = {s["name"] for s in spans}
    assert names >= STAGE_SPANS, f"missing {STAGE_SPANS - names}"
    # The trace starts at the proxy, as a child of the caller's span.
    roots = [s for s in spans if s["parent_id"] == f"0x{CLIENT_SPAN_ID}"]
    assert [s["name"] for s in roots] == [PROXY_SPAN]
    by_id = {s["context"]["span_id"]: s for s in spans}
    orphans = [s["name"] for s in spans if s["parent_id"] not in by_id and s not in roots]
    assert orphans == []
    assert {s["resource"]["attributes"]["service.name"] for s in spans} == {"zipvl-ray"}
    assert response.headers["x-request-id"] == REQUEST_ID
    tagged = {
        s["name"]: s["attributes"][telemetry.ATTR_REQUEST_ID]
        for s in spans
        if telemetry.ATTR_REQUEST_ID in s["attributes"]
    }
    assert set(tagged) >= TAGGED_SPANS
    assert set(tagged.values()) == {REQUEST_ID}


def test_parent_links_follow_the_stages(traced_request):
    _, spans = traced_request
    by_id = {s["context"]["span_id"]: s for s in spans}
    named = _by_name(spans)
    preprocess = named["zipvl.ingress.preprocess"]
    for child in ("zipvl.ingress.image_decode", "zipvl.ingress.chat_template", "zipvl.ingress.tokenize"):
        assert by_id[named[child]["parent_id"]]["name"] == "zipvl.ingress.preprocess", child
    assert by_id[named["zipvl.ingress.image_preprocess"]["parent_id"]]["name"] == "zipvl.ingress.preprocess"
    assert "replica_handle_request OpenAIIngress __call__" in _ancestors(preprocess, by_id)
    # Vision and LLM work hangs under the ingress's generate span, through Serve's handle-call spans.
    for stage in ("zipvl.vision.encode", "zipvl.llm.generate"):
        chain = _ancestors(named[stage], by_id)
        assert "zipvl.ingress.generate" in chain, (stage, chain)
        assert chain[0].startswith("replica_handle_request"), (stage, chain)
    for stage in ("zipvl.llm.queue", "zipvl.llm.prefill", "zipvl.llm.decode"):
        assert named[stage]["parent_id"] == named["zipvl.llm.generate"]["context"]["span_id"], stage
    # Built from the engine's timestamps: queue, then prefill, then decode, inside the request's span.
    queue, prefill, decode = (named[f"zipvl.llm.{n}"] for n in ("queue", "prefill", "decode"))
    assert _ns(queue["end_time"]) <= _ns(prefill["start_time"]) + 1e-6
    assert _ns(prefill["end_time"]) <= _ns(decode["start_time"]) + 1e-6
    assert prefill["attributes"]["zipvl.timing_source"] == "engine"


def test_prefill_and_decode_spans_carry_the_zipvl_figures(traced_request):
    response, spans = traced_request
    body = response.json()
    named = _by_name(spans)
    prefill = named["zipvl.llm.prefill"]["attributes"]
    assert prefill["zipvl.prompt_tokens"] == body["usage"]["prompt_tokens"]
    assert prefill["zipvl.image_tokens"] == body["zipvl"]["image_tokens"] > 0
    ratios = prefill["zipvl.kept_ratio.per_layer"]
    assert ratios == pytest.approx(body["zipvl"]["kept_ratio_per_layer"], rel=1e-6)
    assert prefill["zipvl.kept_ratio.min"] == min(ratios) <= prefill["zipvl.kept_ratio.mean"] <= max(ratios)
    assert prefill["zipvl.kept_ratio.max"] == max(ratios) and max(ratios) <= 1
    assert min(ratios) < 1, "tau 0.9 keeps fewer tokens than dense in some layer"
    flops_saved = 1 - sum(r * r for r in ratios) / len(ratios)
    assert math.isclose(prefill["zipvl.attention_flops_saved"], flops_saved, rel_tol=1e-6)
    assert 0 < prefill["zipvl.kv_bytes"] < prefill["zipvl.kv_bytes_dense"]
    decode = named["zipvl.llm.decode"]["attributes"]
    assert decode["zipvl.output_tokens"] == body["usage"]["completion_tokens"] == 6
    assert decode["zipvl.time_per_output_token_s"] > 0
    assert decode["zipvl.kv_bytes"] == body["zipvl"]["kv_bytes"] < decode["zipvl.kv_bytes_dense"]
    encode = named["zipvl.vision.encode"]["attributes"]
    assert encode["zipvl.images"] == 1
    assert encode["zipvl.encoder_cache.hits"] + encode["zipvl.encoder_cache.misses"] == 1
    assert (
        named["zipvl.ingress.preprocess"]["attributes"]["zipvl.prompt_tokens"]
        == prefill["zipvl.prompt_tokens"]
    )


def test_a_request_without_traceparent_gets_its_own_single_trace(service, traced_request):
    # Same image (an encoder cache hit), streamed, and a malformed x-request-id.
    with httpx.stream(
        "POST",
        f"{service['url']}/v1/chat/completions",
        json=_body(stream=True),
        headers={"x-request-id": "not a well formed id!"},
        timeout=120,
    ) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        request_id = response.headers["x-request-id"]
    assert events[-1] == "data: [DONE]"
    assert is_well_formed_request_id(request_id) and request_id != "not a well formed id!"
    deadline = time.monotonic() + 20
    while True:
        mine = [
            s
            for s in telemetry.read_span_files(service["span_dir"])
            if s["attributes"].get(telemetry.ATTR_REQUEST_ID) == request_id
        ]
        if {s["name"] for s in mine} >= TAGGED_SPANS or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    trace_ids = {s["context"]["trace_id"] for s in mine}
    assert len(trace_ids) == 1 and trace_ids != {f"0x{TRACE_ID}"}
    (trace_id,) = trace_ids
    whole = _spans_of(service["span_dir"], trace_id[2:], STAGE_SPANS | {PROXY_SPAN})
    roots = [s for s in whole if s["parent_id"] is None]
    assert [s["name"] for s in roots] == [PROXY_SPAN]
    encode = _by_name(whole)["zipvl.vision.encode"]["attributes"]
    assert (encode["zipvl.encoder_cache.hits"], encode["zipvl.encoder_cache.misses"]) == (1, 0)


def test_every_stage_logs_the_request_id(service, traced_request):
    expected = {
        "OpenAIIngress": "chat completion chatcmpl-",
        "VisionEncoder": "encoded 1 images",
        "LLMServer": "finished (length)",
    }
    found = {}
    deadline = time.monotonic() + 10
    while set(found) != set(expected) and time.monotonic() < deadline:
        for deployment, message in expected.items():
            for path in service["logs_dir"].glob(f"replica_zipvl_{deployment}_*.log"):
                lines = [line for line in path.read_text().splitlines() if message in line]
                if lines:
                    found[deployment] = lines
        time.sleep(0.2)
    assert set(found) == set(expected)
    for deployment, lines in found.items():
        assert any(REQUEST_ID in line for line in lines), (deployment, lines)
        assert all(" -- " in line for line in lines)  # Serve's replica format: ... <request id> -- message
