"""End to end: ``serve run configs/zipvl.yaml`` in a subprocess, the real engine and encoder, real HTTP.

This is the command ``make serve`` runs and the README documents, in the environment the Makefile gives
it (the proxy callback, and ``SERVE_ENV``: Serve's direct ingress, so the ingress replica also serves the
API on its own port). The config is copied with only the HTTP port changed (a free one: other clusters
may hold 8000), the direct-ingress port range is moved to free ports as well, and ``RAY_ADDRESS=local``
makes ``serve run`` start its own cluster instead of joining one another process started.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api import service_checks as checks
from tests.api.helpers import image_data_url
from tests.deployments.conftest import REPO_ROOT, free_port, free_ports, ray_test_env

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STARTUP_TIMEOUT_S = 240
#: ``(status, content type)`` of each non-200 answer to ``/health`` while the application deployed.
STARTUP_ERRORS: list[tuple[int, str]] = []
#: The ingress replica's own HTTP port (direct ingress), found in the log once the service is up.
DIRECT_PORT: list[int] = []


def _make_echo(expression: str, env: dict[str, str] | None = None) -> str:
    """What ``make`` prints for ``echo <expression>`` in this repository's Makefile."""
    out = subprocess.run(
        ["make", "--no-print-directory", "--eval", f"_print: ; @echo {expression}", "_print"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return out.stdout.strip()


def makefile_export(name: str) -> str:
    """The value the Makefile exports to ``make serve`` for the environment variable ``name``."""
    return _make_echo(f"$${name}", env={k: v for k, v in os.environ.items() if k != name})


def makefile_variable(name: str) -> str:
    """The value of the Makefile variable ``name`` (exported or not)."""
    return _make_echo(f"$({name})")


def serve_env() -> dict[str, str]:
    """``SERVE_ENV``, the variables the Makefile sets for ``make serve`` alone, as a dict."""
    return dict(item.split("=", 1) for item in makefile_variable("SERVE_ENV").split())


def _require_real_stack() -> None:
    engine = pytest.importorskip(
        "zipvl_ray.engine", reason="the paged engine (zipvl_ray/engine) is not there yet"
    )
    if not hasattr(engine, "AsyncLLMEngine"):
        pytest.skip("zipvl_ray.engine has no AsyncLLMEngine yet")
    pytest.importorskip(
        "zipvl_ray.vision", reason="the vision encoder (zipvl_ray/vision.py) is not there yet"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    _require_real_stack()
    config = yaml.safe_load((REPO_ROOT / "configs" / "zipvl.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    path = Path(tmp_path_factory.mktemp("serve")) / "zipvl.yaml"
    path.write_text(yaml.safe_dump(config))
    log = (path.parent / "serve.log").open("w")
    env = {**os.environ, **ray_test_env(), "RAY_ADDRESS": "local"}
    # As `make serve` runs it: with the proxy callback that answers the proxy's own errors in JSON.
    callback = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
    env[callback] = makefile_export(callback)
    env.update(serve_env())
    if env.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1":  # its ports: free ones, not 8001-8099
        direct = free_ports(4)
        env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"] = str(min(direct))
        env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"] = str(max(direct))
    serve_bin = Path(sys.executable).parent / "serve"
    process = subprocess.Popen(
        [str(serve_bin), "run", str(path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        # A shell's background job inherits SIGINT ignored, and Python keeps it so: the SIGINT that stops
        # `serve run` below would go unheard and cost the teardown its whole 60 s wait.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            assert process.poll() is None, (
                f"serve run exited:\n{(path.parent / 'serve.log').read_text()[-4000:]}"
            )
            try:
                answer = httpx.get(f"{base}/health", timeout=5)
                if answer.status_code == 200:
                    # Ours, not another server that took the port (Ray's Prometheus servers answer any GET).
                    assert answer.headers.get("content-type", "").startswith("application/json") and (
                        answer.json().get("status") == "ok"
                    ), f"port {port} is answered by another server: {answer.text[:200]!r}"
                    break
                STARTUP_ERRORS.append((answer.status_code, answer.headers.get("content-type", "")))
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (
                f"not healthy in time:\n{(path.parent / 'serve.log').read_text()[-4000:]}"
            )
            time.sleep(1)
        found = re.findall(r"Started HTTP server on port (\d+)", (path.parent / "serve.log").read_text())
        DIRECT_PORT[:] = [int(port) for port in found[-1:]]
        args = config["applications"][0]["args"]
        from zipvl_ray.api.images import ImageLimits

        yield checks.Target(
            base_url=base,
            model=args["model"],
            max_model_len=args["engine"]["max_model_len"],
            limits=ImageLimits.model_validate(args["images"]),
            fake=False,
            timeout_s=180,
        )
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def direct(served):
    """The same service through the ingress replica's own port (Serve's direct ingress, no proxy hop)."""
    if serve_env().get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        pytest.skip("the Makefile does not turn on direct ingress for make serve")
    assert DIRECT_PORT, "the ingress replica did not log its direct-ingress HTTP port"
    return dataclasses.replace(served, base_url=f"http://127.0.0.1:{DIRECT_PORT[0]}")


def test_health_and_models(served):
    checks.check_models_and_health(served)


def test_direct_ingress_port_serves_the_same_api(served, direct):
    """``make serve``'s second port: health, models, a chat with an image, the bad-request matrix (the same
    OpenAI errors: the replica's server runs the proxy callback's middlewares too), and the same greedy
    answer as through the proxy."""
    checks.check_models_and_health(direct)
    checks.check_chat_with_image(direct)
    checks.check_bad_requests(direct)
    body = served.body("What is in the picture?", [image_data_url(77)], max_tokens=6)
    assert checks.content(checks.chat(direct, body)) == checks.content(checks.chat(served, body))


def test_direct_ingress_streams_and_frees_kv_on_disconnect(direct):
    checks.check_stream_matches_non_stream(direct)
    checks.check_disconnect_frees_kv(direct, max_tokens=3000, stream=True)


def test_the_proxy_answers_in_openai_json_while_the_application_deploys(served):
    """``make serve`` installs the proxy callback: before the application is up, Serve's proxy answers
    404 / 503 by itself, and an OpenAI client must get JSON errors, not plain text."""
    if not STARTUP_ERRORS:
        pytest.skip("the application was up before the proxy answered anything else")
    assert all(content_type.startswith("application/json") for _, content_type in STARTUP_ERRORS), (
        STARTUP_ERRORS
    )


def test_chat_completion_with_an_image(served):
    checks.check_chat_with_image(served)


def test_openai_client_streaming_and_not(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(31)}},
                {"type": "text", "text": "What do you see?"},
            ],
        }
    ]
    common = dict(model=served.model, messages=messages, max_tokens=10, temperature=0.7, seed=3)
    extra = {"ignore_eos": True, "zipvl": {"tau": 0.95}}
    whole = client.chat.completions.create(**common, extra_body=extra)
    assert whole.usage.completion_tokens == 10 and whole.choices[0].finish_reason == "length"
    assert 0 < whole.model_extra["zipvl"]["mean_kept_ratio"] <= 1
    chunks = list(
        client.chat.completions.create(
            **common, extra_body=extra, stream=True, stream_options={"include_usage": True}
        )
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        == whole.choices[0].message.content
    )
    assert chunks[-1].usage.completion_tokens == 10


def test_stream_matches_non_stream_for_a_fixed_seed(served):
    checks.check_stream_matches_non_stream(served)


def test_concurrent_requests(served):
    checks.check_concurrent_requests(served, n=16)


def test_encoder_cache_hit_keeps_the_answer(served):
    checks.check_encoder_cache_hit(served)


@pytest.mark.parametrize("stream", [True, False])
def test_disconnect_returns_kv_to_baseline(served, stream):
    checks.check_disconnect_frees_kv(served, max_tokens=3000, stream=stream)


def test_tau_one_equals_dense(served):
    checks.check_tau_one_is_dense(served)


def test_bad_requests_and_still_healthy(served):
    checks.check_bad_requests(served)


def test_default_model_answers_a_held_out_question(served):
    """``configs/zipvl.yaml`` serves the trained zipvl-tiny: a held-out picture question (a data-URL
    image) answered correctly over HTTP with its served ZipVL setting (tau = 0.975, max_keep_ratio 0.6)."""
    from tests.test_zipvl_tiny import CORRECT, held_out_chat
    from zipvl_ray.data import make_sample

    if served.model != "zipvl-tiny":
        pytest.skip(f"configs/zipvl.yaml serves {served.model}")
    split, index = CORRECT
    sample = make_sample(split, "test", index)
    body = {
        "model": served.model,
        "messages": held_out_chat(sample),
        "max_tokens": 8,
        "temperature": 0,
        "zipvl": {"tau": 0.975},
    }
    response = httpx.post(f"{served.base_url}/v1/chat/completions", json=body, timeout=served.timeout_s)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"].strip() == sample.answer
