"""The Serve application on a real local Ray cluster over real HTTP, with the fake engine and encoder injected.

One cluster for the module: the ingress, the vision stage and two LLM replicas, all with
``num_cpus: 0`` so they fit two cores. The same HTTP checks as the in-process app run here
(``tests/api/service_checks.py``), plus the official ``openai`` client and per-replica stats.
"""

from __future__ import annotations

import os

import pytest

from tests.api import service_checks as checks
from tests.api.helpers import image_data_url
from tests.deployments.conftest import free_port, ray_test_env
from tests.deployments.fakes import TOKEN_DELAY_ENV

pytestmark = pytest.mark.ray

MAX_MODEL_LEN = 512
LLM_REPLICAS = 2


@pytest.fixture(scope="module")
def target():
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.app import AppArgs, build_app

    env = ray_test_env(**{TOKEN_DELAY_ENV: "0.01"})
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": env})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = AppArgs.model_validate(
            {
                "model": "tiny-llava",
                "engine": {"max_model_len": MAX_MODEL_LEN},
                "images": {"max_images": 4, "max_image_bytes": 100_000, "max_image_pixels": 65_536},
                "default_max_tokens": 64,
                "engine_class": "tests.deployments.fakes:FakeEngine",
                "encoder_class": "tests.deployments.fakes:FakeVisionEncoder",
                "ingress": {"num_cpus": 0, "max_ongoing_requests": 64},
                "vision": {"num_cpus": 0, "max_batch_size": 16, "batch_wait_timeout_s": 0.02},
                "llm": {"num_cpus": 0, "num_replicas": LLM_REPLICAS, "max_ongoing_requests": 32},
            }
        )
        serve.run(build_app(args), name="zipvl", route_prefix="/")
        yield checks.Target(
            base_url=f"http://127.0.0.1:{port}",
            model="tiny-llava",
            max_model_len=MAX_MODEL_LEN,
            limits=args.images,
            fake=True,
            timeout_s=60,
        )
    finally:
        serve.shutdown()
        ray.shutdown()


def test_models_and_health(target):
    checks.check_models_and_health(target)


def test_chat_with_image(target):
    body = checks.check_chat_with_image(target)
    assert body["choices"][0]["message"]["content"].startswith("echo:")


def test_stream_matches_non_stream(target):
    checks.check_stream_matches_non_stream(target)


def test_concurrent_requests_get_their_own_answers(target):
    checks.check_concurrent_requests(target, n=16)


def test_encoder_cache_hit(target):
    checks.check_encoder_cache_hit(target)


def test_tau_one_is_dense(target):
    checks.check_tau_one_is_dense(target)


def test_disconnect_mid_stream_aborts_in_the_llm_stage(target):
    checks.check_disconnect_frees_kv(target, max_tokens=300)


def test_disconnect_before_a_non_streamed_answer_aborts_in_the_llm_stage(target):
    """Serve's proxy cancels the request when its client leaves; the cancellation reaches the LLM stage."""
    checks.check_disconnect_frees_kv(target, max_tokens=300, stream=False)


def test_bad_requests_get_openai_errors_and_the_service_stays_healthy(target):
    checks.check_bad_requests(target)


def test_openai_client_streaming_and_not(target):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{target.base_url}/v1", api_key="unused", max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(21)}},
                {"type": "text", "text": "openai client"},
            ],
        }
    ]
    whole = client.chat.completions.create(
        model=target.model,
        messages=messages,
        max_tokens=120,
        temperature=0,
        extra_body={"zipvl": {"tau": 0.9}},
    )
    text = whole.choices[0].message.content
    assert "tau:0.9" in text and whole.usage.completion_tokens == len(text)
    assert whole.model_extra["zipvl"]["kv_bytes"] > 0
    stream = client.chat.completions.create(
        model=target.model,
        messages=messages,
        max_tokens=120,
        temperature=0,
        extra_body={"zipvl": {"tau": 0.9}},
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens
    with pytest.raises(openai.BadRequestError, match="zipvl.tau"):
        client.chat.completions.create(
            model=target.model, messages=messages, extra_body={"zipvl": {"tau": 2}}
        )


def test_vision_stage_batches_concurrent_requests(target):
    from concurrent.futures import ThreadPoolExecutor

    bodies = [target.body(f"batch {i}", [image_data_url(500 + i)]) for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        assert all(r.status_code == 200 for r in pool.map(lambda b: checks.chat(target, b), bodies))
    (vision,) = checks.answered_stats(target, "vision")
    assert vision["max_batch_requests"] > 1 and vision["batches"] < vision["requests"]


def test_stats_cover_every_llm_replica(target):
    for i in range(6):  # spread some requests
        checks.content(checks.chat(target, target.body(f"spread {i}")))
    replicas = checks.answered_stats(target, "llm")
    assert len(replicas) == LLM_REPLICAS
    assert len({r["replica"] for r in replicas}) == LLM_REPLICAS
    for replica in replicas:
        assert {"kv_bytes_used", "kv_bytes_capacity", "num_running", "stats_timestamp"} <= set(replica)
    assert sum(r["num_finished"] for r in replicas) >= 6
    (vision,) = checks.answered_stats(target, "vision")
    assert vision["batches"] >= 1 and vision["images"] >= 1
