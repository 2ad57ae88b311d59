"""The CPU RayService's ``serveConfigV2`` deployed for real, the way KubeRay deploys it.

A local two-node Ray cluster mirrors the manifest's pods: a head with ``num-cpus: 0`` (and the head
container's environment, tracing included) plus one worker with the worker pod's CPUs. The rendered
``serveConfigV2`` (only the HTTP port changed: other clusters may hold 8000) is PUT to the head
dashboard's ``/api/serve/applications/``, which is what the KubeRay operator does; the dashboard
validates it (importing the app from the installed package) and Serve deploys it. Then the
application must reach RUNNING, the endpoints behind the manifest's probes must answer ``success``,
and a chat completion with an image must come back.
"""

from __future__ import annotations

import contextlib
import os
import re
import time

import httpx
import pytest
import yaml

from tests.api import service_checks as checks
from tests.deployments.conftest import REPO_ROOT, free_ports, ray_test_env
from zipvl_ray import k8s

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STARTUP_TIMEOUT_S = 300
#: How long one attempt waits for the head's dashboard before the cluster is started again on new ports.
DASHBOARD_TIMEOUT_S = 120
MANIFEST = REPO_ROOT / k8s.CPU_VARIANT.output


def _manifest() -> dict:
    return yaml.safe_load(MANIFEST.read_text())


def _containers(manifest: dict) -> tuple[dict, dict]:
    cluster = manifest["spec"]["rayClusterConfig"]
    (worker_group,) = cluster["workerGroupSpecs"]
    return (
        cluster["headGroupSpec"]["template"]["spec"]["containers"][0],
        worker_group["template"]["spec"]["containers"][0],
    )


def _wait_for(what: str, probe, timeout_s: float = STARTUP_TIMEOUT_S, period_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        try:
            result = probe()
            if result:
                return result
        except httpx.HTTPError as error:
            last = error
        time.sleep(period_s)
    raise AssertionError(f"{what}: not within {timeout_s} s (last error: {last})")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ports and URLs of a running local cluster with the rendered serveConfigV2 deployed."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    manifest = _manifest()
    head, worker = _containers(manifest)
    config = yaml.safe_load(manifest["spec"]["serveConfigV2"])

    container_env = {e["name"]: e["value"] for e in head["env"] if "value" in e}
    # No OTLP collector here: the same exporter function writes the spans to files instead.
    container_env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    spans = tmp_path_factory.mktemp("spans")
    container_env.update({"ZIPVL_TRACING_EXPORTER": "file", "ZIPVL_TRACING_FILE_DIR": str(spans)})
    # Like the pod: token authentication only if the manifest asks for it. A ``ray.init()`` earlier in this
    # process (other tests) sets RAY_AUTH_MODE=token in os.environ, and the dashboard would answer 401.
    container_env.setdefault("RAY_AUTH_MODE", "disabled")
    env = {**container_env, **ray_test_env()}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    head_params = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]

    def start() -> tuple[Cluster, dict[str, int], str]:
        ports = dict(zip(("serve", "dashboard", "agent"), free_ports(3), strict=True))
        local = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": int(head_params["num-cpus"]),
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": ports["dashboard"],
                "dashboard_agent_listen_port": ports["agent"],
            },
        )
        local.add_node(num_cpus=int(worker["resources"]["limits"]["cpu"]))
        return local, ports, f"http://127.0.0.1:{ports['dashboard']}"

    def dashboard_up(url: str) -> bool:
        answer = httpx.get(f"{url}/api/ray/version", timeout=5)
        if answer.status_code != 200:
            # Reported if it never comes up (e.g. another process took the port before the dashboard).
            raise httpx.HTTPError(f"GET /api/ray/version: {answer.status_code} {answer.text[:200]!r}")
        return True

    # The ports are free when picked, but the cluster's own processes pick random ports too while it
    # starts; a dashboard that never answers gets one fresh cluster on fresh ports.
    local, ports, dashboard = start()
    try:
        _wait_for("dashboard", lambda: dashboard_up(dashboard), timeout_s=DASHBOARD_TIMEOUT_S)
    except AssertionError:
        local.shutdown()
        local, ports, dashboard = start()
    config["http_options"]["port"] = ports["serve"]
    try:
        _wait_for("dashboard", lambda: dashboard_up(dashboard), timeout_s=DASHBOARD_TIMEOUT_S)

        def deployed() -> bool:
            # The operator retries a failed PUT on its next reconcile; so does this (e.g. Serve's proxy
            # failing its readiness check on a busy machine fails the first PUT with a 500).
            put = httpx.put(f"{dashboard}/api/serve/applications/", json=config, timeout=120)
            if put.status_code != 200:
                time.sleep(5)
                raise httpx.HTTPError(f"PUT /api/serve/applications/: {put.status_code} {put.text[-300:]!r}")
            return True

        _wait_for("serveConfigV2 accepted", deployed)

        def running():
            status = httpx.get(f"{dashboard}/api/serve/applications/", timeout=10).json()
            app = (status.get("applications") or {}).get("zipvl") or {}
            assert app.get("status") != "DEPLOY_FAILED", app.get("message")
            return app if app.get("status") == "RUNNING" else None

        app = _wait_for("application RUNNING", running)
        yield {
            "ports": ports,
            "dashboard": dashboard,
            "app": app,
            "config": config,
            "manifest": manifest,
            "spans": spans,
            "head_node_id": local.head_node.node_id,
        }
    finally:
        with contextlib.suppress(httpx.HTTPError):
            httpx.delete(f"{dashboard}/api/serve/applications/", timeout=60)  # serve.shutdown()
        local.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def target(cluster) -> checks.Target:
    from zipvl_ray.api.images import ImageLimits

    args = cluster["config"]["applications"][0]["args"]
    base = f"http://127.0.0.1:{cluster['ports']['serve']}"
    _wait_for("GET /health", lambda: httpx.get(f"{base}/health", timeout=5).status_code == 200, timeout_s=120)
    return checks.Target(
        base_url=base,
        model=args.get("served_model_name") or args["model"],
        max_model_len=args["engine"]["max_model_len"],
        limits=ImageLimits.model_validate(args["images"]),
        fake=False,
        timeout_s=180,
    )


def test_application_runs_with_every_deployment_healthy(cluster):
    deployments = cluster["app"]["deployments"]
    assert set(deployments) == {"OpenAIIngress", "VisionEncoder", "LLMServer"}
    assert {d["status"] for d in deployments.values()} == {"HEALTHY"}


def test_no_replica_runs_on_the_head(cluster):
    """The head starts with ``num-cpus 0``; replicas that ask for some CPU cannot be placed there (with 0
    CPUs they could, and would share the head's CPU and memory with the GCS and the controller)."""
    from ray.util.state import list_actors

    actors = list_actors(address=cluster["dashboard"], filters=[("state", "=", "ALIVE")], limit=1000)
    replicas = [a for a in actors if a.class_name.startswith("ServeReplica:zipvl:")]
    assert len(replicas) == 3
    assert all(a.node_id != cluster["head_node_id"] for a in replicas), [
        (a.class_name, a.node_id) for a in replicas
    ]


def test_probe_endpoints_answer_success(cluster):
    head, worker = _containers(cluster["manifest"])
    serve_port = {p["name"]: p["containerPort"] for p in head["ports"]}["serve"]
    # The manifest's probe commands, with the ports this local cluster uses instead of the pod's.
    local_port = {
        k8s.DASHBOARD_PORT: cluster["ports"]["dashboard"],
        k8s.DASHBOARD_AGENT_PORT: cluster["ports"]["agent"],
        serve_port: cluster["ports"]["serve"],
    }
    commands = [
        head["readinessProbe"]["exec"]["command"][-1],
        head["livenessProbe"]["exec"]["command"][-1],
        worker["livenessProbe"]["exec"]["command"][-1],
    ]
    urls = {
        (int(port), path) for c in commands for port, path in re.findall(r"http://localhost:(\d+)(/\S*)", c)
    }
    assert len(urls) == 2  # raylet (through the dashboard agent) and GCS (through the dashboard)
    urls.add((serve_port, "/-/healthz"))  # what a worker's readiness adds when proxies run on every node
    for port, path in sorted(urls):
        response = httpx.get(f"http://127.0.0.1:{local_port[port]}{path}", timeout=10)
        assert response.status_code == 200 and "success" in response.text, (port, path, response.text)


def test_health_and_models(target):
    checks.check_models_and_health(target)


def test_chat_completion_with_an_image(target):
    body = checks.check_chat_with_image(target)
    assert body["model"] == target.model


def test_the_tracing_env_reaches_serve(cluster, target):
    # A sampled incoming traceparent is kept whatever the sampling ratio: the proxy and the ingress
    # replica must export its spans through the exporter function the manifest's env names.
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    headers = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    assert httpx.get(f"{target.base_url}/v1/models", headers=headers, timeout=30).status_code == 200

    def exported() -> bool:
        return any(trace_id in file.read_text() for file in cluster["spans"].glob("*.jsonl"))

    _wait_for(f"spans of trace {trace_id} under {cluster['spans']}", exported, timeout_s=30)
